"""The fused backends ("triton" under TRITON_INTERPRET=1, and "torch") against reference.py in float64."""

import itertools
import math
import os

import pytest
import torch
from cases import assert_relative_close, random_case

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig
from sgrpo_kernels.ops import common

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def poison_fresh_outputs(monkeypatch):
    """Every buffer a backend allocates starts as NaN: an element it forgets to write fails the test."""
    monkeypatch.setattr(common, "POISON_FRESH_OUTPUTS", True)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    return request.param


def gold_of(case):
    """The same inputs in float64, logits a fresh leaf."""
    gold = {key: value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in case.items()}
    gold["logits"].requires_grad_()
    return gold


def loss_and_grad(case, backend, **options):
    logits = case["logits"].detach().clone().requires_grad_()
    arguments = dict(case, logits=logits)
    if backend == "reference":
        loss, metrics = reference.sentence_grpo_loss(*arguments.values(), LossConfig(**options), return_metrics=True)
    else:
        loss, metrics = sk.sentence_grpo_loss(*arguments.values(), backend=backend, return_metrics=True, **options)
    loss.backward()
    return loss.detach(), logits.grad, metrics


def check_against_gold(case, backend, rel=1e-5, **options):
    loss, grad, metrics = loss_and_grad(case, backend, **options)
    gold_loss, gold_grad, gold_metrics = loss_and_grad(gold_of(case), "reference", **options)
    assert_relative_close(loss, gold_loss, rel, "loss")
    assert_relative_close(grad, gold_grad, rel, "logits.grad")
    assert grad.dtype == case["logits"].dtype
    assert set(metrics) == set(gold_metrics)
    for name, value in gold_metrics.items():
        assert_relative_close(metrics[name], value, 1e-4, name)


OPTION_GRID = [dict(ratio_level=r, kl_reduction=k, reduction=red, delta=d, beta=b, temperature=t)
               for r, k, red, d, b, t in itertools.product(["sum", "mean"], ["mean", "sum"],
                                                           ["sentence_mean", "token_mean", "sum"], [None, 1.3],
                                                           [0.0, 0.1], [1.0, 0.7])
               if not (b == 0.0 and k == "sum")]       # kl_reduction is moot without a KL term


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_option_grid_fp32(backend, options):
    case = random_case(batch=3, length=7, vocab=1000, num_slots=5, dtype=torch.float32, seed=13,
                       per_row_advantages=options["delta"] is None, old_spread=0.3)
    check_against_gold(case, backend, **options)


@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("length", [1, 7, 63])
def test_odd_shapes_fp32(backend, vocab, length):
    case = random_case(batch=3, length=length, vocab=vocab, num_slots=max(length, 2), dtype=torch.float32,
                       seed=length + vocab, old_spread=0.2)
    check_against_gold(case, backend, beta=0.05, ratio_level="mean" if length > 7 else "sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_reference_error(backend, dtype):
    case = random_case(batch=3, length=9, vocab=1000, num_slots=5, dtype=dtype, seed=5, old_spread=0.2)
    options = dict(beta=0.1, temperature=0.9)
    gold_loss, gold_grad, _ = loss_and_grad(gold_of(case), "reference", **options)
    ref_loss, ref_grad, _ = loss_and_grad(case, "reference", **options)
    loss, grad, _ = loss_and_grad(case, backend, **options)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    reference_loss_error = (ref_loss.double() - gold_loss).abs().item()
    reference_grad_error = (ref_grad.double() - gold_grad).abs().max().item()
    assert (loss.double() - gold_loss).abs().item() <= 2 * reference_loss_error + 1e-7
    assert (grad.double() - gold_grad).abs().max().item() <= 2 * reference_grad_error


def test_inplace_gives_the_same_gradient_and_overwrites_logits(backend):
    case = random_case(batch=3, length=8, vocab=1000, num_slots=4, dtype=torch.float32, seed=8)
    _, expected_grad, _ = loss_and_grad(case, backend, beta=0.1)
    logits = case["logits"].detach().clone().requires_grad_()
    loss = sk.sentence_grpo_loss(logits, *list(case.values())[1:], backend=backend, beta=0.1, inplace=True)
    assert torch.equal(logits.detach(), expected_grad)    # the gradient now lives in the logits' storage
    loss.backward()
    torch.testing.assert_close(logits.grad, expected_grad, rtol=0, atol=0)


def test_inplace_refuses_a_graph_that_needs_the_overwritten_logits(backend):
    case = random_case(batch=2, length=5, vocab=1000, num_slots=3, dtype=torch.float32, seed=2)
    raw = case["logits"].detach().clone().requires_grad_()
    logits = torch.exp(raw)                 # exp saves its output for backward: overwriting it must not pass silently
    loss = sk.sentence_grpo_loss(logits, *list(case.values())[1:], backend=backend, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_grad_output_scales_and_second_backward_refuses(backend):
    case = random_case(batch=2, length=6, vocab=1000, num_slots=3, dtype=torch.float32, seed=3)
    _, grad, _ = loss_and_grad(case, backend)
    logits = case["logits"].detach().clone().requires_grad_()
    loss = sk.sentence_grpo_loss(logits, *list(case.values())[1:], backend=backend)
    (loss * 3).backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, 3 * grad, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_no_gradient_needed_runs_no_gradient_pass(backend, monkeypatch):
    from sgrpo_kernels.ops.sentence_grpo import TRITON_PASSES
    from sgrpo_kernels.ops.torch_chunked import TORCH_PASSES
    passes = TRITON_PASSES if backend == "triton" else TORCH_PASSES

    def refuse(*args, **kwargs):
        raise AssertionError("pass C ran although no gradient was needed")
    monkeypatch.setattr(sk.loss, "_passes", lambda name: common.Passes(passes.logsumexp, passes.sentence, refuse))
    case = random_case(batch=2, length=6, vocab=1000, num_slots=3, dtype=torch.float32, seed=4)
    gold = reference.sentence_grpo_loss(*gold_of(case).values(), LossConfig())
    loss = sk.sentence_grpo_loss(case["logits"].detach(), *list(case.values())[1:], backend=backend)
    assert not loss.requires_grad
    assert_relative_close(loss, gold, 1e-5, "loss")
    with torch.no_grad():
        sk.sentence_grpo_loss(*case.values(), backend=backend)


@pytest.mark.parametrize("reduction", ["sentence_mean", "token_mean", "sum"])
def test_no_scored_token_gives_zero_loss_and_zero_gradient(backend, reduction):
    case = random_case(batch=2, length=5, vocab=1000, dtype=torch.float32)
    case["segment_ids"] = torch.full((2, 5), -1)
    loss, grad, metrics = loss_and_grad(case, backend, reduction=reduction, beta=0.1)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert metrics["num_tokens"].item() == 0 and metrics["num_sentences"].item() == 0


def test_non_finite_logits_give_non_finite_loss(backend):
    for bad in (math.nan, math.inf):
        case = random_case(batch=2, length=4, vocab=1000, dtype=torch.float32, empty_row=False)
        with torch.no_grad():
            case["logits"][0, 0, 17] = bad
        loss = sk.sentence_grpo_loss(*case.values(), backend=backend)
        assert not torch.isfinite(loss)


def test_strided_logits_view_needs_no_copy(backend):
    # the usual `logits[:, :-1]` (drop the last position) is a view with a batch stride of (T + 1) V
    case = random_case(batch=3, length=6, vocab=1000, num_slots=4, dtype=torch.float32, seed=6)
    padded = torch.cat([case["logits"].detach(), torch.randn(3, 1, 1000)], 1).requires_grad_()
    loss = sk.sentence_grpo_loss(padded[:, :-1], *list(case.values())[1:], backend=backend, beta=0.1)
    loss.backward()
    _, expected, _ = loss_and_grad(gold_of(case), "reference", beta=0.1)
    assert_relative_close(padded.grad[:, :-1], expected, 1e-5, "logits.grad")
    assert torch.count_nonzero(padded.grad[:, -1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_with_gradients(backend, dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 4099, generator=generator) * 3).to(dtype)
    logits[0, 0, 11] = -math.inf                                   # a masked vocabulary entry
    ids = torch.randint(0, 4099, (3, 7), generator=generator)
    weights = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    results = {}
    for name, source in (("ours", logits.clone()), ("gold", logits.double())):
        source.requires_grad_()
        if name == "ours":
            logp, entropy = sk.token_logprobs(source, ids, temperature=0.8, return_entropy=True, backend=backend)
        else:
            logp, entropy = reference.token_logprobs(source, ids, 0.8, return_entropy=True)
        (logp * weights[0] + entropy * weights[1]).sum().backward()
        results[name] = (logp, entropy, source.grad)
    assert results["ours"][0].dtype == torch.float32
    for index, what in enumerate(("logp", "entropy", "logits.grad")):
        rel = 1e-5 if dtype == torch.float32 or what != "logits.grad" else 1e-2
        assert_relative_close(results["ours"][index], results["gold"][index], rel, what)


def test_huge_offsets_do_not_wrap(backend, tmp_path):
    # Three token rows 2**30 elements apart: the last row starts past 2**31, which an int32 offset wraps.
    # The storage is a sparse file mapped privately: only the touched pages ever exist in memory.
    vocab, row_stride = 1000, 2**30
    path = tmp_path / "sparse_logits.bin"
    with open(path, "wb") as handle:
        handle.truncate((2 * row_stride + vocab) * 2)
    storage = torch.from_file(str(path), shared=False, size=2 * row_stride + vocab, dtype=torch.bfloat16)
    logits = storage.as_strided((1, 3, vocab), (3 * row_stride, row_stride, 1))
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(3, vocab, generator=generator) * 2).to(torch.bfloat16)
    for row in range(3):
        logits[0, row] = values[row]
    assert logits.storage_offset() + 2 * row_stride > 2**31 - 1 - vocab
    ids = torch.tensor([[3, 500, 999]])
    segments = torch.tensor([[0, 0, 1]])
    advantages = torch.tensor([[0.7, -1.3]])
    old = torch.tensor([[-7.0, -7.2, -6.9]])
    leaf = logits.requires_grad_()
    loss = sk.sentence_grpo_loss(leaf, ids, segments, advantages, old, backend=backend)
    gold = reference.sentence_grpo_loss(values.double().unsqueeze(0), ids, segments, advantages.double(),
                                        old.double())
    assert_relative_close(loss, gold, 1e-5, "loss")
    logp = sk.token_logprobs(logits.detach(), ids, backend=backend)
    assert_relative_close(logp, reference.token_logprobs(values.double(), ids[0]).unsqueeze(0), 1e-5, "logp")
    # pass C writes the gradient into the same far-apart rows when asked to work in place
    inplace_loss = sk.sentence_grpo_loss(logits.detach().requires_grad_(), ids, segments, advantages, old,
                                         backend=backend, inplace=True)
    assert torch.isfinite(inplace_loss)
    gold_logits = values.double().unsqueeze(0).requires_grad_()
    reference.sentence_grpo_loss(gold_logits, ids, segments, advantages.double(), old.double()).backward()
    written = torch.stack([storage[row * row_stride:row * row_stride + vocab] for row in range(3)]).unsqueeze(0)
    assert_relative_close(written, gold_logits.grad, 1e-2, "gradient written in place")


def test_auto_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sk.loss.resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert sk.loss.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sk.loss.resolve_backend("triton", cpu)
    assert sk.loss.resolve_backend("reference", cpu) == "reference"


@pytest.mark.parametrize("name", ["advantages", "old_logps", "ref_logps"])
def test_fused_backends_refuse_to_drop_gradients(backend, name):
    case = random_case(batch=2, length=4, vocab=1000, dtype=torch.float32)
    case[name] = case[name].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        sk.sentence_grpo_loss(*case.values(), backend=backend, beta=0.1)
