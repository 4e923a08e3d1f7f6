"""Packed (padding-free) inputs: every entry point with ``cu_seqlens`` equals the padded call on the same tokens
(``reference.pad_packed``, the layout's statement) in float64, for every backend and option; no ``[B, T_max]``
tensor is allocated; a malformed ``cu_seqlens`` is one ``ValueError`` before any work."""

import itertools
import os

import pytest
import torch
from cases import assert_relative_close, native_unavailable

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import IS_MODES, KL_ESTIMATORS, OBJECTIVES, REDUCTIONS

LENGTHS = (5, 0, 1, 9, 3, 0, 7)        # empty answers, a one-token answer, odd lengths


def offsets(lengths) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64).cumsum(0)])


def packed_segments(lengths, num_slots: int, generator, level: str = "sentence", unscored: float = 0.15):
    """``[N]`` segment ids: per answer non-decreasing from 0 with skips (empty sentences), at most
    ``num_slots - 1``, a share of unscored (-1) tokens; ``level="token"``: the position in the answer,
    ``"output"``: 0."""
    cu = offsets(lengths)
    total = int(cu[-1])
    answer = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    position = torch.arange(total) - cu[:-1][answer]
    if level == "token":
        segments = position
    elif level == "output":
        segments = torch.zeros(total, dtype=torch.int64)
    else:
        steps = (torch.rand(total, generator=generator) < 0.3).long()
        steps = steps * (1 + (torch.rand(total, generator=generator) < 0.15).long())
        steps[position == 0] = 0
        running = steps.cumsum(0)
        segments = (running - running[cu[:-1].clamp(max=max(total - 1, 0))][answer]).clamp(max=num_slots - 1)
    return torch.where(torch.rand(total, generator=generator) < unscored, -1, segments)


def packed_case(lengths=LENGTHS, vocab=11, num_slots=4, seed=0, level="sentence", per_answer_advantages=False,
                unscored=0.15):
    """A dict of packed float64 loss inputs (``logits`` ``[N, V]``) and the keywords ``cu_seqlens``,
    ``sampling_logps``, ``is_weights`` (``[N]``)."""
    generator = torch.Generator().manual_seed(seed)
    cu = offsets(lengths)
    total = int(cu[-1])
    logits = torch.randn(total, vocab, generator=generator, dtype=torch.float64) * 2
    segment_ids = packed_segments(lengths, num_slots, generator, level, unscored)
    if level == "token":
        num_slots = max(max(lengths), 1)
    completion_ids = torch.randint(0, vocab, (total,), generator=generator)
    completion_ids[segment_ids < 0] = -100
    true_logps = torch.log_softmax(logits, -1).gather(-1, completion_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    noise = lambda: torch.randn(total, generator=generator, dtype=torch.float64) * 0.4  # noqa: E731
    old_logps = true_logps + noise()
    shape = (len(lengths),) if per_answer_advantages else (len(lengths), num_slots)
    tensors = dict(logits=logits, completion_ids=completion_ids, segment_ids=segment_ids,
                   advantages=torch.randn(shape, generator=generator, dtype=torch.float64), old_logps=old_logps,
                   ref_logps=true_logps + noise())
    extras = dict(cu_seqlens=cu, sampling_logps=old_logps + noise(),
                  is_weights=0.5 + torch.rand(total, generator=generator, dtype=torch.float64))
    return tensors, extras


def padded(tensors: dict, extras: dict) -> tuple[dict, dict]:
    """The same tokens as a right-padded ``[B, T_max]`` batch (segment ids -1 on padding)."""
    cu = extras["cu_seqlens"]
    fills = dict(segment_ids=-1, completion_ids=0)
    tensors = {name: value if name == "advantages" else reference.pad_packed(value, cu, fills.get(name, 0))
               for name, value in tensors.items()}
    extras = {name: reference.pad_packed(value, cu, 1 if name == "is_weights" else 0)
              for name, value in extras.items() if name != "cu_seqlens"}
    return tensors, extras


def real_tokens(cu: torch.Tensor) -> torch.Tensor:
    """``[B, T_max]`` bool: where the padded batch holds a packed token."""
    return reference.pad_packed(torch.ones(int(cu[-1]), dtype=torch.bool), cu, False)


def run(tensors, extras, backend, path="logits", inplace=False, chunk_size=3, **options):
    """Loss, gradients (of logits, or of hidden, weight and bias) and metrics of one call."""
    tensors = dict(tensors)
    kept = ("cu_seqlens", *options.pop("keep", ()))       # keep: the extras the call takes besides cu_seqlens
    extras = {name: extras[name] for name in kept if name in extras}
    if path == "logits":
        logits = tensors.pop("logits").clone().requires_grad_()
        # a non-leaf view for inplace=True, whose gradient lands in the overwritten logits
        leaf = logits.clone() if inplace else logits
        loss, metrics = sk.sentence_grpo_loss(leaf, *tensors.values(), backend=backend, return_metrics=True,
                                              inplace=inplace, **extras, **options)
        loss.backward()
        return loss.detach(), [logits.grad], metrics
    hidden, weight, bias = (tensor.clone().requires_grad_() for tensor in path)
    tensors.pop("logits")
    loss, metrics = sk.fused_linear_sentence_grpo_loss(hidden, weight, *tensors.values(), bias=bias,
                                                       chunk_size=chunk_size, backend=backend, return_metrics=True,
                                                       **extras, **options)
    loss.backward()
    return loss.detach(), [hidden.grad, weight.grad, bias.grad], metrics


def check_packed_equals_padded(tensors, extras, backend, rel=1e-10, path="logits", inplace=False, **options):
    """The packed call of ``backend`` against ``reference.py`` on the padded batch, in float64."""
    loss, grads, metrics = run(tensors, extras, backend, path, inplace, **options)
    padded_tensors, padded_extras = padded(tensors, extras)
    if path != "logits":
        hidden, weight, bias = path
        padded_tensors["logits"] = reference.pad_packed(hidden @ weight.T + bias, extras["cu_seqlens"])
        padded_path = (reference.pad_packed(hidden, extras["cu_seqlens"]), weight, bias)
    gold_loss, gold_grads, gold_metrics = run(padded_tensors, padded_extras, "reference",
                                              "logits" if path == "logits" else padded_path, **options)
    assert_relative_close(loss, gold_loss, rel, "loss")
    if gold_grads[0] is not None:
        gold_grads[0] = gold_grads[0][real_tokens(extras["cu_seqlens"])]
    for got, want in zip(grads, gold_grads, strict=True):
        assert_relative_close(got, want, rel, "gradient")
    assert set(metrics) == set(gold_metrics)
    for name, value in gold_metrics.items():
        assert_relative_close(metrics[name], value, rel, name)
    return loss


@pytest.fixture(params=["reference", "torch", "native", "triton"])
def any_backend(request):
    """Every backend, the reference included (its packed path pads); as ``conftest.backend`` for the others."""
    return available(request.param)


def available(name: str) -> str:
    """``name``, or a skip where its backend cannot run here (as the ``backend`` fixture does)."""
    if name == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    if name == "native" and native_unavailable() is not None:
        pytest.skip(native_unavailable())
    return name


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_and_reduction(any_backend, objective):
    tensors, extras = packed_case(seed=1)
    estimators = itertools.cycle(KL_ESTIMATORS)
    for index, reduction in enumerate(REDUCTIONS):
        options = dict(objective=objective, reduction=reduction, beta=0.1, kl_estimator=next(estimators),
                       kl_importance_weighting=index % 2 == 1, ratio_level=("sum", "mean")[index % 2],
                       eps_high=1.3 if objective == "cispo" else 0.2, temperature=0.7 if index == 2 else 1.0,
                       entropy_coef=0.05 if index == 3 else 0.0)
        if objective == "ppo_clip":
            options.update(clip_ratio_c=2.0, delta=1.4 if index == 1 else None)
        if index == 4:
            options["normalizer"] = 3.5
        check_packed_equals_padded(tensors, extras, any_backend, **options)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rollout_weights_masks_and_levels(any_backend, objective):
    """Every is_mode (sentence and sequence ones group by sentence and answer), token weights [N], both masks,
    per-answer advantages at the token and output levels."""
    checked = 0
    for index, is_mode in enumerate((None, *IS_MODES)):
        level = ("sentence", "token", "output")[index % 3]
        tensors, extras = packed_case(seed=2 + index, level=level, per_answer_advantages=level != "sentence")
        options = dict(objective=objective, is_mode=is_mode, is_clip_min=0.7, is_clip_max=1.6, beta=0.05,
                       reduction=REDUCTIONS[index % len(REDUCTIONS)], eps_high=1.3 if objective == "cispo" else 0.2,
                       keep=("sampling_logps",) if is_mode else ("is_weights",))
        if index % 2:
            options["off_policy_mask_threshold"] = 0.1
        if index % 3 == 2:
            options.update(top_entropy_quantile=0.6, entropy_coef=0.02)
        if objective == "vespo" and is_mode is not None and not is_mode.startswith("token"):
            continue
        check_packed_equals_padded(tensors, extras, any_backend, **options)
        checked += 1
    assert checked == (3 if objective == "vespo" else 7)


def test_fused_linear_equals_padded(any_backend):
    """hidden ``[N, H]``: chunks of 3 tokens, so long sentences are visited twice."""
    tensors, extras = packed_case(seed=3)
    generator = torch.Generator().manual_seed(8)
    total, vocab = tensors["logits"].shape
    path = (torch.randn(total, 6, generator=generator, dtype=torch.float64),
            torch.randn(vocab, 6, generator=generator, dtype=torch.float64) * 0.5,
            torch.randn(vocab, generator=generator, dtype=torch.float64) * 0.1)
    for objective, reduction in (("ppo_clip", "sentence_mean"), ("geo_mean", "answer_mean_token_sum"),
                                 ("cispo", "token_mean")):
        check_packed_equals_padded(tensors, extras, any_backend, path=path, objective=objective, reduction=reduction,
                                   beta=0.1, entropy_coef=0.03, eps_high=1.3 if objective == "cispo" else 0.2,
                                   keep=("is_weights",))
    check_packed_equals_padded(tensors, extras, any_backend, path=path, top_entropy_quantile=0.5,
                               off_policy_mask_threshold=0.1, is_mode="sequence_truncate",
                               keep=("sampling_logps",))


def test_inplace_gradient(backend):
    tensors, extras = packed_case(seed=4)
    check_packed_equals_padded(tensors, extras, backend, inplace=True, beta=0.1, reduction="answer_mean_sentence_sum")


def test_module_with_packed_inputs(backend):
    tensors, extras = packed_case(seed=5)
    module = sk.SentenceGRPOLoss(beta=0.1, backend=backend)
    logits = tensors["logits"].clone().requires_grad_()
    loss = module(logits, *list(tensors.values())[1:], cu_seqlens=extras["cu_seqlens"])
    expected = sk.sentence_grpo_loss(*padded(tensors, extras)[0].values(), beta=0.1, backend="reference")
    assert_relative_close(loss, expected, 1e-10, "loss")


def test_group_advantages_feed_packed_inputs(backend):
    """Advantages from ``group_sentence_advantages`` of the answers' sentence rewards, packed and padded alike."""
    tensors, extras = packed_case(seed=6)
    lengths = torch.tensor(LENGTHS)
    generator = torch.Generator().manual_seed(3)
    rewards = torch.rand(len(LENGTHS) + 1, 4, generator=generator, dtype=torch.float64)
    counts = torch.where(lengths > 0, torch.randint(1, 5, (len(LENGTHS),), generator=generator), 0)
    counts = torch.cat([counts, torch.tensor([2])])                       # 8 answers: two groups of 4
    advantages = sk.group_sentence_advantages(rewards, counts, group_size=4, backend=backend)[:len(LENGTHS)]
    check_packed_equals_padded(dict(tensors, advantages=advantages), extras, backend)


def test_token_logprobs_packed(backend):
    tensors, extras = packed_case(seed=7)
    cu = extras["cu_seqlens"]
    logits, ids = tensors["logits"], tensors["completion_ids"].clamp(min=0)
    logp, entropy = sk.token_logprobs(logits, ids, cu_seqlens=cu, return_entropy=True, backend=backend)
    want_logp, want_entropy = reference.token_logprobs(logits, ids, return_entropy=True)
    assert_relative_close(logp, want_logp, 1e-12, "logp")
    assert_relative_close(entropy, want_entropy, 1e-12, "entropy")
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(logits.shape[0], 5, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(logits.shape[1], 5, generator=generator, dtype=torch.float64).requires_grad_()
    fused = sk.fused_linear_token_logprobs(hidden, weight, ids, cu_seqlens=cu, chunk_size=4, backend=backend)
    fused.sum().backward()
    expected = reference.token_logprobs(hidden @ weight.T, ids)
    assert fused.shape == ids.shape
    assert_relative_close(fused, expected, 1e-12, "fused logp")
    gold_hidden, gold_weight = torch.autograd.grad(expected.sum(), (hidden, weight))
    assert_relative_close(hidden.grad, gold_hidden, 1e-10, "grad hidden")
    assert_relative_close(weight.grad, gold_weight, 1e-10, "grad weight")


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_answers_of_a_hundred_thousand_tokens(backend_name):
    """A few long answers (up to 100 000 tokens, sentences of random length) with a vocabulary of 3."""
    backend = available(backend_name)
    lengths = (100_000, 1, 0, 31_337, 2)
    tensors, extras = packed_case(lengths, vocab=3, num_slots=4000, seed=9)
    check_packed_equals_padded(tensors, extras, backend, rel=1e-9, beta=0.1, ratio_level="mean")
    generator = torch.Generator().manual_seed(1)
    path = (torch.randn(tensors["logits"].shape[0], 4, generator=generator, dtype=torch.float64),
            torch.randn(3, 4, generator=generator, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    check_packed_equals_padded(tensors, extras, backend, rel=1e-9, path=path, chunk_size=4096, beta=0.1,
                               reduction="token_mean")


def largest_allocation(function) -> int:
    """The largest block of CPU memory (bytes) allocated at once while ``function()`` runs: every allocation is
    reported to the profiler inside the op that makes it, so the largest memory an op holds beyond its children's
    bounds it (a ``[B, T_max]`` tensor of any dtype is at least ``B·T_max`` bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    return max((event.self_cpu_memory_usage for event in profiler.events()), default=0)


def test_largest_allocation_sees_allocations():
    """The tracker of the next test: it finds an allocation of a known size inside nested code."""
    def work():
        torch.zeros(3_000_000, dtype=torch.bool).logical_not_()
        torch.randn(1000, 7).sum()
    assert 3_000_000 <= largest_allocation(work) < 3_100_000


@pytest.mark.parametrize("path", ["logits", "fused linear"])
@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_no_tensor_of_batch_times_longest_answer(backend_name, path):
    """One answer of 100 000 tokens and 999 of one token, token-level segments (``S_max = T_max``) with one
    advantage per answer: a ``[B, T_max]`` (or ``[B, S_max]``) tensor would take at least ``B·T_max`` bytes = 100 MB
    (800 MB in int64), while what the packed call needs is ``O(N)``."""
    backend = available(backend_name)
    lengths = (100_000,) + (1,) * 999
    batch, longest = len(lengths), max(lengths)
    tensors, extras = packed_case(lengths, vocab=2, seed=10, level="token", per_answer_advantages=True,
                                  unscored=0.05)
    total = tensors["logits"].shape[0]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(total, 4, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(2, 4, generator=generator, dtype=torch.float64).requires_grad_()
    logits = tensors.pop("logits").requires_grad_()

    def step():
        if path == "logits":
            loss = sk.sentence_grpo_loss(logits, *tensors.values(), beta=0.1, backend=backend,
                                         cu_seqlens=extras["cu_seqlens"])
        else:
            loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *tensors.values(), beta=0.1, backend=backend,
                                                      cu_seqlens=extras["cu_seqlens"], chunk_size=8192)
        loss.backward()

    largest = largest_allocation(step)
    assert largest < batch * longest, f"an allocation of {largest} bytes >= B·T_max = {batch * longest}"
    # the tracker does see the gradient: of the logits [N, 2], or of the hidden states [N, 4] (float64)
    assert largest >= total * (2 if path == "logits" else 4) * 8
    assert torch.isfinite(logits.grad if path == "logits" else hidden.grad).all()


MALFORMED = {
    "does not start at 0": lambda cu: cu + 1,
    "decreases": lambda cu: torch.cat([cu[:2], cu[1:2] - 1, cu[3:]]),
    "does not end at N": lambda cu: torch.cat([cu[:-1], cu[-1:] - 1]),
    "float dtype": lambda cu: cu.double(),
    "two dimensions": lambda cu: cu.unsqueeze(0),
    "a list": lambda cu: cu.tolist(),
}
MESSAGES = {"does not start at 0": "must start at 0", "decreases": "must be non-decreasing",
            "does not end at N": "must end at the number of packed tokens N = 25", "float dtype":
            "must have an integer dtype", "two dimensions": "must be 1-D", "a list": "must be a torch.Tensor"}


@pytest.mark.parametrize("entry", ["loss", "reference loss", "fused linear", "module", "token_logprobs",
                                   "fused token_logprobs"])
@pytest.mark.parametrize("flaw", list(MALFORMED))
def test_malformed_cu_seqlens_is_one_value_error_before_any_work(entry, flaw, monkeypatch):
    from sgrpo_kernels.ops.torch import passes

    def refuse(*args, **kwargs):
        raise AssertionError("a pass ran before cu_seqlens was checked")
    monkeypatch.setattr(passes, "token_scores", refuse)
    monkeypatch.setattr(reference, "pad_packed", refuse)
    tensors, extras = packed_case(seed=11)
    cu = MALFORMED[flaw](extras["cu_seqlens"])
    logits = tensors.pop("logits").requires_grad_()
    hidden = torch.randn(logits.shape[0], 3, dtype=torch.float64)
    weight = torch.randn(logits.shape[1], 3, dtype=torch.float64)
    ids = tensors["completion_ids"].clamp(min=0)
    calls = {
        "loss": lambda: sk.sentence_grpo_loss(logits, *tensors.values(), backend="torch", cu_seqlens=cu),
        "reference loss": lambda: sk.sentence_grpo_loss(logits, *tensors.values(), backend="reference",
                                                        cu_seqlens=cu),
        "fused linear": lambda: sk.fused_linear_sentence_grpo_loss(hidden, weight, *tensors.values(),
                                                                   backend="torch", cu_seqlens=cu),
        "module": lambda: sk.SentenceGRPOLoss(backend="torch")(logits, *tensors.values(), cu_seqlens=cu),
        "token_logprobs": lambda: sk.token_logprobs(logits, ids, backend="torch", cu_seqlens=cu),
        "fused token_logprobs": lambda: sk.fused_linear_token_logprobs(hidden, weight, ids, backend="torch",
                                                                       cu_seqlens=cu),
    }
    with pytest.raises(ValueError, match=f"cu_seqlens {MESSAGES[flaw]}"):
        calls[entry]()


def test_packed_shapes_are_checked():
    tensors, extras = packed_case(seed=12)
    cu = extras["cu_seqlens"]
    with pytest.raises(ValueError, match=r"logits must have shape \[N, V\] for packed inputs"):
        sk.sentence_grpo_loss(tensors["logits"].unsqueeze(0), *list(tensors.values())[1:], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\] or \[B, S_max\] with B=7"):
        sk.sentence_grpo_loss(*list(tensors.values())[:3], tensors["advantages"][:5], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"is_weights of packed inputs must have shape \[N\]"):
        sk.sentence_grpo_loss(*tensors.values(), cu_seqlens=cu, is_weights=torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sampling_logps must have shape \[N\]"):
        sk.sentence_grpo_loss(*tensors.values(), cu_seqlens=cu, sampling_logps=torch.ones(7, 2, dtype=torch.float64))
