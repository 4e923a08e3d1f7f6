"""Pass B in Triton: per-sentence sums, ratio, clipping, KL, loss terms and the per-token gradient coefficient.

Three small kernels; the reduction weights come from ``ops/layout.py`` (they need no logits):

1. ``_sentence_sums_kernel`` (a program per block of tokens): ``Σ Δ_t`` and ``Σ k3_t`` of every sentence,
   accumulated with fp64 atomics so the fp32 result does not depend on their order.
2. ``_sentence_terms_kernel`` (a program per block of sentence slots): the ratio, the clipped surrogate,
   ``w · L(i, s)``, and ``∂loss/∂logp_t`` split into a per-sentence part and a per-token KL part.
3. ``_token_coef_kernel`` (a program per block of tokens): ``c_t = ∂loss/∂logp_t``.

Kernels 1 and 3 take an optional list of flat token positions, so the fused linear path can run them on
the tokens of one chunk; log-probs and segment ids are always addressed by flat position in ``[B*T]``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...config import LossConfig
from ..layout import SentenceLayout, SentenceSums, SentenceTerms
from ..passes import KL_ESTIMATOR_CODES, OBJECTIVE_CODES, float_vector, index_vector, new_output
from ..sentence_math import VESPO_MIN_LOG_WEIGHT
from .common import COMPILE_OPTIONS, as_dtype

NAN = tl.constexpr(tl.PropagateNan.ALL)
VESPO_LOWEST = tl.constexpr(VESPO_MIN_LOG_WEIGHT)  # a NaN log-prob must give a NaN loss, as torch.clamp/minimum do
TOKEN_BLOCK = 1024
SLOT_BLOCK = 256


@triton.jit
def _listed_tokens(tokens_ptr, segment_ids_ptr, num_tokens, length, num_slots, HAS_INDEX: tl.constexpr,
                   BLOCK: tl.constexpr):
    """This program's block of list positions, their flat token positions (the list is ``tokens_ptr`` when
    ``HAS_INDEX``, else all tokens), whether each is scored, and its sentence slot."""
    position = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = position < num_tokens
    token = position
    if HAS_INDEX:
        token = tl.load(tokens_ptr + position, mask=in_range, other=0)
    segment = tl.load(segment_ids_ptr + token, mask=in_range, other=-1).to(tl.int64)
    return position, in_range, token, segment >= 0, (token // length) * num_slots + segment


@triton.jit
def _k3(x):
    """DeepSeekMath's ``k3 = exp(x) − x − 1`` at ``x = ref − logp``, accurate near 0, where k3 ≈ x²/2 and the
    direct form cancels (10–40 % off in fp32 at |x| ≈ 1e-3): the Taylor series ``x² Σ_k x^k/(k+2)!`` (to x¹⁷,
    below fp64 rounding) for |x| < 1/2, the direct form beyond (where it loses at most a few ulps)."""
    series = 1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (1 / 5040 + x * (
        1 / 40320 + x * (1 / 362880 + x * (1 / 3628800 + x * (1 / 39916800 + x * (1 / 479001600 + x * (
            1 / 6227020800 + x * (1 / 87178291200 + x * (1 / 1307674368000 + x * (
                1 / 20922789888000 + x / 355687428096000))))))))))))))
    return tl.where(tl.abs(x) < 0.5, x * x * series, tl.exp(x) - x - 1.0)


@triton.jit
def _kl_value(x, kl_estimator):
    """``reference.kl_estimate`` at ``x = ref − logp``: 0 k3, 1 k1, 2 k2, 3 abs (a runtime selector)."""
    return tl.where(kl_estimator == 1, -x, tl.where(kl_estimator == 2, 0.5 * x * x,
                                                    tl.where(kl_estimator == 3, tl.abs(x), _k3(x))))


@triton.jit
def _kl_slope(x, kl_estimator):
    """``∂kl/∂logp`` of :func:`_kl_value`: k3 ``1 − e^x = −(x + k3)``, k1 ``1``, k2 ``−x``, abs ``−sign(x)``."""
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    return tl.where(kl_estimator == 1, 1.0, tl.where(kl_estimator == 2, -x,
                                                     tl.where(kl_estimator == 3, -sign, -(x + _k3(x)))))


@triton.jit
def _advantage_sign(advantages_ptr, slot, num_slots, row_advantages, mask):
    """The sign (−1, 0, 1; int32) of the advantage of each token's sentence slot."""
    advantage = tl.load(advantages_ptr + tl.where(row_advantages != 0, slot // num_slots, slot), mask=mask,
                        other=0.0)
    return tl.where(advantage > 0, 1, tl.where(advantage < 0, -1, 0))


@triton.jit
def _geo_clip(log_ratio, sign, eps_low, eps_high):
    """GMPO's sign-aware clip of a token log-ratio ``Δ``: ``min(Δ, eps_high)`` where ``Â > 0``, ``max(Δ, −eps_low)``
    where ``Â < 0``, 0 where ``Â = 0``; and whether the clip acted (NaN passes through)."""
    upper = tl.minimum(log_ratio, eps_high, propagate_nan=NAN)
    lower = tl.maximum(log_ratio, -eps_low, propagate_nan=NAN)
    kept = tl.where(sign > 0, upper, tl.where(sign < 0, lower, 0.0))
    clipped = ((sign > 0) & (log_ratio > eps_high)) | ((sign < 0) & (log_ratio < -eps_low))
    return kept, clipped


@triton.jit(do_not_specialize=["num_tokens", "length", "num_slots", "kl_estimator", "row_advantages"])
def _sentence_sums_kernel(logp_ptr, old_ptr, ref_ptr, weights_ptr, segment_ids_ptr, tokens_ptr, advantages_ptr,
                          log_ratio_sum_ptr, kl_sum_ptr, logp_sum_ptr, weight_sum_ptr, geo_sum_ptr, clipped_sum_ptr,
                          num_tokens, length, num_slots, kl_estimator, row_advantages, eps_low: tl.float64,
                          eps_high: tl.float64, HAS_INDEX: tl.constexpr, HAS_OLD: tl.constexpr,
                          HAS_KL: tl.constexpr, HAS_LOGP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                          GEO: tl.constexpr, BLOCK: tl.constexpr):
    _, _, token, scored, slot = _listed_tokens(tokens_ptr, segment_ids_ptr, num_tokens, length, num_slots,
                                               HAS_INDEX, BLOCK)
    logp = tl.load(logp_ptr + token, mask=scored, other=0.0)
    if HAS_OLD:
        old = tl.load(old_ptr + token, mask=scored, other=0.0).to(logp.dtype)
        tl.atomic_add(log_ratio_sum_ptr + slot, (logp - old).to(tl.float64), mask=scored, sem="relaxed")
        if GEO:       # geo_mean: Σ of the clipped token log-ratios, and how many tokens the clip changed
            sign = _advantage_sign(advantages_ptr, slot, num_slots, row_advantages, scored)
            kept, clipped = _geo_clip(logp - old, sign, as_dtype(eps_low, logp.dtype), as_dtype(eps_high, logp.dtype))
            tl.atomic_add(geo_sum_ptr + slot, kept.to(tl.float64), mask=scored, sem="relaxed")
            tl.atomic_add(clipped_sum_ptr + slot, tl.where(clipped, 1.0, 0.0).to(tl.float64), mask=scored,
                          sem="relaxed")
    if HAS_KL:
        ref_minus_logp = tl.load(ref_ptr + token, mask=scored, other=0.0).to(logp.dtype) - logp
        tl.atomic_add(kl_sum_ptr + slot, _kl_value(ref_minus_logp, kl_estimator).to(tl.float64), mask=scored,
                      sem="relaxed")
    weighted_logp = logp
    if HAS_WEIGHTS:
        weight = tl.load(weights_ptr + token, mask=scored, other=0.0).to(logp.dtype)
        weighted_logp = weight * logp
        tl.atomic_add(weight_sum_ptr + slot, weight.to(tl.float64), mask=scored, sem="relaxed")
    if HAS_LOGP:
        tl.atomic_add(logp_sum_ptr + slot, weighted_logp.to(tl.float64), mask=scored, sem="relaxed")


@triton.jit(do_not_specialize=["total_slots", "num_slots", "row_advantages", "ratio_mean", "kl_mean", "has_kl",
                               "has_delta", "objective", "has_dual_clip", "kl_weighted", "has_weights", "has_log_is"])
def _sentence_terms_kernel(count_ptr, weight_ptr, log_ratio_sum_ptr, kl_sum_ptr, logp_sum_ptr, weight_sum_ptr,
                           geo_sum_ptr, log_is_sum_ptr, advantages_ptr, weighted_loss_ptr, ratio_ptr, ratio_coef_ptr,
                           kl_coef_ptr, weight_coef_ptr, clip_coef_ptr, total_slots, num_slots,
                           eps_low: tl.float64, eps_high: tl.float64, beta: tl.float64, delta: tl.float64,
                           clamp_log_ratio: tl.float64, clip_ratio_c: tl.float64, tau_pos: tl.float64,
                           tau_neg: tl.float64, k_pos: tl.float64, lambda_pos: tl.float64, k_neg: tl.float64,
                           lambda_neg: tl.float64, row_advantages, ratio_mean, kl_mean, has_kl, has_delta, objective,
                           has_dual_clip, kl_weighted, has_weights, has_log_is, BLOCK: tl.constexpr):
    # The options are runtime flags (0/1, not specialised on): this kernel touches a few values per sentence, so
    # selecting with tl.where costs nothing measurable, and one build serves every option set.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = index < total_slots
    count = tl.load(count_ptr + index, mask=in_range, other=0)
    exists = count > 0
    weight = tl.load(weight_ptr + index, mask=in_range, other=0.0)
    acc_dtype = weight.dtype
    divisor = tl.maximum(count, 1).to(acc_dtype)
    lower_bound = as_dtype(1.0 - eps_low, acc_dtype)
    upper_bound = as_dtype(1.0 + eps_high, acc_dtype)
    beta = as_dtype(beta, acc_dtype)
    delta = as_dtype(delta, acc_dtype)
    clamp_log_ratio = as_dtype(clamp_log_ratio, acc_dtype)
    clip_ratio_c = as_dtype(clip_ratio_c, acc_dtype)

    log_ratio_sum = tl.load(log_ratio_sum_ptr + index, mask=in_range, other=0.0).to(acc_dtype)
    log_ratio = tl.where(ratio_mean != 0, log_ratio_sum / divisor, log_ratio_sum)
    inside_clamp = (log_ratio >= -clamp_log_ratio) & (log_ratio <= clamp_log_ratio)
    # the clamp as selects: NaN passes through, and fp64 builds for sm_90 (Triton lowers tl.clamp with bounds
    # ±c to an fp32-only intrinsic there)
    ratio = tl.exp(tl.where(log_ratio < -clamp_log_ratio, -clamp_log_ratio,
                            tl.where(log_ratio > clamp_log_ratio, clamp_log_ratio, log_ratio)))
    advantage_index = tl.where(row_advantages != 0, index // num_slots, index)
    advantage = tl.load(advantages_ptr + advantage_index, mask=in_range & exists, other=0.0).to(acc_dtype)

    # surrogate = min(ρ_u·Â, clip(ρ)·Â) and its derivative with respect to log ρ; on a tie the
    # two branches share the gradient equally, as torch.minimum does.
    unclipped = tl.where(has_delta != 0, tl.minimum(ratio, delta, propagate_nan=NAN), ratio)
    unclipped_slope = tl.where((has_delta == 0) | (ratio <= delta), ratio, 0.0)
    clipped = tl.clamp(ratio, lower_bound, upper_bound, propagate_nan=NAN)
    clipped_slope = tl.where((ratio >= lower_bound) & (ratio <= upper_bound), ratio, 0.0)
    unclipped_term = unclipped * advantage
    clipped_term = clipped * advantage
    surrogate = tl.minimum(unclipped_term, clipped_term, propagate_nan=NAN)
    surrogate_slope = tl.where(unclipped_term < clipped_term, unclipped_slope,
                               tl.where(unclipped_term > clipped_term, clipped_slope,
                                        0.5 * (unclipped_slope + clipped_slope))) * advantage
    # dual clip: where Â < 0, max(surrogate, c·Â); the floor is a constant
    dual = (has_dual_clip != 0) & (advantage < 0)
    floor = clip_ratio_c * advantage
    surrogate_slope = tl.where(dual, tl.where(surrogate > floor, surrogate_slope,
                                              tl.where(surrogate < floor, 0.0, 0.5 * surrogate_slope)),
                               surrogate_slope)
    surrogate = tl.where(dual, tl.maximum(surrogate, floor, propagate_nan=NAN), surrogate)
    # sapo: soft gate 4/τ · σ(τ(ρ − 1)) · Â, slope 4σ(1 − σ) · ρ · Â
    no_tau = tl.zeros_like(advantage)    # a where() of two scalars would give fp32: add them to a tensor first
    tau = tl.where(advantage > 0, no_tau + as_dtype(tau_pos, acc_dtype), no_tau + as_dtype(tau_neg, acc_dtype))
    gate = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))       # σ; tl.sigmoid would round fp64 through fp32
    surrogate = tl.where(objective == 2, gate * 4.0 / tau * advantage, surrogate)
    surrogate_slope = tl.where(objective == 2, 4.0 * gate * (1.0 - gate) * ratio * advantage, surrogate_slope)
    per_token_slope = tl.where(inside_clamp, 1.0, 0.0)       # ∂ log ρ / ∂ logp_t
    per_token_slope = tl.where(ratio_mean != 0, per_token_slope / divisor, per_token_slope)

    # with token weights q_t: ℓ(ρ) · mean_t q_t
    weight_slots = tl.where(has_weights != 0, in_range, False)
    mean_weight = tl.load(weight_sum_ptr + index, mask=weight_slots, other=1.0).to(acc_dtype)
    mean_weight = tl.where(has_weights != 0, mean_weight / divisor, 1.0)
    loss = -surrogate * mean_weight
    shared = -surrogate_slope * per_token_slope * mean_weight  # the part of c_t / w every token of s shares
    # geo_mean: L = −Â · ρ_clip · mean_t q_t with log ρ_clip the (clamped) sum or mean of the clipped token
    # log-ratios; ∂/∂logp_t = (the factor stored here) · [the clip left token t alone]
    geo = objective == 3
    geo_log_ratio = tl.load(geo_sum_ptr + index, mask=tl.where(geo, in_range, False), other=0.0).to(acc_dtype)
    geo_log_ratio = tl.where(ratio_mean != 0, geo_log_ratio / divisor, geo_log_ratio)
    geo_slope = tl.where((geo_log_ratio >= -clamp_log_ratio) & (geo_log_ratio <= clamp_log_ratio), 1.0, 0.0)
    geo_slope = tl.where(ratio_mean != 0, geo_slope / divisor, geo_slope)
    geo_ratio = tl.exp(tl.where(geo_log_ratio < -clamp_log_ratio, -clamp_log_ratio,
                                tl.where(geo_log_ratio > clamp_log_ratio, clamp_log_ratio, geo_log_ratio)))
    loss = tl.where(geo, -advantage * geo_ratio * mean_weight, loss)
    shared = tl.where(geo, 0.0, shared)
    tl.store(clip_coef_ptr + index, tl.where(exists, weight * -advantage * geo_ratio * mean_weight * geo_slope, 0.0),
             mask=tl.where(geo, in_range, False))
    # cispo: L = −sg(min(ρ, eps_high)) · Â · mean_t q_t logp_t; ∂/∂logp_t = q_t · (−sg(·) · Â / n)
    # vespo: the same with the gamma weight φ(w) (sentence_math.vespo_weight) in place of min(ρ, eps_high), w from
    # the sentence's summed log-ratio and log importance weights
    cispo = objective == 1
    vespo = objective == 4
    capped = tl.minimum(ratio, as_dtype(eps_high, acc_dtype), propagate_nan=NAN)
    log_is = tl.load(log_is_sum_ptr + index, mask=tl.where(has_log_is != 0, in_range, False), other=0.0)
    log_w = log_ratio_sum + log_is.to(acc_dtype)        # always the sum: VESPO's w is a product of token ratios
    lowest = tl.zeros_like(log_w) + VESPO_LOWEST
    log_w = tl.where(log_w < lowest, lowest, tl.where(log_w > clamp_log_ratio, clamp_log_ratio, log_w))
    no_k = tl.zeros_like(advantage)
    positive = advantage >= 0
    k = tl.where(positive, no_k + as_dtype(k_pos, acc_dtype), no_k + as_dtype(k_neg, acc_dtype))
    lam = tl.where(positive, no_k + as_dtype(lambda_pos, acc_dtype), no_k + as_dtype(lambda_neg, acc_dtype))
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    phi = tl.where(phi - phi == 0, phi, 0.0)      # not finite (NaN, inf) -> 0, as in TRL
    capped = tl.where(vespo, phi, capped)
    by_weight = cispo | vespo
    logp_mean = tl.load(logp_sum_ptr + index, mask=tl.where(by_weight, in_range, False), other=0.0)
    logp_mean = logp_mean.to(acc_dtype) / divisor
    loss = tl.where(by_weight, -capped * advantage * logp_mean, loss)
    shared = tl.where(by_weight, 0.0, shared)
    tl.store(weight_coef_ptr + index, tl.where(exists, weight * -capped * advantage / divisor, 0.0),
             mask=tl.where(by_weight, in_range, False))

    kl_slots = tl.where(has_kl != 0, in_range, False)
    kl = tl.load(kl_sum_ptr + index, mask=kl_slots, other=0.0).to(acc_dtype)
    kl_weight = tl.where(kl_mean != 0, beta / divisor, beta)
    # kl_importance_weighting: β · ρ · KL, whose gradient reaches ρ too
    shared += tl.where((has_kl != 0) & (kl_weighted != 0), kl_weight * kl * ratio * per_token_slope, 0.0)
    kl_weight = tl.where(kl_weighted != 0, kl_weight * ratio, kl_weight)
    loss += tl.where(has_kl != 0, kl_weight * kl, 0.0)
    tl.store(kl_coef_ptr + index, tl.where(exists, weight * kl_weight, 0.0), mask=kl_slots)
    tl.store(weighted_loss_ptr + index, tl.where(exists, weight * loss, 0.0), mask=in_range)
    tl.store(ratio_ptr + index, ratio, mask=in_range)
    tl.store(ratio_coef_ptr + index, tl.where(exists, weight * shared, 0.0), mask=in_range)


@triton.jit(do_not_specialize=["num_tokens", "length", "num_slots", "kl_estimator", "row_advantages"])
def _token_coef_kernel(logp_ptr, ref_ptr, weights_ptr, old_ptr, advantages_ptr, segment_ids_ptr, tokens_ptr,
                       ratio_coef_ptr, kl_coef_ptr, weight_coef_ptr, clip_coef_ptr, coef_ptr, num_tokens, length,
                       num_slots, kl_estimator, row_advantages, eps_low: tl.float64, eps_high: tl.float64,
                       HAS_INDEX: tl.constexpr, HAS_KL: tl.constexpr, HAS_WEIGHT_COEF: tl.constexpr,
                       HAS_WEIGHTS: tl.constexpr, GEO: tl.constexpr, BLOCK: tl.constexpr):
    # c_t = ratio_coef[s] + weight_coef[s] · q_t + clip_coef[s] · [unclipped] + kl_coef[s] · ∂kl_t/∂logp_t, at the
    # token's place in the list
    position, in_range, token, scored, slot = _listed_tokens(tokens_ptr, segment_ids_ptr, num_tokens, length,
                                                             num_slots, HAS_INDEX, BLOCK)
    coef = tl.load(ratio_coef_ptr + slot, mask=scored, other=0.0)
    if GEO:
        logp = tl.load(logp_ptr + token, mask=scored, other=0.0)
        old = tl.load(old_ptr + token, mask=scored, other=0.0).to(logp.dtype)
        sign = _advantage_sign(advantages_ptr, slot, num_slots, row_advantages, scored)
        _, clipped = _geo_clip(logp - old, sign, as_dtype(eps_low, logp.dtype), as_dtype(eps_high, logp.dtype))
        coef += tl.where(clipped, 0.0, tl.load(clip_coef_ptr + slot, mask=scored, other=0.0))
    if HAS_WEIGHT_COEF:
        weight_coef = tl.load(weight_coef_ptr + slot, mask=scored, other=0.0)
        if HAS_WEIGHTS:
            weight_coef *= tl.load(weights_ptr + token, mask=scored, other=0.0).to(weight_coef.dtype)
        coef += weight_coef
    if HAS_KL:
        logp = tl.load(logp_ptr + token, mask=scored, other=0.0)
        ref = tl.load(ref_ptr + token, mask=scored, other=0.0).to(logp.dtype)
        x = ref - logp
        coef += tl.load(kl_coef_ptr + slot, mask=scored, other=0.0) * _kl_slope(x, kl_estimator)
    tl.store(coef_ptr + position, tl.where(scored, coef, 0.0), mask=in_range)




def sentence_sums(logp, old_logps, ref_logps, segment_ids, num_slots: int, sums: SentenceSums, config,
                  tokens=None, token_weights=None, advantages=None) -> None:
    """Add ``Δ_t`` (if ``old_logps`` is given), ``kl_t``, ``q_t logp_t``, ``q_t`` and (``geo_mean``) the clipped
    ``Δ_t`` and its clip count of the listed tokens (all tokens when ``tokens`` is ``None``) to their sentence's
    fp64 sums (those not ``None``). logp: flat ``[B*T]``; others ``[B, T]``; ``advantages`` (``geo_mean``) as the
    loss takes them."""
    batch, length = segment_ids.shape
    count = batch * length if tokens is None else tokens.numel()
    if count == 0 or (old_logps is None and sums.kl is None and sums.logp is None and sums.weight is None):
        return
    segments = index_vector(segment_ids)
    weights = None if token_weights is None else float_vector(token_weights, logp.dtype)
    geo = sums.clipped_log_ratio is not None and old_logps is not None
    _sentence_sums_kernel[(triton.cdiv(count, TOKEN_BLOCK),)](
        logp, float_vector(old_logps, logp.dtype) if old_logps is not None else logp,
        float_vector(ref_logps, logp.dtype) if sums.kl is not None else logp, weights if weights is not None else logp,
        segments, index_vector(tokens) if tokens is not None else segments,
        float_vector(advantages, logp.dtype) if geo else logp, sums.log_ratio,
        sums.kl if sums.kl is not None else sums.log_ratio, sums.logp if sums.logp is not None else sums.log_ratio,
        sums.weight if sums.weight is not None else sums.log_ratio,
        sums.clipped_log_ratio if geo else sums.log_ratio, sums.clipped_tokens if geo else sums.log_ratio,
        count, length, num_slots, KL_ESTIMATOR_CODES[config.kl_estimator],
        int(geo and advantages.dim() == 1), config.eps_low, config.eps_high,
        HAS_INDEX=tokens is not None, HAS_OLD=old_logps is not None, HAS_KL=sums.kl is not None,
        HAS_LOGP=sums.logp is not None, HAS_WEIGHTS=weights is not None, GEO=geo, BLOCK=TOKEN_BLOCK,
        **COMPILE_OPTIONS)


def sentence_terms(layout: SentenceLayout, sums: SentenceSums, advantages, config: LossConfig) -> SentenceTerms:
    """Ratio, objective, ``w · L`` and the gradient factors of every sentence slot."""
    total = layout.count.numel()
    dtype, device = layout.weight.dtype, layout.weight.device
    has_kl = sums.kl is not None
    by_weight = config.objective in ("cispo", "vespo")
    geo = config.objective == "geo_mean"
    terms = SentenceTerms(weighted_loss=new_output((total,), dtype, device), ratio=new_output((total,), dtype, device),
                          ratio_coef=new_output((total,), dtype, device),
                          kl_coef=new_output((total,), dtype, device) if has_kl else None,
                          weight_coef=new_output((total,), dtype, device) if by_weight else None,
                          clip_coef=new_output((total,), dtype, device) if geo else None)
    if total:
        spare = sums.log_ratio
        _sentence_terms_kernel[(triton.cdiv(total, SLOT_BLOCK),)](
            layout.count, layout.weight, sums.log_ratio, sums.kl if has_kl else spare,
            sums.logp if sums.logp is not None else spare, sums.weight if sums.weight is not None else spare,
            sums.clipped_log_ratio if geo else spare, sums.log_is if sums.log_is is not None else spare,
            float_vector(advantages, dtype), terms.weighted_loss, terms.ratio, terms.ratio_coef,
            terms.kl_coef if has_kl else terms.ratio_coef, terms.weight_coef if by_weight else terms.ratio_coef,
            terms.clip_coef if geo else terms.ratio_coef,
            total, layout.num_slots, config.eps_low, config.eps_high, config.beta,
            config.delta if config.delta is not None else 0.0, config.clamp_log_ratio,
            config.clip_ratio_c if config.clip_ratio_c is not None else 0.0, config.sapo_tau_pos,
            config.sapo_tau_neg, config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg,
            config.vespo_lambda_neg, int(advantages.dim() == 1), int(config.ratio_level == "mean"),
            int(config.kl_reduction == "mean"), int(has_kl), int(config.delta is not None),
            OBJECTIVE_CODES[config.objective], int(config.clip_ratio_c is not None),
            int(config.kl_importance_weighting), int(sums.weight is not None), int(sums.log_is is not None),
            BLOCK=SLOT_BLOCK, **COMPILE_OPTIONS)
    return terms


def token_coefficients(logp, ref_logps, segment_ids, num_slots: int, terms: SentenceTerms, config, tokens=None,
                       token_weights=None, old_logps=None, advantages=None):
    """``c_t = ∂loss/∂logp_t`` of the listed tokens (all when ``tokens`` is ``None``), in list order; 0 if unscored.
    ``old_logps`` and ``advantages`` are read for ``geo_mean`` only (its per-token clip)."""
    batch, length = segment_ids.shape
    count = batch * length if tokens is None else tokens.numel()
    coef = new_output((count,), logp.dtype, logp.device)
    if count:
        segments = index_vector(segment_ids)
        has_kl = terms.kl_coef is not None
        has_weight_coef = terms.weight_coef is not None
        # without old_logps every Δ_t is 0: no token is clipped, and the ratio terms need no old log-probs
        geo = terms.clip_coef is not None and old_logps is not None
        weights = None if token_weights is None else float_vector(token_weights, logp.dtype)
        ratio_coef = terms.ratio_coef if terms.clip_coef is None or geo else terms.ratio_coef + terms.clip_coef
        _token_coef_kernel[(triton.cdiv(count, TOKEN_BLOCK),)](
            logp, float_vector(ref_logps, logp.dtype) if has_kl else logp, weights if weights is not None else logp,
            float_vector(old_logps, logp.dtype) if geo else logp, float_vector(advantages, logp.dtype) if geo else logp,
            segments, index_vector(tokens) if tokens is not None else segments,
            ratio_coef, terms.kl_coef if has_kl else ratio_coef,
            terms.weight_coef if has_weight_coef else ratio_coef, terms.clip_coef if geo else ratio_coef, coef,
            count, length, num_slots, KL_ESTIMATOR_CODES[config.kl_estimator],
            int(geo and advantages.dim() == 1), config.eps_low, config.eps_high, HAS_INDEX=tokens is not None,
            HAS_KL=has_kl, HAS_WEIGHT_COEF=has_weight_coef, HAS_WEIGHTS=has_weight_coef and weights is not None,
            GEO=geo, BLOCK=TOKEN_BLOCK, **COMPILE_OPTIONS)
    return coef
