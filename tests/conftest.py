"""Test setup: without a CUDA device, Triton kernels run on the CPU through the interpreter."""

import importlib.util
import os

import torch

# Must be set before any Triton kernel is defined; `make test` sets it too. With a CUDA device
# (the GPU suite) the kernels run for real on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def poison_fresh_outputs(monkeypatch):
    """Every buffer a kernel backend allocates starts as NaN: an element it forgets to write fails a test."""
    from sgrpo_kernels.ops import passes
    monkeypatch.setattr(passes, "POISON_FRESH_OUTPUTS", True)


@pytest.fixture(params=["triton", "torch", "native"])
def backend(request):
    """The fused backends; Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; native on the CPU when the
    C++ extension is built (``tests/test_backends.py`` fails if it should have been and was not)."""
    if request.param == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    if request.param == "native":
        from cases import native_unavailable
        if native_unavailable() is not None:
            pytest.skip(native_unavailable())
    return request.param


@pytest.fixture(scope="session", autouse=True)
def suite_launches():
    """Every Triton kernel launch of the session: the build test (run last) compiles them for real GPUs."""
    if importlib.util.find_spec("triton") is None:
        yield set()
        return
    from sgrpo_kernels.ops.triton.kernel_builds import recorded_launches
    with recorded_launches() as launches:
        yield launches


def pytest_collection_modifyitems(items):
    """Tests marked ``build`` run last, after every other test has launched its kernels."""
    items.sort(key=lambda item: item.get_closest_marker("build") is not None)
