"""The specification itself: hand-worked cases, gradcheck over the option grid, special cases, edge cases."""

import itertools
import math

import pytest
import torch
from cases import random_case

from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig

LN2 = math.log(2.0)


def loss_of(case, **options):
    return reference.sentence_grpo_loss(case["logits"], case["completion_ids"], case["segment_ids"],
                                        case["advantages"], case["old_logps"], case["ref_logps"],
                                        LossConfig(**options))


def two_way_uniform_case(old, segments, advantages, ref=None):
    """B = 1, V = 2, all logits 0: every token has logp = -ln 2 and softmax [1/2, 1/2]; all ids are 0."""
    length = len(segments)
    return dict(logits=torch.zeros(1, length, 2, dtype=torch.float64, requires_grad=True),
                completion_ids=torch.zeros(1, length, dtype=torch.long),
                segment_ids=torch.tensor([segments]),
                advantages=torch.tensor([advantages], dtype=torch.float64),
                old_logps=torch.tensor([old], dtype=torch.float64),
                ref_logps=None if ref is None else torch.tensor([ref], dtype=torch.float64))


def test_hand_case_both_sentences_clipped():
    # Tokens 0, 1 form sentence 0 (Δ = 0.1 each), token 2 sentence 1 (Δ = -0.5); A = (1, -2).
    # s0: log ρ = 0.2, ρ = e^0.2 = 1.2214 > 1.2, A > 0 -> surr = min(1.2214, 1.2) * 1 = 1.2, L0 = -1.2
    # s1: log ρ = -0.5, ρ = 0.6065 < 0.8, A < 0 -> surr = min(0.6065 * -2, 0.8 * -2) = -1.6, L1 = +1.6
    case = two_way_uniform_case(old=[-LN2 - 0.1, -LN2 - 0.1, -LN2 + 0.5], segments=[0, 0, 1], advantages=[1.0, -2.0])
    # sentence_mean = (1/1) * (1/2) * (-1.2 + 1.6) = 0.2; token_mean = (2 * -1.2 + 1 * 1.6) / 3; sum = 0.4
    assert loss_of(case).item() == pytest.approx(0.2, rel=1e-12)
    assert loss_of(case, reduction="token_mean").item() == pytest.approx(-0.8 / 3, rel=1e-12)
    assert loss_of(case, reduction="sum").item() == pytest.approx(0.4, rel=1e-12)
    # both sentences take their clipped branch: no gradient reaches the logits, and clip_fraction = 2/2
    loss, metrics = reference.sentence_grpo_loss(*case.values(), LossConfig(), return_metrics=True)
    loss.backward()
    assert torch.count_nonzero(case["logits"].grad) == 0
    assert metrics["clip_fraction"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx((math.exp(0.2) + math.exp(-0.5)) / 2, rel=1e-12)


def test_hand_case_mean_ratio_with_kl_and_its_gradient():
    # One sentence of two tokens, Δ = 0.1 each, ref_t - logp_t = 0.3, A = 1, beta = 0.1, ratio_level = "mean".
    # log ρ = (0.1 + 0.1) / 2 = 0.1 -> ρ = e^0.1 inside [0.8, 1.2] -> surr = e^0.1
    # k3 = e^0.3 - 0.3 - 1 per token; KL = mean = e^0.3 - 1.3;  L = -e^0.1 + 0.1 * (e^0.3 - 1.3)
    case = two_way_uniform_case(old=[-LN2 - 0.1] * 2, segments=[0, 0], advantages=[1.0],
                                ref=[-LN2 + 0.3] * 2)
    loss = loss_of(case, ratio_level="mean", beta=0.1)
    assert loss.item() == pytest.approx(-math.exp(0.1) + 0.1 * (math.exp(0.3) - 1.3), rel=1e-12)
    # ∂L/∂logp_t = -A ρ (1/n) + beta (1 - e^{ref - logp}) (1/n), n = 2
    # ∂L/∂logits_t = ∂L/∂logp_t * (onehot(0) - softmax) = ∂L/∂logp_t * (+1/2, -1/2)
    loss.backward()
    coefficient = -math.exp(0.1) / 2 + 0.1 * (1 - math.exp(0.3)) / 2
    expected = torch.tensor([[[coefficient / 2, -coefficient / 2]] * 2], dtype=torch.float64)
    torch.testing.assert_close(case["logits"].grad, expected, rtol=1e-12, atol=0)


def test_hand_case_kl_sum_versus_mean():
    # On-policy (old = logp), so ρ = 1 and surr = A = 0.5; ref - logp = (0.2, -0.4) on the two tokens.
    # k3 = (e^0.2 - 1.2) + (e^-0.4 - 0.6); "sum": L = -0.5 + beta * k3_total, "mean": half of the KL term.
    case = two_way_uniform_case(old=[-LN2, -LN2], segments=[0, 0], advantages=[0.5], ref=[-LN2 + 0.2, -LN2 - 0.4])
    k3_total = (math.exp(0.2) - 1.2) + (math.exp(-0.4) - 0.6)
    assert loss_of(case, beta=0.5, kl_reduction="sum").item() == pytest.approx(-0.5 + 0.5 * k3_total, rel=1e-12)
    assert loss_of(case, beta=0.5).item() == pytest.approx(-0.5 + 0.5 * k3_total / 2, rel=1e-12)


def test_hand_case_padding_empty_sentences_and_empty_rows():
    # On-policy: ρ = 1, so L(i, s) = -A(i, s).
    # row 0: sentences 0 (2 tokens) and 2 (1 token), sentence 1 is empty; A = (1, 99, 3)
    # row 1: no scored token; row 2: sentence 0 (3 tokens), A = -4
    segments = torch.tensor([[0, 0, 2, -1], [-1, -1, -1, -1], [0, 0, 0, -1]])
    case = dict(logits=torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True),
                completion_ids=torch.tensor([[1, 2, 3, -100], [-100] * 4, [4, 0, 1, -100]]),
                segment_ids=segments,
                advantages=torch.tensor([[1.0, 99.0, 3.0], [5.0, 5.0, 5.0], [-4.0, 0.0, 0.0]], dtype=torch.float64),
                old_logps=None, ref_logps=None)
    # sentence_mean = (1/2) [ (1/2)(-1 - 3) + (4) ] = 1;  token_mean = (2*-1 + 1*-3 + 3*4) / 6 = 7/6;  sum = 0
    assert loss_of(case).item() == pytest.approx(1.0, rel=1e-12)
    assert loss_of(case, reduction="token_mean").item() == pytest.approx(7 / 6, rel=1e-12)
    assert loss_of(case, reduction="sum").item() == pytest.approx(0.0, abs=1e-12)
    loss = loss_of(case)
    loss.backward()
    grad = case["logits"].grad
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[:, 3]) == 0   # unscored: no gradient
    assert torch.count_nonzero(grad[0, :3]) > 0 and torch.count_nonzero(grad[2, :3]) > 0


def test_hand_case_delta_caps_the_unclipped_ratio():
    # One token, Δ = 0.5 -> ρ = e^0.5 = 1.6487, A = -1.
    # no delta: surr = min(-1.6487, -1.2) = -1.6487 -> L = e^0.5 (gradient flows through ρ)
    # delta = 1.5: ρ_u = 1.5 -> surr = min(-1.5, -1.2) = -1.5 -> L = 1.5 (capped: no gradient)
    case = two_way_uniform_case(old=[-LN2 - 0.5], segments=[0], advantages=[-1.0])
    assert loss_of(case).item() == pytest.approx(math.exp(0.5), rel=1e-12)
    capped = loss_of(case, delta=1.5)
    assert capped.item() == pytest.approx(1.5, rel=1e-12)
    capped.backward()
    assert torch.count_nonzero(case["logits"].grad) == 0


def test_hand_case_clamp_log_ratio():
    # Δ = 3 -> log ρ clamped to 1 -> ρ = e, A = -1: surr = min(-e, -1.2) = -e, L = e, zero gradient (clamped)
    case = two_way_uniform_case(old=[-LN2 - 3.0], segments=[0], advantages=[-1.0])
    loss = loss_of(case, clamp_log_ratio=1.0)
    assert loss.item() == pytest.approx(math.e, rel=1e-12)
    loss.backward()
    assert torch.count_nonzero(case["logits"].grad) == 0


def test_hand_case_temperature():
    # logits (2 ln 3, 0) / T = 2 -> (ln 3, 0) -> softmax (3/4, 1/4); on-policy, A = 1 -> L = -1
    # ∂L/∂logp = -1;  ∂L/∂logits = (-1 / T) (onehot - softmax) = -1/2 * (1/4, -1/4) = (-1/8, 1/8)
    logits = torch.tensor([[[2 * math.log(3.0), 0.0]]], dtype=torch.float64, requires_grad=True)
    loss = reference.sentence_grpo_loss(logits, torch.tensor([[0]]), torch.tensor([[0]]),
                                        torch.tensor([1.0], dtype=torch.float64), config=LossConfig(temperature=2.0))
    assert loss.item() == pytest.approx(-1.0, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.125, 0.125]]], dtype=torch.float64))
    logp = reference.token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert logp.item() == pytest.approx(math.log(0.75), rel=1e-12)


def test_token_logprobs_entropy_by_hand():
    # softmax (3/4, 1/4): H = -(3/4 ln 3/4 + 1/4 ln 1/4); a -inf logit contributes 0, not NaN
    logits = torch.tensor([[math.log(3.0), 0.0, -math.inf]], dtype=torch.float64)
    logp, entropy = reference.token_logprobs(logits, torch.tensor([1]), return_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.25), rel=1e-12)
    assert entropy.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-12)


OPTION_GRID = list(itertools.product(["sum", "mean"], ["mean", "sum"], ["sentence_mean", "token_mean", "sum"],
                                     [None, 1.3], [0.0, 0.1], [1.0, 0.7]))


@pytest.mark.parametrize("ratio_level,kl_reduction,reduction,delta,beta,temperature", OPTION_GRID)
def test_gradcheck_over_option_grid(ratio_level, kl_reduction, reduction, delta, beta, temperature):
    case = random_case(batch=3, length=6, vocab=5, num_slots=4, seed=len(str(OPTION_GRID)) + int(beta * 10),
                       per_row_advantages=delta is None, old_spread=0.15)
    config = LossConfig(ratio_level=ratio_level, kl_reduction=kl_reduction, reduction=reduction, delta=delta,
                        beta=beta, temperature=temperature)
    function = lambda logits: reference.sentence_grpo_loss(
        logits, case["completion_ids"], case["segment_ids"], case["advantages"], case["old_logps"],
        case["ref_logps"], config)
    assert torch.autograd.gradcheck(function, (case["logits"],), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("objective,kl_estimator,kl_importance_weighting,clip_ratio_c",
                         [("ppo_clip", "k1", True, 1.5), ("ppo_clip", "k2", False, 3.0), ("sapo", "abs", False, None),
                          ("sapo", "k3", True, None), ("geo_mean", "k3", True, None), ("geo_mean", "k2", False, None)])
def test_gradcheck_objectives(objective, kl_estimator, kl_importance_weighting, clip_ratio_c):
    """(cispo's and vespo's gradients are by definition not the derivatives of their values: their weights are
    stopped gradients; see the hand cases below.)"""
    case = random_case(batch=3, length=6, vocab=5, num_slots=4, seed=11, old_spread=0.5)
    config = LossConfig(objective=objective, kl_estimator=kl_estimator, beta=0.3, clip_ratio_c=clip_ratio_c,
                        kl_importance_weighting=kl_importance_weighting, eps_high=1.05 if objective == "cispo" else 0.2)
    function = lambda logits: reference.sentence_grpo_loss(
        logits, case["completion_ids"], case["segment_ids"], case["advantages"], case["old_logps"],
        case["ref_logps"], config)
    assert torch.autograd.gradcheck(function, (case["logits"],), eps=1e-6, atol=1e-8)


def test_dual_clip_and_cispo_by_hand():
    # one sentence of one token, logp − old = log 3 (ρ = 3), Â = −1
    logits = torch.tensor([[[math.log(3.0), 0.0]]], dtype=torch.float64)     # logp(0) = log(3/4)
    ids, segments = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    old = torch.log(torch.tensor([[0.25]], dtype=torch.float64))
    advantage = torch.tensor([-1.0], dtype=torch.float64)
    run = lambda **options: reference.sentence_grpo_loss(logits, ids, segments, advantage, old, None,
                                                         LossConfig(**options)).item()
    assert run() == pytest.approx(3.0)                        # −min(3 · −1, 1.2 · −1) = 3
    assert run(clip_ratio_c=2.0) == pytest.approx(2.0)        # capped at −c · Â = 2
    assert run(objective="cispo", eps_high=5.0) == pytest.approx(3.0 * math.log(0.75))   # −3 · (−1) · log(3/4)
    assert run(objective="cispo", eps_high=2.0) == pytest.approx(2.0 * math.log(0.75))
    # cispo's gradient: the weight min(ρ, eps_high) = 3 is a constant, −w · Â · (onehot − p) = 3 · (0.25, −0.25)
    leaf = logits.clone().requires_grad_()
    reference.sentence_grpo_loss(leaf, ids, segments, advantage, old, None,
                                 LossConfig(objective="cispo", eps_high=5.0)).backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[[0.75, -0.75]]], dtype=torch.float64))


def _two_token_sentence(deltas):
    """One answer, one sentence of two tokens (V = 3) whose log-ratios ``logp − old`` are ``deltas``."""
    logits = torch.tensor([[[0.3, -0.2, 0.9], [1.1, 0.0, -0.4]]], dtype=torch.float64)
    ids, segments = torch.tensor([[2, 0]]), torch.zeros(1, 2, dtype=torch.long)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logits, ids, segments, logp, logp - torch.tensor([deltas], dtype=torch.float64)


@pytest.mark.parametrize("advantage,kept,unclipped", [(1.0, (0.2, -0.5), (False, True)),     # Â > 0: min(Δ, 0.2)
                                                      (-1.0, (0.5, -0.2), (True, False)),    # Â < 0: max(Δ, −0.2)
                                                      (0.0, (0.0, 0.0), (True, True))])
@pytest.mark.parametrize("ratio_level", ["mean", "sum"])
def test_geo_mean_by_hand(advantage, kept, unclipped, ratio_level):
    """GMPO: each token's log-ratio clipped on the side where ``Â`` makes a large move harmful, ``ρ = exp`` of
    their mean (sum), ``L = −Â ρ``; the gradient reaches only the tokens the clip left alone."""
    logits, ids, segments, logp, old = _two_token_sentence((0.5, -0.5))
    leaf = logits.clone().requires_grad_()
    loss, metrics = reference.sentence_grpo_loss(leaf, ids, segments, torch.tensor([advantage], dtype=torch.float64),
                                                 old, None, LossConfig(objective="geo_mean", ratio_level=ratio_level),
                                                 return_metrics=True)
    scale = 0.5 if ratio_level == "mean" else 1.0
    ratio = math.exp(scale * sum(kept))
    assert loss.item() == pytest.approx(-advantage * ratio)
    assert metrics["clip_fraction"].item() == (0.0 if advantage == 0 else 1.0)
    probs = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(ids, 3).double()
    coef = torch.tensor([[-advantage * ratio * scale * keep for keep in unclipped]], dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], coef.unsqueeze(-1) * (onehot - probs))


@pytest.mark.parametrize("advantage,k,lam", [(1.0, 2.0, 3.0), (-0.5, 3.0, 2.0)])
@pytest.mark.parametrize("with_weights", [False, True])
def test_vespo_by_hand(advantage, k, lam, with_weights):
    """VESPO: ``L = −sg(φ(w)) · Â · mean_t log π`` with ``φ(w) = exp(λ + k log w − λ w)`` and ``log w`` the
    sentence's summed log-ratios (whatever ``ratio_level``) plus the log importance weights."""
    logits, ids, segments, logp, old = _two_token_sentence((0.3, 0.2))
    weights = torch.tensor([[1.5, 0.5]], dtype=torch.float64)
    log_w = 0.5 + (math.log(1.5) + math.log(0.5) if with_weights else 0.0)
    phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
    leaf = logits.clone().requires_grad_()
    loss = reference.sentence_grpo_loss(leaf, ids, segments, torch.tensor([advantage], dtype=torch.float64), old,
                                        None, LossConfig(objective="vespo", ratio_level="mean"),
                                        is_weights=weights if with_weights else None)
    assert loss.item() == pytest.approx(-phi * advantage * logp.mean().item())
    loss.backward()
    probs = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(ids, 3).double()
    torch.testing.assert_close(leaf.grad, -phi * advantage / 2 * (onehot - probs))
    assert phi != pytest.approx(1.0, abs=1e-3)                                  # w != 1: the weight acts


def test_normalizer_and_answer_mean_sentence_sum_by_hand():
    case = random_case(batch=3, length=6, vocab=5, num_slots=4, seed=2, old_spread=0.3)
    run = lambda reduction, normalizer=None: reference.sentence_grpo_loss(
        *case.values(), LossConfig(reduction=reduction), normalizer=normalizer)
    total = run("sum")
    assert torch.allclose(run("sum", 4.0), total / 4.0)
    assert torch.allclose(run("token_mean", 10.0) * 10.0, run("token_mean") * (case["segment_ids"] >= 0).sum())
    answers = ((case["segment_ids"] >= 0).sum(1) > 0).sum()
    assert torch.allclose(run("answer_mean_sentence_sum"), total / answers)
    assert torch.allclose(run("answer_mean_sentence_sum", 2.0), total / 2.0)


def test_gradcheck_through_old_and_ref_logps():
    # old and ref log-probs are differentiable inputs too (e.g. when a user trains a critic of them)
    case = random_case(batch=2, length=5, vocab=4, num_slots=3, seed=3)
    inputs = (case["logits"], case["old_logps"].requires_grad_(), case["ref_logps"].requires_grad_())

    def function(logits, old_logps, ref_logps):
        return reference.sentence_grpo_loss(logits, case["completion_ids"], case["segment_ids"], case["advantages"],
                                            old_logps, ref_logps, LossConfig(beta=0.2, ratio_level="mean"))
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-8)


def test_on_policy_equals_old_logps_set_to_current_logps():
    # old_logps=None means old = logp.detach(): ratio 1, and the gradient is the off-policy one at old = logp
    case = random_case(batch=3, length=7, vocab=6, num_slots=4, seed=5, with_old=False)
    with torch.no_grad():
        current = torch.log_softmax(case["logits"], -1).gather(-1, case["completion_ids"].clamp(min=0)[..., None])
    explicit = dict(case, logits=case["logits"].detach().clone().requires_grad_(), old_logps=current.squeeze(-1))
    on_policy, off_policy = loss_of(case, beta=0.1), loss_of(explicit, beta=0.1)
    torch.testing.assert_close(on_policy, off_policy, rtol=1e-14, atol=0)
    on_policy.backward()
    off_policy.backward()
    torch.testing.assert_close(case["logits"].grad, explicit["logits"].grad, rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(case["logits"].grad) > 0


def test_batch_without_scored_tokens_gives_attached_zero():
    case = random_case(batch=2, length=4, vocab=5)
    case["segment_ids"] = torch.full((2, 4), -1)
    for reduction in ("sentence_mean", "token_mean", "sum"):
        loss = loss_of(case, reduction=reduction, beta=0.1)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, case["logits"])
        assert torch.count_nonzero(grad) == 0


def test_non_finite_logits_give_non_finite_loss():
    case = random_case(batch=2, length=4, vocab=5, empty_row=False)
    with torch.no_grad():
        case["logits"][0, 0, 1] = math.nan
    assert not torch.isfinite(loss_of(case))


def test_row_advantages_equal_broadcast_sentence_advantages():
    case = random_case(batch=3, length=8, num_slots=5, per_row_advantages=True, seed=7)
    broadcast = dict(case, advantages=case["advantages"].unsqueeze(1).expand(3, 5).contiguous())
    for options in ({}, {"reduction": "token_mean", "beta": 0.3, "ratio_level": "mean"}):
        torch.testing.assert_close(loss_of(case, **options), loss_of(broadcast, **options), rtol=1e-14, atol=0)


def test_sentence_level_differs_from_token_level():
    # Not a tautology check: grouping tokens into sentences must change the loss when ratios are off-policy.
    case = random_case(batch=2, length=8, num_slots=8, seed=11, per_row_advantages=True, empty_row=False)
    token_level = dict(case, segment_ids=torch.where(case["segment_ids"] >= 0, torch.arange(8), -1))
    assert abs(loss_of(case).item() - loss_of(token_level).item()) > 1e-6


def test_rollout_weights_by_hand():
    """is_mode: exp(old − sampling) per token / summed per sentence / summed per answer; truncate or mask."""
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    sampling = torch.log(torch.tensor([0.25, 1.0, 0.5, 0.1], dtype=torch.float64))   # ratios 2, 0.5, 1, 5
    sentence_of_token, answer_of_token = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 0, 1])
    run = lambda mode, low=None, high=3.0: reference.rollout_weights(   # noqa: E731
        LossConfig(is_mode=mode, is_clip_min=low, is_clip_max=high), old, sampling, sentence_of_token, 3,
        answer_of_token, 2).tolist()
    assert run("token_truncate") == pytest.approx([2.0, 0.5, 1.0, 3.0])
    assert run("token_mask", low=0.6) == pytest.approx([2.0, 0.0, 1.0, 0.0])
    assert run("sentence_truncate") == pytest.approx([1.0, 1.0, 1.0, 3.0])        # 2 · 0.5 = 1 for sentence 0
    assert run("sequence_mask", high=None) == pytest.approx([1.0, 1.0, 1.0, 5.0])  # answer 0: 2 · 0.5 · 1
    nan_sampling = sampling.clone()
    nan_sampling[0] = float("nan")                        # no rollout log-prob: ratio 1 for that token
    config = LossConfig(is_mode="token_truncate")
    assert reference.rollout_weights(config, old, nan_sampling, sentence_of_token, 3, answer_of_token, 2)[0] == 1.0


@pytest.mark.parametrize("options", [dict(), dict(objective="geo_mean", ratio_level="mean", beta=0.1),
                                     dict(entropy_coef=0.05, top_entropy_quantile=0.5, reduction="token_mean"),
                                     dict(objective="vespo", kl_estimator="k2", beta=0.2)])
def test_loss_from_logps_equals_loss_from_logits(options):
    """``sentence_grpo_loss_from_logps`` (what the verl integration calls) with the log-probs and entropies of the
    logits gives the same loss, metrics and logits gradient as ``sentence_grpo_loss``."""
    case = random_case(seed=11)
    config = LossConfig(**options)
    arguments = [case[key] for key in ("segment_ids", "advantages", "old_logps", "ref_logps")]
    loss, metrics = reference.sentence_grpo_loss(case["logits"], case["completion_ids"], *arguments, config,
                                                 return_metrics=True)
    (expected,) = torch.autograd.grad(loss, case["logits"])
    logps, entropy = reference.token_logprobs(case["logits"], case["completion_ids"].clamp(min=0),
                                              return_entropy=True)
    ours, our_metrics = reference.sentence_grpo_loss_from_logps(logps, *arguments, config, return_metrics=True,
                                                                entropy=entropy)
    (gradient,) = torch.autograd.grad(ours, case["logits"])
    torch.testing.assert_close(ours, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    assert metrics.keys() == our_metrics.keys()
    for name, value in metrics.items():
        torch.testing.assert_close(our_metrics[name], value, rtol=1e-12, atol=1e-12)
    if config.entropy_coef:
        with pytest.raises(ValueError, match="entropies"):
            reference.sentence_grpo_loss_from_logps(logps, *arguments, config)
