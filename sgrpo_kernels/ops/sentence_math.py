"""The per-sentence arithmetic the backends share: the objectives' surrogates with their slopes, the KL estimators
with their slopes, the clip rules, VESPO's weight, and the constant token weights of the policy loss (rollout
importance weights, the top-entropy mask, the off-policy mask).

``reference.py`` states the same pieces on its own, as they read in ``docs/design.md``; nothing here is imported
from it, so the float64 tests of every backend against the reference compare two independent statements and an
error here fails them. Everything is elementwise or a per-slot sum: no process groups but the ones passed in.
"""

from __future__ import annotations

import math

import torch

from .. import distributed

VESPO_MIN_LOG_WEIGHT = math.log(1e-8)    # TRL's lower bound of VESPO's log w


def _taylor_coefficients(first: int, last: int) -> tuple[float, ...]:
    """``1/k!`` for ``k = first .. last``, by running division."""
    coefficients, value = [], 1.0 / math.factorial(first)
    for k in range(first, last + 1):
        coefficients.append(value)
        value /= k + 1
    return tuple(coefficients)


# e^x − x − 1 = x² · Σ_{k ≥ 2} x^(k−2) / k!; the terms past 1/17! are below 1e-20 of the sum where |x| < 1/2
K3_TERMS = _taylor_coefficients(2, 17)
K3_SERIES_BOUND = 0.5


def k3(x: torch.Tensor) -> torch.Tensor:
    """``e^x − x − 1`` without the cancellation near 0: the Taylor series (Horner) where ``|x| < 1/2`` (the Triton
    and C++ kernels evaluate the same series), ``expm1(x) − x`` elsewhere."""
    inside = x.abs() < K3_SERIES_BOUND
    t = torch.where(inside, x, torch.zeros_like(x))
    polynomial = torch.full_like(t, K3_TERMS[-1])
    for coefficient in K3_TERMS[-2::-1]:
        polynomial = torch.addcmul(torch.full_like(t, coefficient), polynomial, t)
    return torch.where(inside, t.square() * polynomial, torch.expm1(x) - x)


def kl_value(x: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate at ``x = log π_ref − log π``: ``k3``, ``k1 = −x``, ``k2 = x²/2``, ``abs = |x|``."""
    estimates = {"k1": lambda: x.neg(), "k2": lambda: 0.5 * x.square(), "abs": lambda: x.abs(), "k3": lambda: k3(x)}
    return estimates[estimator]()


def kl_slope(x: torch.Tensor, estimator: str) -> torch.Tensor:
    """``∂kl_t / ∂logp_t`` at ``x = log π_ref − log π`` (k3's ``1 − e^x`` as ``−expm1(x)``, which does not cancel
    near 0)."""
    slopes = {"k1": lambda: torch.ones_like(x), "k2": lambda: x.neg(), "abs": lambda: x.sign().neg(),
              "k3": lambda: torch.expm1(x).neg()}
    return slopes[estimator]()


def vespo_weight(log_ratio_sum: torch.Tensor, log_is: torch.Tensor | None, advantage: torch.Tensor,
                 config) -> torch.Tensor:
    """VESPO's gamma weight ``φ(w) = e^(λ + k·log w − λ·w)`` per sentence: ``log w`` the sentence's summed token
    log-ratio (plus its summed log importance weights) clamped to ``[log 1e-8, clamp_log_ratio]``, ``(k, λ)`` the
    ``_pos`` pair where ``Â >= 0``, else ``_neg``; a weight that is not finite counts 0 (TRL)."""
    log_w = log_ratio_sum if log_is is None else log_ratio_sum + log_is
    log_w = torch.clamp(log_w, min=VESPO_MIN_LOG_WEIGHT, max=config.clamp_log_ratio)
    nonnegative = advantage >= 0
    k = torch.where(nonnegative, torch.full_like(log_w, config.vespo_k_pos), torch.full_like(log_w, config.vespo_k_neg))
    lam = torch.where(nonnegative, torch.full_like(log_w, config.vespo_lambda_pos),
                      torch.full_like(log_w, config.vespo_lambda_neg))
    phi = torch.exp(lam * (1 - log_w.exp()) + k * log_w)
    return torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))


def geo_clip(token_delta: torch.Tensor, advantage: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """``geo_mean``'s clipped token log-ratio (``min(Δ, eps_high)`` where ``Â > 0``, ``max(Δ, −eps_low)`` where
    ``Â < 0``, 0 where ``Â = 0``; NaN passes) and where the clip acted."""
    upper = torch.where(token_delta > config.eps_high, config.eps_high, token_delta)
    lower = torch.where(token_delta < -config.eps_low, -config.eps_low, token_delta)
    kept = torch.where(advantage > 0, upper, torch.where(advantage < 0, lower, 0.0))
    clipped = ((advantage > 0) & (token_delta > config.eps_high)) | ((advantage < 0) & (token_delta < -config.eps_low))
    return kept, clipped


def policy_surrogate_and_slope(ratio: torch.Tensor, advantage: torch.Tensor, config):
    """The per-sentence policy surrogate of ``ppo_clip`` (with ``delta`` and the dual clip) or ``sapo``, and its
    derivative with respect to ``log ρ``."""
    if config.objective == "sapo":
        # τ in the dtype of Â (a where() of two Python floats would round them to float32)
        tau = torch.where(advantage > 0, torch.full_like(advantage, config.sapo_tau_pos),
                          torch.full_like(advantage, config.sapo_tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1))
        return gate * 4 / tau * advantage, 4 * gate * (1 - gate) * ratio * advantage
    # min(ρ_u·Â, clip(ρ)·Â); on a tie both branches share the gradient, as in torch.minimum/maximum
    unclipped, unclipped_slope = ratio, ratio
    if config.delta is not None:
        unclipped = ratio.clamp(max=config.delta)
        unclipped_slope = torch.where(ratio <= config.delta, ratio, 0.0)
    low, high = 1 - config.eps_low, 1 + config.eps_high
    clipped = ratio.clamp(low, high)
    clipped_slope = torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)
    unclipped_term, clipped_term = unclipped * advantage, clipped * advantage
    surrogate = torch.minimum(unclipped_term, clipped_term)
    slope = torch.where(unclipped_term < clipped_term, unclipped_slope,
                        torch.where(unclipped_term > clipped_term, clipped_slope,
                                    0.5 * (unclipped_slope + clipped_slope))) * advantage
    if config.clip_ratio_c is not None:         # dual clip: where Â < 0, max(surrogate, c·Â)
        floor = config.clip_ratio_c * advantage
        dual_slope = torch.where(surrogate > floor, slope, torch.where(surrogate < floor, 0.0, 0.5 * slope))
        slope = torch.where(advantage < 0, dual_slope, slope)
        surrogate = torch.where(advantage < 0, torch.maximum(surrogate, floor), surrogate)
    return surrogate, slope


def clipped_sentences(ratio: torch.Tensor, advantage: torch.Tensor, config,
                      clipped_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The sentences the objective clipped (the clip fraction's numerator): the active clip branch of
    ``ppo_clip`` (ratio past the bound on the side of ``Â``'s sign, or past the dual clip where ``Â < 0``), a
    capped ``cispo`` weight, a ``geo_mean`` sentence with a clipped token; ``sapo`` and ``vespo`` never clip."""
    objective = config.objective
    if objective in ("sapo", "vespo"):
        return torch.zeros(ratio.shape, dtype=torch.bool, device=ratio.device)
    if objective == "geo_mean":
        return clipped_tokens > 0
    if objective == "cispo":
        return ratio > config.eps_high
    positive, negative = advantage > 0, advantage < 0
    above = positive & (ratio > 1 + config.eps_high)
    below = negative & (ratio < 1 - config.eps_low)
    dual = negative & (ratio > config.clip_ratio_c) if config.clip_ratio_c is not None else torch.zeros_like(above)
    return above | below | dual


# ---- constant token weights of the policy loss ----------------------------------------------------------------

def _per_group_sum(values: torch.Tensor, groups: torch.Tensor, count: int, sequence_total=None) -> torch.Tensor:
    """``values [M]`` summed per group index ``[M]`` in ``[0, count)``, across the ranks of a shared sequence when
    ``sequence_total`` is given."""
    sums = values.new_zeros(count).index_add_(0, groups, values)
    return sums if sequence_total is None else sequence_total(sums)


def rollout_importance(config, old_logps, sampling_logps, slots, total_slots: int, answer_of_token, answers: int,
                       sequence_total=None) -> torch.Tensor:
    """``is_mode``'s weights ``[M]``: ``exp(old − sampling)`` of the token, or of its sum over the token's sentence
    or answer, truncated to ``[is_clip_min, is_clip_max]`` (``*_truncate``) or 0 outside it (``*_mask``); a NaN
    sampling log-prob counts as ratio 1 (TRL)."""
    log_ratio = torch.nan_to_num(old_logps - sampling_logps, nan=0.0)
    unit = config.is_mode.partition("_")[0]
    if unit == "sentence":
        log_ratio = _per_group_sum(log_ratio, slots, total_slots, sequence_total)[slots]
    elif unit == "sequence":
        log_ratio = _per_group_sum(log_ratio, answer_of_token, answers, sequence_total)[answer_of_token]
    weight = log_ratio.exp()
    low = config.is_clip_min if config.is_clip_min is not None else -math.inf
    high = config.is_clip_max if config.is_clip_max is not None else math.inf
    if config.is_mode.endswith("_mask"):
        return torch.where((weight < low) | (weight > high), torch.zeros_like(weight), weight)
    return weight.clamp(min=low, max=high)


def top_entropy_mask(entropy: torch.Tensor, quantile: float, process_group=None) -> torch.Tensor:
    """The tokens whose entropy is at least the ``(1 − quantile)`` quantile of every scored token's (over the
    ranks of ``process_group``), ``[M]`` bool."""
    pooled = entropy if process_group is None else distributed.gather_rows(entropy, process_group)[0]
    if pooled.numel() == 0:
        return torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device)
    threshold = torch.quantile(pooled.double(), 1.0 - quantile)
    return entropy >= threshold.to(entropy.dtype)


def off_policy_keep(threshold: float, logp, behaviour_logps, token_advantage, slots, total_slots: int,
                    sequence_total=None) -> torch.Tensor:
    """1 for the tokens whose policy loss stays, 0 for those of a sentence with ``Â < 0`` whose mean
    ``log π_behaviour − log π`` exceeds ``threshold`` (DeepSeek-V3.2's off-policy mask), ``[M]`` in ``logp``'s
    dtype."""
    drift = torch.nan_to_num(behaviour_logps - logp, nan=0.0)
    mean_drift = (_per_group_sum(drift, slots, total_slots, sequence_total)
                  / _per_group_sum(torch.ones_like(drift), slots, total_slots, sequence_total).clamp(min=1))[slots]
    drop = (token_advantage < 0) & (mean_drift > threshold)
    return (~drop).to(logp.dtype)


def policy_token_weights(config, logp, entropy_of, sampling_logps, old_logps, token_advantage, slots,
                         total_slots: int, is_weights, process_group=None, answer_of_token=None, answers: int = 0,
                         sequence_total=None):
    """``(entropy_mask [M] bool or None, q_t [M] or None, log importance weights [M] or None)`` for the scored
    tokens: ``q_t`` multiplies each token's policy loss (``is_weights`` or ``is_mode``'s weights, times the masks;
    ``None`` when all are 1), except under ``vespo``, whose importance weights enter its sentence weight instead:
    then their logs, clamped to ``[log 1e-8, clamp_log_ratio]``, come third. ``entropy_of()`` gives the ``[M]``
    entropies (called only for the top-entropy mask); ``slots`` the tokens' sentence slots in
    ``[0, total_slots)``; ``answer_of_token``/``answers`` group them by answer for the sequence modes."""
    importance = (is_weights if config.is_mode is None else
                  rollout_importance(config, old_logps, sampling_logps, slots, total_slots, answer_of_token, answers,
                                     sequence_total))
    folded = config.objective == "vespo" and importance is not None          # into vespo's weight, not into q_t
    log_importance = (torch.clamp(importance.log(), min=VESPO_MIN_LOG_WEIGHT, max=config.clamp_log_ratio)
                      if folded else None)
    factors = [] if importance is None or folded else [importance]
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = top_entropy_mask(entropy_of().detach(), config.top_entropy_quantile, process_group)
        factors.append(entropy_mask.to(logp.dtype))
    if config.off_policy_mask_threshold is not None:
        behaviour = next(value for value in (sampling_logps, old_logps, logp) if value is not None)
        factors.append(off_policy_keep(config.off_policy_mask_threshold, logp, behaviour, token_advantage, slots,
                                       total_slots, sequence_total))
    weight = None
    for factor in factors:
        weight = factor if weight is None else weight * factor
    return entropy_mask, weight, log_importance
