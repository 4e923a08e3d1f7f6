"""The fused linear path against reference.py applied to hidden @ weight.T + bias, in float64."""

import math

import pytest
import torch
from cases import assert_relative_close, device_of, random_case

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig
from sgrpo_kernels.ops import fused_linear
from sgrpo_kernels.ops.fused_linear import accumulate_product, plan_chunks

HIDDEN = 24


def linear_case(seed, batch=3, length=11, vocab=700, num_slots=6, with_bias=True, dtype=torch.float32, **options):
    """A loss case whose logits come from random hidden states and a random LM head."""
    case = random_case(batch=batch, length=length, vocab=vocab, num_slots=num_slots, dtype=dtype, seed=seed,
                       old_spread=0.3, **options)
    generator = torch.Generator().manual_seed(seed + 100)
    del case["logits"]
    head = {"hidden": torch.randn(batch, length, HIDDEN, generator=generator),
            "weight": torch.randn(vocab, HIDDEN, generator=generator) * 0.4,
            "bias": torch.randn(vocab, generator=generator) if with_bias else None}
    return {key: None if value is None else value.to(dtype) for key, value in head.items()}, case


def run(backend, head, case, chunk_size=None, **options):
    """Loss, the three gradients and metrics, on the backend's device, returned on the CPU."""
    device = device_of(backend)
    leaves = {key: None if value is None else value.detach().to(device).requires_grad_()
              for key, value in head.items()}
    inputs = [None if value is None else value.to(device) for value in case.values()]
    if backend == "reference":
        logits = leaves["hidden"] @ leaves["weight"].T + (0 if leaves["bias"] is None else leaves["bias"])
        loss, metrics = reference.sentence_grpo_loss(logits, *inputs, LossConfig(**options), return_metrics=True)
    else:
        loss, metrics = sk.fused_linear_sentence_grpo_loss(leaves["hidden"], leaves["weight"], *inputs,
                                                           bias=leaves["bias"], chunk_size=chunk_size,
                                                           backend=backend, return_metrics=True, **options)
    loss.backward()
    grads = {key: None if value is None else value.grad.cpu() for key, value in leaves.items()}
    return loss.detach().cpu(), grads, {key: value.cpu() for key, value in metrics.items()}


def gold(head, case, **options):
    to64 = lambda value: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return run("reference", {k: to64(v) for k, v in head.items()}, {k: to64(v) for k, v in case.items()}, **options)


def check(backend, head, case, chunk_size, rel=1e-5, **options):
    loss, grads, metrics = run(backend, head, case, chunk_size, **options)
    gold_loss, gold_grads, gold_metrics = gold(head, case, **options)
    assert_relative_close(loss, gold_loss, rel, "loss")
    for name, grad in gold_grads.items():
        if grad is not None:
            assert_relative_close(grads[name], grad, rel, f"{name}.grad")
            assert grads[name].dtype == head[name].dtype
    for name, value in gold_metrics.items():
        assert_relative_close(metrics[name], value, 1e-4, name)


OPTIONS = [dict(), dict(ratio_level="mean", beta=0.1), dict(reduction="token_mean", beta=0.05, kl_reduction="sum"),
           dict(reduction="sum", delta=1.3, temperature=0.8), dict(ratio_level="mean", reduction="token_mean",
                                                                  delta=1.2, beta=0.2, temperature=1.3)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("chunk_size", [2, 7, 1000], ids=["cuts-sentences", "mixed", "one-chunk"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(backend, options, chunk_size, with_bias):
    head, case = linear_case(seed=chunk_size + len(options), with_bias=with_bias,
                             per_row_advantages=options.get("delta") is not None)
    check(backend, head, case, chunk_size, **options)


def test_plan_packs_whole_sentences_and_splits_long_ones():
    segment_ids = torch.tensor([[0, 0, 0, 1, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1]])
    plan = plan_chunks(segment_ids, num_slots=3, chunk_size=3)
    # row 0: sentences of 3, 1, 2 tokens; row 1: 5 (longer than a chunk) and 2 tokens
    assert [chunk.tolist() for chunk in plan.whole] == [[0, 1, 2], [3, 4, 5], [12, 13]]
    assert [[piece.tolist() for piece in pieces] for pieces in plan.long] == [[[7, 8, 9], [10, 11]]]


def test_plan_orders_tokens_of_a_scattered_sentence_together():
    segment_ids = torch.tensor([[0, 1, 0, 1, 0]])        # sentences need not be contiguous runs
    plan = plan_chunks(segment_ids, num_slots=2, chunk_size=3)
    assert [chunk.tolist() for chunk in plan.whole] == [[0, 2, 4], [1, 3]]


def test_scattered_sentences_match_reference(backend):
    head, case = linear_case(seed=4, batch=2, length=9, num_slots=3, empty_row=False)
    case["segment_ids"] = torch.tensor([[0, 1, 0, 2, 1, 0, -1, 2, 1], [2, 2, 0, 1, 0, 1, -1, -1, -1]])
    case["completion_ids"] = torch.randint(0, 700, (2, 9), generator=torch.Generator().manual_seed(4))
    check(backend, head, case, chunk_size=3, beta=0.1, ratio_level="mean")


def test_frozen_head_gets_no_gradient_and_no_grad_mode_runs(backend):
    head, case = linear_case(seed=5)
    device = device_of(backend)
    hidden = head["hidden"].to(device).requires_grad_()
    weight, bias = head["weight"].to(device), head["bias"].to(device)       # frozen LM head (e.g. LoRA)
    inputs = [None if value is None else value.to(device) for value in case.values()]
    sk.fused_linear_sentence_grpo_loss(hidden, weight, *inputs, bias=bias, backend=backend, chunk_size=5).backward()
    _, gold_grads, _ = gold(head, case)
    assert_relative_close(hidden.grad.cpu(), gold_grads["hidden"], 1e-5, "hidden.grad")
    assert weight.grad is None and bias.grad is None
    with torch.no_grad():
        loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *inputs, bias=bias, backend=backend)
    assert_relative_close(loss.cpu(), gold(head, case)[0], 1e-5, "loss without gradients")


def test_no_scored_token(backend):
    head, case = linear_case(seed=6)
    case["segment_ids"] = torch.full_like(case["segment_ids"], -1)
    loss, grads, metrics = run(backend, head, case, chunk_size=4, beta=0.1)
    assert loss.item() == 0.0 and metrics["num_tokens"].item() == 0
    assert all(torch.count_nonzero(grad) == 0 for grad in grads.values())


def test_non_finite_hidden_gives_non_finite_loss(backend):
    head, case = linear_case(seed=7, empty_row=False)
    head["hidden"][0, 0, 3] = math.nan
    loss, _, _ = run(backend, head, case, chunk_size=4)
    assert not torch.isfinite(loss)


def test_bf16_close_to_gold(backend, monkeypatch):
    monkeypatch.setattr(fused_linear, "VOCAB_BLOCK", 128)     # grad_weight summed in fp32 over several blocks
    head, case = linear_case(seed=8, dtype=torch.bfloat16)
    loss, grads, _ = run(backend, head, case, chunk_size=5, beta=0.1)
    gold_loss, gold_grads, _ = gold(head, case, beta=0.1)
    assert grads["weight"].dtype == torch.bfloat16
    assert_relative_close(loss, gold_loss, 2e-2, "loss")
    for name in ("hidden", "weight", "bias"):
        assert_relative_close(grads[name], gold_grads[name], 5e-2, f"{name}.grad")


@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_linear_token_logprobs(backend, with_entropy):
    head, case = linear_case(seed=9)
    ids = case["completion_ids"].clamp(min=0)
    weights = torch.randn(2, *ids.shape, dtype=torch.float64)
    results = {}
    for name in ("ours", "gold"):
        device = device_of(backend) if name == "ours" else torch.device("cpu")
        dtype = torch.float32 if name == "ours" else torch.float64
        leaves = [value.detach().to(device, dtype).requires_grad_() for value in head.values()]
        if name == "ours":
            out = sk.fused_linear_token_logprobs(leaves[0], leaves[1], ids.to(device), bias=leaves[2],
                                                 temperature=0.9, return_entropy=with_entropy, chunk_size=5,
                                                 backend=backend)
        else:
            out = reference.token_logprobs(leaves[0] @ leaves[1].T + leaves[2], ids, 0.9, with_entropy)
        out = out if with_entropy else (out,)
        sum(value * weights[index].to(device, value.dtype) for index, value in enumerate(out)).sum().backward()
        results[name] = [value.detach().cpu() for value in out] + [leaf.grad.cpu() for leaf in leaves]
    for ours, expected in zip(results["ours"], results["gold"]):
        assert_relative_close(ours, expected, 1e-5, "logprobs, entropy or a gradient")


def test_head_gradient_of_bf16_chunks_accumulates_in_fp32():
    """Two chunks whose weight-gradient products nearly cancel: rounding each product to bf16 before adding it
    leaves an error of the order of bf16's precision times the parts (here ~40 % of the sum); the fp32
    accumulation stays at fp32's."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(96, 64, generator=generator).to(torch.bfloat16)
    grad = torch.randn(96, 80, generator=generator).to(torch.bfloat16)
    chunks = [(grad, rows), ((-0.99 * grad.double()).to(torch.bfloat16), rows)]
    accumulator = torch.zeros(80, 64)
    for chunk_grad, chunk_rows in chunks:
        accumulate_product(accumulator, chunk_grad.T, chunk_rows)
    gold = sum(g.double().T @ h.double() for g, h in chunks)
    rounded = sum((g.T @ h).double() for g, h in chunks)               # what rounding per chunk would give
    error = lambda value: ((value.double() - gold).norm() / gold.norm()).item()  # noqa: E731
    assert error(rounded) > 0.05                                       # the case is sensitive to the rounding
    assert error(accumulator) < 1e-5
