"""Test setup: without a CUDA device, Triton kernels run on the CPU through the interpreter."""

import importlib.util
import os
import time
from pathlib import Path

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


_WORKER_LAUNCHES: set = set()     # this process's recorded launches, saved for the other workers at the end
WORKER_WAIT_SECONDS = 3600        # how long the build test waits for the other pytest-xdist workers' tests


@pytest.fixture(scope="session", autouse=True)
def suite_launches():
    """Every Triton kernel launch of the session: the build test (run last) compiles them for real GPUs."""
    if importlib.util.find_spec("triton") is None:
        yield set()
        return
    from tools.kernel_builds import recorded_launches
    with recorded_launches() as launches:
        yield launches
    _WORKER_LAUNCHES.update(launches)


def _xdist_worker() -> str | None:
    """This process's pytest-xdist worker id (``gw0``, ...), or ``None`` outside a parallel run."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def _launch_folder(config) -> Path:
    """Where this run's workers leave their launches: beside their temporary folders, which pytest-xdist puts
    in the run's own (``--basetemp=<run>/popen-gw0``, ...)."""
    return Path(config.getoption("basetemp")).parent / "recorded-launches"


def pytest_sessionfinish(session):
    """A pytest-xdist worker leaves the launches of its tests for the worker that runs the build test; it gets
    here when it has no test left (also when it ran none)."""
    worker = _xdist_worker()
    if worker is None or importlib.util.find_spec("triton") is None:
        return
    from tools.kernel_builds import save_launches
    folder = _launch_folder(session.config)
    folder.mkdir(exist_ok=True)
    save_launches(_WORKER_LAUNCHES, str(folder / f"{worker}.json.partial"))
    os.replace(folder / f"{worker}.json.partial", folder / f"{worker}.json")     # whole, or not there


@pytest.fixture
def every_worker_launches(request, suite_launches):
    """The launches of every test of the run: this process's and, in a pytest-xdist run, every other worker's
    (each leaves them when its last test is done; this waits for them, so only the one test marked ``build`` that
    needs them may use it: two such tests on two workers would wait for each other)."""
    worker = _xdist_worker()
    if worker is None:
        return set(suite_launches)
    from tools.kernel_builds import load_launches
    folder = _launch_folder(request.config)
    others = {f"gw{index}" for index in range(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))} - {worker}
    deadline = time.monotonic() + WORKER_WAIT_SECONDS
    while any(not (folder / f"{other}.json").exists() for other in others):
        if time.monotonic() > deadline:
            missing = sorted(other for other in others if not (folder / f"{other}.json").exists())
            pytest.fail(f"workers {missing} did not finish their tests within {WORKER_WAIT_SECONDS} s")
        time.sleep(1)
    launches = set(suite_launches)
    for other in others:
        launches.update(load_launches(str(folder / f"{other}.json")))
    return launches


def pytest_collection_modifyitems(items):
    """Tests marked ``build`` run last, after every other test has launched its kernels; tests marked ``first``
    (long ones that need no other test) run first, so that a parallel run overlaps them with the rest."""
    items.sort(key=lambda item: 2 if item.get_closest_marker("build") else 0 if item.get_closest_marker("first")
               else 1)
