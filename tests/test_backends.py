"""The backend registry: one resolver for every entry point, errors that say what is available, and a new
backend that needs nothing but a module and a registry entry."""

import os
import shutil
import sys
import types

import pytest
import torch
from cases import random_case

import sgrpo_kernels as sk
from sgrpo_kernels.ops import backends
from sgrpo_kernels.ops import torch as torch_backend
from sgrpo_kernels.ops.native import extension

CPU = torch.device("cpu")


@pytest.fixture
def without_native(monkeypatch):
    """As on a machine where the C++ extension was not built."""
    monkeypatch.setattr(extension, "_import", lambda: (None, "No module named 'sgrpo_kernels._native'"))


def test_the_native_extension_is_built_wherever_it_can_be():
    """`make test` builds it (a C++ compiler is part of the CI image): a missing build must fail, not skip."""
    if os.environ.get("SGRPO_BUILD_NATIVE") == "0" or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("SGRPO_BUILD_NATIVE=0 or no C++ compiler: the native backend is not expected here")
    assert extension.unavailable_reason() is None
    assert extension.instruction_set() in ("avx2", "avx512", "neon", "scalar")
    native = backends.resolve_backend("native", CPU).passes()
    for name in ("token_scores", "sentence_sums", "sentence_terms", "token_coefficients", "logits_gradient",
                 "group_advantages"):
        assert getattr(native, name).__module__.startswith("sgrpo_kernels.ops.native."), name   # the C++ passes
        operator = name if name == "group_advantages" else f"{name}_"      # the in-place ones end in _
        assert hasattr(torch.ops.sgrpo_native, operator), name


def test_auto_takes_native_on_the_cpu_when_built(monkeypatch):
    if extension.unavailable_reason() is not None:
        pytest.skip(extension.unavailable_reason())
    for interpreting in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpreting)
        assert backends.resolve_backend("auto", CPU).name == "native"
    assert backends.resolve_backend("auto", "meta").name == "torch"


def test_auto_without_native_takes_triton_under_the_interpreter_and_torch_otherwise(monkeypatch, without_native):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve_backend("auto", CPU).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.resolve_backend("auto", CPU).name == "torch"
    assert backends.resolve_backend("reference", CPU).name == "reference"
    assert backends.resolve_backend("auto", "meta").name == "torch"     # plain PyTorch runs on any device


def test_unavailable_backend_says_why_and_lists_the_rest(monkeypatch, without_native):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as raised:
        backends.resolve_backend("triton", CPU)
    message = str(raised.value)
    assert "backend='triton' cannot run on cpu" in message and "TRITON_INTERPRET=1" in message
    for name in ("reference", "torch"):
        assert f"  {name}: available" in message
    assert "  native: unavailable, the C++ extension sgrpo_kernels._native is not built" in message
    assert "pip install --no-build-isolation" in message


def test_unknown_backend_lists_every_name():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'reference', 'triton', 'torch', 'native'"):
        backends.resolve_backend("cuda-graphs", CPU)


@pytest.mark.parametrize("entry_point", ["loss", "fused_linear", "token_logprobs", "fused_linear_token_logprobs",
                                         "group_advantages", "module"])
def test_every_entry_point_uses_the_resolver(entry_point, without_native):
    case = random_case(batch=2, length=5, vocab=50, num_slots=3, dtype=torch.float32)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(50, 8)
    calls = {
        "loss": lambda backend: sk.sentence_grpo_loss(*case.values(), backend=backend),
        "fused_linear": lambda backend: sk.fused_linear_sentence_grpo_loss(
            hidden, weight, *list(case.values())[1:], backend=backend),
        "token_logprobs": lambda backend: sk.token_logprobs(case["logits"], case["completion_ids"], backend=backend),
        "fused_linear_token_logprobs": lambda backend: sk.fused_linear_token_logprobs(
            hidden, weight, case["completion_ids"], backend=backend),
        "group_advantages": lambda backend: sk.group_sentence_advantages(
            torch.rand(4, 3), torch.tensor([3, 2, 1, 3]), 2, backend=backend),
        "module": lambda backend: sk.SentenceGRPOLoss(backend=backend)(*case.values()),
    }
    with pytest.raises(ValueError, match="backend must be one of"):
        calls[entry_point]("nope")
    with pytest.raises(ValueError, match="backend='native' cannot run on cpu"):
        calls[entry_point]("native")


def test_a_new_backend_is_one_module_and_one_registry_entry(monkeypatch):
    """A backend that wraps the torch passes and counts what runs: registered, it serves every entry point."""
    counted = types.ModuleType("counting_backend")
    runs = []
    for name in ("token_scores", "sentence_sums", "sentence_terms", "token_coefficients", "logits_gradient",
                 "group_advantages"):
        def counting(*args, _name=name, **kwargs):
            runs.append(_name)
            return getattr(torch_backend, _name)(*args, **kwargs)
        setattr(counted, name, counting)
    monkeypatch.setitem(sys.modules, "counting_backend", counted)
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register_backend(backends.Backend("counting", "test", "counting_backend", lambda device: None))

    case = random_case(batch=2, length=5, vocab=50, num_slots=3, dtype=torch.float64)
    logits = case["logits"].requires_grad_()
    loss = sk.sentence_grpo_loss(*case.values(), backend="counting")
    loss.backward()
    gold = case["logits"].detach().clone().requires_grad_()
    sk.sentence_grpo_loss(gold, *list(case.values())[1:], backend="reference").backward()
    torch.testing.assert_close(logits.grad, gold.grad)
    assert {"token_scores", "sentence_sums", "sentence_terms", "token_coefficients", "logits_gradient"} <= set(runs)
    sk.group_sentence_advantages(torch.rand(4, 3), torch.tensor([3, 2, 1, 3]), 2, backend="counting")
    assert "group_advantages" in runs


def test_backends_know_nothing_of_processes():
    """Kernels, launchers, backends, the passes and the layout take no process group and import no collective:
    what spans ranks is done by the driver (``ops/driver.py``, ``ops/fused_linear.py``, ``ops/custom_ops.py``)."""
    import pathlib

    import sgrpo_kernels.ops as ops
    root = pathlib.Path(ops.__file__).parent
    modules = [*root.glob("triton/*.py"), *root.glob("torch/*.py"), root / "passes.py", root / "layout.py"]
    assert len(modules) >= 10
    for module in modules:
        source = module.read_text(encoding="utf-8")
        for word in ("distributed", "process_group", "all_reduce", "all_gather"):
            assert word not in source, f"{module.relative_to(root)} mentions {word}"
