"""``return_token_scores=True``: the per-token log-prob and entropy that the loss's own pass over the logits computed,
detached, 0 where not scored; on every backend, both paths, in place, packed, vocabulary-parallel and
sequence-parallel, equal to what ``token_logprobs`` gives for the same tokens, and the loss unchanged."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
from cases import native_unavailable, random_case, run_on_ranks
from test_packed import packed_case
from test_sequence_parallel import SPLITS, sliced
from test_tensor_parallel import SHARDS, VOCAB, shard_range

import sgrpo_kernels as sk

BACKENDS = (["reference", "torch"] + (["native"] if native_unavailable() is None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
LOSS_INPUTS = ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")


def expected_scores(logits, completion_ids, segment_ids, temperature=1.0):
    """What the token scores must hold: ``token_logprobs`` (reference) where scored, 0 elsewhere."""
    scored = segment_ids >= 0
    logp, entropy = sk.token_logprobs(logits.detach(), completion_ids.clamp(min=0), temperature=temperature,
                                      return_entropy=True, backend="reference")
    return torch.where(scored, logp, 0.0), torch.where(scored, entropy, 0.0)


def head(batch, length, vocab, hidden_size=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True),
            torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "logits in place", "fused linear", "module"])
def test_the_losss_own_scores_are_the_token_logprobs(backend, path):
    case = random_case(batch=3, length=7, vocab=41, num_slots=4, seed=12)
    inputs = [case[name] for name in LOSS_INPUTS]
    options = dict(beta=0.1, temperature=0.8, backend=backend)
    hidden, weight = head(3, 7, 41)
    if path == "fused linear":
        logits = hidden @ weight.T
        plain = sk.fused_linear_sentence_grpo_loss(hidden, weight, *inputs, chunk_size=4, **options)
        loss, metrics, (logp, entropy) = sk.fused_linear_sentence_grpo_loss(
            hidden, weight, *inputs, chunk_size=4, return_metrics=True, return_token_scores=True, **options)
    elif path == "module":
        logits = case["logits"]
        plain = sk.SentenceGRPOLoss(**options)(logits, *inputs)
        loss, (logp, entropy) = sk.SentenceGRPOLoss(return_token_scores=True, **options)(logits, *inputs)
        metrics = None
    else:
        logits = case["logits"]
        plain = sk.sentence_grpo_loss(logits, *inputs, **options)
        used = logits * 1.0 if path == "logits in place" else logits
        loss, metrics, (logp, entropy) = sk.sentence_grpo_loss(
            used, *inputs, inplace=path == "logits in place", return_metrics=True, return_token_scores=True,
            **options)
    want_logp, want_entropy = expected_scores(logits, case["completion_ids"], case["segment_ids"], 0.8)
    assert logp.shape == entropy.shape == case["segment_ids"].shape and not logp.requires_grad
    assert logp.dtype == entropy.dtype == torch.float64
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=1e-12, atol=1e-14)
    if metrics is not None:
        assert {"clip_fraction", "ratio_mean", "entropy_mean"} <= set(metrics)
    loss.backward()                                       # the loss keeps its gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "fused linear"])
def test_packed_scores_are_the_padded_calls(backend, path):
    tensors, extras = packed_case(seed=5)
    inputs = [tensors[name] for name in LOSS_INPUTS]
    total, vocab = tensors["logits"].shape
    if path == "logits":
        logits = tensors["logits"]
        loss, (logp, entropy) = sk.sentence_grpo_loss(logits, *inputs, cu_seqlens=extras["cu_seqlens"],
                                                      backend=backend, return_token_scores=True)
    else:
        hidden, weight = head(1, total, vocab)
        hidden = hidden[0].detach().requires_grad_()
        logits = hidden @ weight.T
        loss, (logp, entropy) = sk.fused_linear_sentence_grpo_loss(
            hidden, weight, *inputs, cu_seqlens=extras["cu_seqlens"], chunk_size=3, backend=backend,
            return_token_scores=True)
    want_logp, want_entropy = expected_scores(logits, tensors["completion_ids"], tensors["segment_ids"])
    assert logp.shape == (total,)
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-10, atol=1e-12)


def check_tensor_parallel_scores(rank, world):
    start, stop = shard_range(rank, world)
    case = random_case(batch=3, length=6, vocab=VOCAB, num_slots=4, seed=5)
    inputs = [case[name] for name in LOSS_INPUTS]
    want_logp, want_entropy = expected_scores(case["logits"], case["completion_ids"], case["segment_ids"])
    for backend in BACKENDS[1:]:
        shard = case["logits"].detach()[..., start:stop].clone().requires_grad_()
        _, (logp, entropy) = sk.sentence_grpo_loss(shard, *inputs, backend=backend, beta=0.1,
                                                   tp_group=dist.group.WORLD, return_token_scores=True)
        torch.testing.assert_close(logp, want_logp, rtol=1e-9, atol=1e-12, msg=backend)
        torch.testing.assert_close(entropy, want_entropy, rtol=1e-9, atol=1e-12, msg=backend)


def check_sequence_parallel_scores(rank, world):
    piece = slice(SPLITS[world][rank], SPLITS[world][rank + 1])
    tensors, extras = packed_case(seed=21)
    want_logp, want_entropy = expected_scores(tensors["logits"], tensors["completion_ids"], tensors["segment_ids"])
    mine = sliced(tensors, piece)
    for backend in BACKENDS[1:]:
        _, (logp, entropy) = sk.sentence_grpo_loss(mine["logits"], *[mine[name] for name in LOSS_INPUTS],
                                                   cu_seqlens=extras["cu_seqlens"], sp_group=dist.group.WORLD,
                                                   backend=backend, return_token_scores=True)
        torch.testing.assert_close(logp, want_logp[piece], rtol=1e-10, atol=1e-12, msg=backend)
        torch.testing.assert_close(entropy, want_entropy[piece], rtol=1e-10, atol=1e-12, msg=backend)


@pytest.mark.parametrize("check", [check_tensor_parallel_scores, check_sequence_parallel_scores],
                         ids=["vocabulary-parallel", "sequence-parallel"])
def test_parallel_scores_are_the_one_process_ones(check, tmp_path):
    assert 2 in SHARDS and 2 in SPLITS
    run_on_ranks(functools.partial(check), tmp_path, world=2)


def test_the_flag_is_checked():
    case = random_case(batch=2, length=4, vocab=9, num_slots=3)
    with pytest.raises(TypeError, match="return_token_scores must be a bool"):
        sk.sentence_grpo_loss(*case.values(), return_token_scores="yes")
    with pytest.raises(TypeError, match="return_token_scores must be a bool"):
        sk.SentenceGRPOLoss(return_token_scores=1)
