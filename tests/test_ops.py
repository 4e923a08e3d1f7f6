"""The fused backends ("triton" under TRITON_INTERPRET=1, and "torch") against reference.py in float64."""

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from cases import KERNEL_DEVICE, assert_relative_close, device_of, moved, random_case

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig
from sgrpo_kernels.ops.backends import resolve_backend
from sgrpo_kernels.ops.triton.sentence_grpo import _k3


def call(backend, case, **options):
    """The public loss on the backend's device; ``case["logits"]`` is used as given (leaf or not)."""
    return sk.sentence_grpo_loss(*case.values(), backend=backend, **options)


def gold_of(case):
    """The same inputs in float64, logits a fresh leaf."""
    gold = {key: value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in case.items()}
    gold["logits"].requires_grad_()
    return gold


def loss_and_grad(case, backend, **options):
    """Loss, ``logits.grad`` and metrics of one backend, computed on its device and returned on the CPU."""
    arguments = moved(case, device_of(backend))
    if backend == "reference":
        options = dict(options)
        batch = {name: options.pop(name, None) for name in ("normalizer", "is_weights", "sampling_logps")}
        loss, metrics = reference.sentence_grpo_loss(*arguments.values(), LossConfig(**options), return_metrics=True,
                                                     **batch)
    else:
        loss, metrics = call(backend, arguments, return_metrics=True, **options)
    loss.backward()
    return loss.detach().cpu(), arguments["logits"].grad.cpu(), {key: value.cpu() for key, value in metrics.items()}


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
                                                           ["sentence_mean", "token_mean", "sum",
                                                            "answer_mean_sentence_sum", "answer_mean_token_sum"],
                                                           [None, 1.3],
                                                           [0.0, 0.1], [1.0, 0.7])
               if not (b == 0.0 and k == "sum")]       # kl_reduction is moot without a KL term


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_option_grid_fp32(backend, options):
    case = random_case(batch=3, length=7, vocab=1000, num_slots=5, dtype=torch.float32, seed=13,
                       per_row_advantages=options["delta"] is None, old_spread=0.3)
    check_against_gold(case, backend, **options)


OBJECTIVE_GRID = [dict(objective=o, kl_estimator=k, kl_importance_weighting=w, clip_ratio_c=c, ratio_level=r,
                       beta=0.1, reduction=red)
                  for o, k, w, c, r, red in itertools.product(
                      ["ppo_clip", "cispo", "sapo", "geo_mean", "vespo"], ["k3", "k1", "k2", "abs"], [False, True],
                      [None, 2.0],
                      ["sum", "mean"], ["sentence_mean", "token_mean"])
                  if not (c is not None and o != "ppo_clip")]      # the dual clip belongs to ppo_clip


@pytest.mark.parametrize("options", OBJECTIVE_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_objective_grid_fp64(backend, options):
    """Every objective × KL estimator × importance-weighted KL (× dual clip), float64, gradients included; the
    ratios spread so that clipping, the dual clip and cispo's cap (eps_high = 1.1) all act."""
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=21, old_spread=0.6)
    eps_high = 1.1 if options["objective"] == "cispo" else 0.2
    check_against_gold(case, backend, rel=1e-10, eps_high=eps_high, **options)


@pytest.mark.parametrize("objective,options", [
    ("ppo_clip", dict(eps_low=0.1, eps_high=0.35, clip_ratio_c=1.6, delta=1.8)),
    ("ppo_clip", dict(eps_low=0.3, eps_high=0.05, off_policy_mask_threshold=0.0)),
    ("geo_mean", dict(eps_low=0.05, eps_high=0.4)),
    ("vespo", dict(vespo_k_pos=1.5, vespo_k_neg=3.5, vespo_lambda_pos=2.5, vespo_lambda_neg=1.2,
                   off_policy_mask_threshold=0.0)),
    ("sapo", dict(sapo_tau_pos=0.7, sapo_tau_neg=1.9))])
def test_asymmetric_options_and_zero_advantages(backend, objective, options):
    """The rules the backends share (ops/sentence_math.py) where a mistake would hide at the defaults: a clip range
    whose two sides differ, the dual clip and the cap, separate pairs of VESPO's and SAPO's parameters, and
    sentences whose advantage is exactly 0 (on the edge of every sign rule), some dropped by the off-policy mask;
    the loss, its gradient and the metrics (the clip fraction counts each side's own bound) against the reference,
    float64."""
    case = random_case(batch=4, length=12, vocab=300, num_slots=5, dtype=torch.float64, seed=11, old_spread=0.15,
                       empty_row=False)                   # 11 sentences, clipped on each side of the range
    case["advantages"][:, ::3] = 0.0                       # every third sentence on the sign rules' edge
    check_against_gold(case, backend, rel=1e-10, objective=objective, beta=0.1, **options)


@pytest.mark.parametrize("reduction", ["sentence_mean", "token_mean", "sum", "answer_mean_sentence_sum",
                                       "answer_mean_token_sum"])
@pytest.mark.parametrize("normalizer", [7.5, "tensor"])
def test_normalizer_replaces_the_denominator(backend, reduction, normalizer):
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=4, old_spread=0.3)
    value = torch.tensor(7.5, dtype=torch.float32) if normalizer == "tensor" else normalizer
    check_against_gold(case, backend, rel=1e-10, reduction=reduction, normalizer=value, beta=0.1)


@pytest.mark.parametrize("objective", ["ppo_clip", "cispo", "sapo", "geo_mean", "vespo"])
def test_objectives_fused_linear_fp32(backend, objective):
    case = random_case(batch=2, length=9, vocab=500, num_slots=4, dtype=torch.float32, seed=3, old_spread=0.5)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    weight = torch.randn(500, 16, dtype=torch.float64) * 0.3
    options = dict(objective=objective, beta=0.1, kl_estimator="k2", kl_importance_weighting=True, chunk_size=5,
                   clip_ratio_c=3.0 if objective == "ppo_clip" else None,
                   eps_high=1.2 if objective == "cispo" else 0.2)
    rest = [value.double() if value is not None and value.is_floating_point() else value
            for value in list(case.values())[1:]]
    results = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        h = hidden.to(dtype).to(device_of(name)).requires_grad_()
        w = weight.to(dtype).to(device_of(name)).requires_grad_()
        moved_rest = [None if v is None else v.to(device_of(name)) if not v.is_floating_point()
                      else v.to(dtype).to(device_of(name)) for v in rest]
        loss = sk.fused_linear_sentence_grpo_loss(h, w, *moved_rest, backend=name, **options)
        loss.backward()
        results[name] = (loss.detach().cpu().double(), h.grad.cpu().double(), w.grad.cpu().double())
    for got, gold, label in zip(results[backend], results["reference"], ("loss", "grad hidden", "grad weight")):
        assert_relative_close(got, gold, 1e-5, label)


@pytest.mark.parametrize("vocab", [1000, 4099])
@pytest.mark.parametrize("length", [1, 7, 63])
def test_odd_shapes_fp32(backend, vocab, length):
    case = random_case(batch=3, length=length, vocab=vocab, num_slots=max(length, 2), dtype=torch.float32,
                       seed=length + vocab, old_spread=0.2)
    check_against_gold(case, backend, beta=0.05, ratio_level="mean" if length > 7 else "sum")


LOW_PRECISION_OPTIONS = [dict(beta=0.1, temperature=0.9),
                         dict(objective="cispo", eps_high=1.2, beta=0.1, kl_estimator="k2", reduction="token_mean"),
                         dict(objective="sapo", beta=0.1, kl_importance_weighting=True, entropy_coef=0.05),
                         dict(clip_ratio_c=1.5, beta=0.1, kl_estimator="abs", reduction="answer_mean_token_sum",
                              top_entropy_quantile=0.5),
                         dict(objective="geo_mean", ratio_level="mean", beta=0.1, kl_importance_weighting=True),
                         dict(objective="vespo", beta=0.1, reduction="token_mean", off_policy_mask_threshold=0.1)]


@pytest.mark.parametrize("options", LOW_PRECISION_OPTIONS,
                         ids=["default", "cispo", "sapo", "dual_clip+mask", "geo_mean", "vespo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_reference_error(backend, dtype, options):
    case = random_case(batch=3, length=9, vocab=1000, num_slots=5, dtype=dtype, seed=5, old_spread=0.2)
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
    arguments = moved(case, device_of(backend))
    loss = call(backend, arguments, beta=0.1, inplace=True)
    assert torch.equal(arguments["logits"].detach().cpu(), expected_grad)   # the gradient now lives in the logits
    loss.backward()
    torch.testing.assert_close(arguments["logits"].grad.cpu(), expected_grad, rtol=0, atol=0)


def test_inplace_refuses_a_graph_that_needs_the_overwritten_logits(backend):
    case = random_case(batch=2, length=5, vocab=1000, num_slots=3, dtype=torch.float32, seed=2)
    arguments = moved(case, device_of(backend))
    arguments["logits"] = torch.exp(arguments["logits"])   # exp saves its output: overwriting it must not pass
    loss = call(backend, arguments, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_grad_output_scales_and_second_backward_refuses(backend):
    case = random_case(batch=2, length=6, vocab=1000, num_slots=3, dtype=torch.float32, seed=3)
    _, grad, _ = loss_and_grad(case, backend)
    arguments = moved(case, device_of(backend))
    loss = call(backend, arguments)
    (loss * 3).backward(retain_graph=True)
    torch.testing.assert_close(arguments["logits"].grad.cpu(), 3 * grad, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_no_gradient_needed_runs_no_gradient_pass(backend, monkeypatch):
    passes = resolve_backend(backend, "cpu").passes()

    def refuse(*args, **kwargs):
        raise AssertionError("pass C ran although no gradient was needed")
    monkeypatch.setattr(passes, "logits_gradient", refuse)
    case = random_case(batch=2, length=6, vocab=1000, num_slots=3, dtype=torch.float32, seed=4)
    gold = reference.sentence_grpo_loss(*gold_of(case).values(), LossConfig())
    arguments = moved(case, device_of(backend))
    loss = call(backend, dict(arguments, logits=arguments["logits"].detach()))
    assert not loss.requires_grad
    assert_relative_close(loss.cpu(), gold, 1e-5, "loss")
    with torch.no_grad():
        call(backend, arguments)


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
        assert not torch.isfinite(call(backend, moved(case, device_of(backend))))


def test_strided_logits_view_needs_no_copy(backend):
    # the usual `logits[:, :-1]` (drop the last position) is a view with a batch stride of (T + 1) V
    case = random_case(batch=3, length=6, vocab=1000, num_slots=4, dtype=torch.float32, seed=6)
    arguments = moved(case, device_of(backend))
    padded = torch.cat([arguments["logits"].detach(), torch.randn_like(arguments["logits"][:, :1])], 1)
    padded.requires_grad_()
    call(backend, dict(arguments, logits=padded[:, :-1]), beta=0.1).backward()
    _, expected, _ = loss_and_grad(gold_of(case), "reference", beta=0.1)
    assert_relative_close(padded.grad[:, :-1].cpu(), expected, 1e-5, "logits.grad")
    assert torch.count_nonzero(padded.grad[:, -1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_with_gradients(backend, dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 4099, generator=generator) * 3).to(dtype)
    logits[0, 0, 11] = -math.inf                                   # a masked vocabulary entry
    ids = torch.randint(0, 4099, (3, 7), generator=generator)
    weights = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    results = {}
    device = device_of(backend)
    for name, source in (("ours", logits.to(device)), ("gold", logits.double())):
        source.requires_grad_()
        if name == "ours":
            logp, entropy = sk.token_logprobs(source, ids.to(device), temperature=0.8, return_entropy=True,
                                              backend=backend)
        else:
            logp, entropy = reference.token_logprobs(source, ids, 0.8, return_entropy=True)
        scale = weights.to(device, logp.dtype)
        (logp * scale[0] + entropy * scale[1]).sum().backward()
        results[name] = (logp.cpu(), entropy.cpu(), source.grad.cpu())
    assert results["ours"][0].dtype == torch.float32
    for index, what in enumerate(("logp", "entropy", "logits.grad")):
        rel = 1e-5 if dtype == torch.float32 or what != "logits.grad" else 1e-2
        assert_relative_close(results["ours"][index], results["gold"][index], rel, what)


def test_huge_offsets_do_not_wrap(backend, tmp_path):
    # Three token rows 2**30 elements apart: the last row starts past 2**31, which an int32 offset wraps.
    # On the CPU the storage is a sparse file mapped privately, so only the touched pages ever exist;
    # on CUDA it is a real 4 GiB buffer.
    vocab, row_stride = 1000, 2**30
    size = 2 * row_stride + vocab
    device = device_of(backend)
    if device.type == "cuda":
        storage = torch.empty(size, dtype=torch.bfloat16, device=device)
    else:
        path = tmp_path / "sparse_logits.bin"
        with open(path, "wb") as handle:
            handle.truncate(size * 2)
        storage = torch.from_file(str(path), shared=False, size=size, dtype=torch.bfloat16)
    logits = storage.as_strided((1, 3, vocab), (3 * row_stride, row_stride, 1))
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(3, vocab, generator=generator) * 2).to(torch.bfloat16)
    with torch.no_grad():
        logits[0].copy_(values.to(device))
    assert 2 * row_stride > 2**31 - 1 - vocab
    inputs = [tensor.to(device) for tensor in (torch.tensor([[3, 500, 999]]), torch.tensor([[0, 0, 1]]),
                                               torch.tensor([[0.7, -1.3]]), torch.tensor([[-7.0, -7.2, -6.9]]))]
    gold_logits = values.double().unsqueeze(0).requires_grad_()
    gold = reference.sentence_grpo_loss(gold_logits, *[tensor.cpu().double() if tensor.is_floating_point()
                                                       else tensor.cpu() for tensor in inputs])
    gold.backward()
    loss = sk.sentence_grpo_loss(logits.requires_grad_(), *inputs, backend=backend)
    assert_relative_close(loss.detach().cpu(), gold, 1e-5, "loss")
    logp = sk.token_logprobs(logits.detach(), inputs[0], backend=backend)
    assert_relative_close(logp.cpu(), reference.token_logprobs(values.double(), inputs[0][0].cpu()).unsqueeze(0),
                          1e-5, "logp")
    # pass C writes the gradient into the same far-apart rows when asked to work in place
    sk.sentence_grpo_loss(logits.detach().requires_grad_(), *inputs, backend=backend, inplace=True)
    written = torch.stack([storage[row * row_stride:row * row_stride + vocab].cpu() for row in range(3)])
    assert_relative_close(written.unsqueeze(0), gold_logits.grad, 1e-2, "gradient written in place")


@pytest.mark.parametrize("name", ["advantages", "old_logps", "ref_logps"])
def test_fused_backends_refuse_to_drop_gradients(backend, name):
    case = moved(random_case(batch=2, length=4, vocab=1000, dtype=torch.float32), device_of(backend))
    case[name] = case[name].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        call(backend, case, beta=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the full-size check needs a CUDA device (none here)")
@pytest.mark.parametrize("inplace", [False, True])
def test_full_size_bf16_on_cuda(inplace):
    # N = 4096 tokens of a 151 936-entry vocabulary, sentences of 8..32 tokens, bf16 logits.
    case = random_case(batch=2, length=2048, vocab=151936, num_slots=256, dtype=torch.bfloat16, seed=0)
    options = dict(beta=0.04, temperature=0.9)

    def reference_on_cuda(inputs):      # float64 gold and the bf16 reference, both computed on the GPU
        arguments = moved(inputs, KERNEL_DEVICE)
        loss = reference.sentence_grpo_loss(*arguments.values(), LossConfig(**options))
        loss.backward()
        return loss.detach().cpu(), arguments["logits"].grad.cpu()

    gold_loss, gold_grad = reference_on_cuda(gold_of(case))
    reference_loss, reference_grad = reference_on_cuda(case)
    arguments = moved(case, KERNEL_DEVICE)
    loss = call("triton", arguments, inplace=inplace, **options)
    loss.backward()
    grad = arguments["logits"].grad.cpu()
    assert_relative_close(loss.detach().cpu(), gold_loss, 1e-4, "loss")
    assert (loss.detach().cpu().double() - gold_loss).abs() <= 2 * (reference_loss.double() - gold_loss).abs() + 1e-6
    assert (grad.double() - gold_grad).abs().max() <= 2 * (reference_grad.double() - gold_grad).abs().max()


def test_float64_with_scalars_that_fp32_cannot_hold(backend):
    """Every scalar option reaches the fp64 kernels exactly (on a GPU a Python float would arrive as fp32 unless
    the kernel declares it fp64): 1e-12 of the reference, gradients included."""
    case = random_case(batch=3, length=9, vocab=301, num_slots=5, dtype=torch.float64, seed=21, old_spread=0.4)
    check_against_gold(case, backend, rel=1e-12, temperature=0.7, eps_low=0.1, eps_high=0.3, beta=0.07, delta=1.7,
                       clamp_log_ratio=0.9, ratio_level="mean")


@triton.jit
def _k3_test_kernel(x_ptr, out_ptr, count, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < count)
    tl.store(out_ptr + offsets, _k3(x), mask=offsets < count)


def test_k3_is_accurate_where_the_direct_form_cancels():
    """fp32 k3 = exp(x) − x − 1 within 1e-6 of an fp64 evaluation for |x| in [1e-6, 1e-2] (the direct form is off
    by percents there), and within a few ulps of it elsewhere."""
    small = torch.logspace(-6, -2, 41, dtype=torch.float64)
    large = torch.tensor([0.3, 0.49, 0.5, 0.51, 0.9, 2.0, 7.0], dtype=torch.float64)
    x = torch.cat([small, -small, large, -large]).float()
    out = torch.empty_like(x).to(KERNEL_DEVICE)
    _k3_test_kernel[(1,)](x.to(KERNEL_DEVICE), out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    gold = torch.tensor([math.expm1(v) - v for v in x.double().tolist()], dtype=torch.float64)
    relative = ((out.cpu().double() - gold) / gold).abs()
    in_range = x.abs() <= 1e-2
    assert relative[in_range].max() <= 1e-6
    assert relative[~in_range].max() <= 1e-5
    direct = (torch.exp(x) - x - 1).double()
    assert ((direct - gold) / gold).abs()[in_range].max() > 1e-2       # what the series avoids


def _laid_out(kind: str, values: torch.Tensor) -> torch.Tensor:
    """``values [B, T, V]`` in a view laid out as ``kind`` says, in a storage of its own."""
    if kind == "contiguous":
        return values.clone()
    if kind == "sliced_start":      # logits[:, 1:] of [B, T + 1, V]: rows start off 16-byte boundaries
        return torch.cat([torch.randn_like(values[:, :1]), values], 1)[:, 1:]
    if kind == "sliced_vocab":      # logits[..., :V] of a wider head (a tokenizer smaller than the embedding)
        return torch.cat([values, torch.randn_like(values[..., :5])], -1)[..., :values.shape[-1]]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["contiguous", "sliced_start", "sliced_vocab"])
@pytest.mark.parametrize("vocab", [3, 4101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_off_16_byte_boundaries(backend, kind, vocab, dtype, inplace):
    """Odd V, sliced starts and sliced vocabularies put row starts anywhere in a 16-byte line: the kernels read
    an unaligned head, aligned tiles and a masked remainder (two tiles when V is just above a tile), and write
    the gradient with the same split when its rows line up with the logits' (else a plain one)."""
    case = random_case(batch=2, length=5, vocab=vocab, num_slots=3, dtype=dtype, seed=vocab)
    arguments = moved(case, device_of(backend))
    logits = _laid_out(kind, arguments["logits"].detach()).requires_grad_()
    values = logits.detach().clone()
    loss = call(backend, dict(arguments, logits=logits), beta=0.1, inplace=inplace)
    loss.backward()
    gold_loss, gold_grad, _ = loss_and_grad(gold_of(dict(case, logits=values.cpu())), "reference", beta=0.1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert_relative_close(loss.detach().cpu(), gold_loss, tolerance, "loss")
    assert_relative_close(logits.grad.cpu(), gold_grad, tolerance, "logits.grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_triton_scale_leaves_the_gradient_alone_at_one_and_scales_otherwise(dtype):
    from sgrpo_kernels.ops.triton.scale import BLOCK, scale_unless_one_
    values = torch.randn(BLOCK + 3, dtype=dtype, device=KERNEL_DEVICE)   # two programs, the second masked
    original = values.clone()
    scale_unless_one_(values, torch.tensor(1.0, device=KERNEL_DEVICE))
    assert torch.equal(values, original)
    scale = torch.tensor(-2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=KERNEL_DEVICE)
    scale_unless_one_(values, scale)
    exact = dtype != torch.bfloat16     # bf16 rounding of the interpreter may differ by one unit in the last place
    torch.testing.assert_close(values, (original.to(scale.dtype) * scale).to(dtype), rtol=0 if exact else 2**-7,
                               atol=0)


def test_backward_allocates_nothing_the_size_of_the_logits(backend):
    """The finished gradient is handed over, not copied, and autograd does not materialise zeros for the op's
    other outputs (a [B, T, V] allocation in backward doubled the peak memory once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargeAllocations(TorchDispatchMode):
        def __init__(self, threshold):
            super().__init__()
            self.threshold, self.seen = threshold, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for out in torch.utils._pytree.tree_leaves(result):
                if isinstance(out, torch.Tensor) and out.numel() >= self.threshold and \
                        out.untyped_storage().data_ptr() not in inputs:
                    self.seen.append(str(func))
            return result

    case = random_case(batch=2, length=6, vocab=1000, num_slots=3, dtype=torch.float32, seed=5)
    arguments = moved(case, device_of(backend))
    loss = call(backend, arguments)
    with LargeAllocations(arguments["logits"].numel()) as mode:
        loss.backward()
    assert mode.seen == []
    assert arguments["logits"].grad is not None
    # the fused linear path: nothing the size of the head's weight [V, H]
    weight = torch.randn(1000, 16, device=arguments["logits"].device, requires_grad=True)
    hidden = torch.randn(2, 6, 16, device=weight.device, requires_grad=True)
    loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *list(arguments.values())[1:], backend=backend)
    with LargeAllocations(weight.numel()) as mode:
        loss.backward()
    assert mode.seen == [] and weight.grad is not None and hidden.grad is not None


def check_fused_linear_against_gold(case, backend, **options):
    """The fused linear loss (hidden ``[B, T, 8]``, a random head over the case's vocabulary) of ``backend`` equals
    the reference on the materialised logits, in float64: loss and the gradients of hidden and weight."""
    batch, length, vocab = case["logits"].shape
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, length, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocab, 8, dtype=torch.float64, generator=generator) * 0.3
    results = []
    for name in (backend, "reference"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        rest = list(moved(case, device_of(name)).values())[1:]
        loss = sk.fused_linear_sentence_grpo_loss(h, w, *rest, backend=name, **options)
        loss.backward()
        results.append((loss.detach().cpu(), h.grad, w.grad))
    for got, gold, label in zip(*results, ("loss", "grad hidden", "grad weight")):
        assert_relative_close(got, gold, 1e-10, label)


@pytest.mark.parametrize("shape", ["answer", "token"])
@pytest.mark.parametrize("objective", ["ppo_clip", "cispo", "sapo", "geo_mean", "vespo"])
def test_is_weights_on_the_policy_term(backend, objective, shape):
    """Importance weights of the rollout engine, [B] or [B, T], on both paths, against the reference in fp64
    (vespo folds them into its weight w, per token: [B] has no meaning there and is refused)."""
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=8, old_spread=0.4)
    generator = torch.Generator().manual_seed(1)
    size = (3,) if shape == "answer" else (3, 7)
    weights = (0.5 + torch.rand(size, generator=generator, dtype=torch.float64)).to(KERNEL_DEVICE
                                                                                     if backend == "triton" else "cpu")
    options = dict(objective=objective, beta=0.1, kl_importance_weighting=True, is_weights=weights,
                   eps_high=1.2 if objective == "cispo" else 0.2)
    if objective == "vespo" and shape == "answer":
        with pytest.raises(ValueError, match="pass is_weights as \\[B, T\\]"):
            loss_and_grad(case, backend, **options)
        return
    check_against_gold(case, backend, rel=1e-10, **options)
    # the weights change the loss (the test would pass vacuously if they were dropped)
    plain, _, _ = loss_and_grad(case, backend, **{k: v for k, v in options.items() if k != "is_weights"})
    weighted, _, _ = loss_and_grad(case, backend, **options)
    assert (plain - weighted).abs() > 1e-3
    check_fused_linear_against_gold(case, backend, chunk_size=4, **options)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("entropy_coef", [0.03, -0.2])
def test_entropy_bonus_with_its_gradient(backend, entropy_coef, temperature):
    """− entropy_coef · mean token entropy, from the same pass over the logits, on both paths."""
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=12, old_spread=0.3)
    options = dict(entropy_coef=entropy_coef, temperature=temperature, beta=0.1, objective="ppo_clip")
    check_against_gold(case, backend, rel=1e-10, **options)
    without, _, _ = loss_and_grad(case, backend, **{**options, "entropy_coef": 0.0})
    with_bonus, _, _ = loss_and_grad(case, backend, **options)
    assert (without - with_bonus).abs() > 1e-3                       # the bonus is really there
    check_fused_linear_against_gold(case, backend, chunk_size=3, **options)


@pytest.mark.parametrize("masks", [dict(top_entropy_quantile=0.4), dict(off_policy_mask_threshold=0.05),
                                   dict(top_entropy_quantile=0.6, off_policy_mask_threshold=0.0, entropy_coef=0.1)],
                         ids=["entropy", "off_policy", "both+bonus"])
@pytest.mark.parametrize("objective", ["ppo_clip", "cispo", "geo_mean", "vespo"])
def test_token_masks(backend, masks, objective):
    """The top-entropy mask and the off-policy sentence mask (with rollout log-probs) on both paths; the fused path
    visits its chunks twice for them."""
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=14, old_spread=0.4)
    sampling = case["old_logps"] + 0.3 * torch.randn(case["old_logps"].shape, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(6))
    options = dict(objective=objective, beta=0.1, sampling_logps=sampling.to(device_of(backend)),
                   eps_high=1.2 if objective == "cispo" else 0.2, **masks)
    check_against_gold(case, backend, rel=1e-10, **options)
    plain, _, _ = loss_and_grad(case, backend, **{k: v for k, v in options.items() if k not in masks})
    masked, _, _ = loss_and_grad(case, backend, **options)
    assert (plain - masked).abs() > 1e-4                             # the masks really drop something
    check_fused_linear_against_gold(case, backend, chunk_size=4, **options)


@pytest.mark.parametrize("is_mode", ["token_truncate", "token_mask", "sentence_truncate", "sentence_mask",
                                     "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("objective", ["ppo_clip", "vespo"])
def test_rollout_weights_from_sampling_logps(backend, is_mode, objective):
    case = random_case(batch=3, length=7, vocab=300, num_slots=4, dtype=torch.float64, seed=16, old_spread=0.3)
    sampling = case["old_logps"] + 0.4 * torch.randn(case["old_logps"].shape, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(8))
    options = dict(beta=0.1, is_mode=is_mode, is_clip_min=0.5, is_clip_max=2.0, objective=objective,
                   sampling_logps=sampling.to(device_of(backend)))
    if objective == "vespo" and not is_mode.startswith("token"):    # vespo folds per-token weights (as in TRL)
        with pytest.raises(ValueError, match="is_mode must be 'token_truncate' or 'token_mask'"):
            loss_and_grad(case, backend, **options)
        return
    check_against_gold(case, backend, rel=1e-10, **options)
    plain, _, _ = loss_and_grad(case, backend, beta=0.1, objective=objective)
    weighted, _, _ = loss_and_grad(case, backend, **options)
    assert (plain - weighted).abs() > 1e-4
    check_fused_linear_against_gold(case, backend, chunk_size=4, **options)
