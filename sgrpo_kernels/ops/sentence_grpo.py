"""Pass B in Triton: per-sentence sums, ratio, clipping, KL, loss terms and the per-token gradient coefficient.

Three small kernels over ``B * T`` tokens and ``B * S_max`` sentence slots:

1. ``_sentence_sums_kernel`` (one program per block of tokens): token count, ``Σ Δ_t`` and ``Σ k3_t`` of
   every sentence, accumulated with atomics in fp64 so the fp32 result does not depend on their order.
2. ``_sentence_terms_kernel`` (one program per row): ``S_i``, then for every sentence the ratio, the
   clipped surrogate, ``L(i, s)``, its reduction weight, and ``∂loss/∂logp_t`` up to the global
   denominator (``B'`` or ``Σ n``), split into a per-sentence part and a per-token KL part.
3. ``_token_coef_kernel`` (one program per block of tokens): ``c_t = ∂loss/∂logp_t``.

Together with pass A and pass C of ``logprobs.py`` this is the whole Triton backend of the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import LossConfig
from .common import Passes, SentenceArrays, new_output
from .logprobs import logits_grad_pass, logsumexp_pass

REDUCTION_CODES = {"sentence_mean": 0, "token_mean": 1, "sum": 2}
NAN: tl.constexpr = tl.PropagateNan.ALL   # a NaN log-prob must give a NaN loss, as torch.clamp/minimum do
TOKEN_BLOCK = 1024


@triton.jit
def _sentence_sums_kernel(logp_ptr, old_ptr, ref_ptr, segment_ids_ptr, count_ptr, log_ratio_sum_ptr, kl_sum_ptr,
                          rows, length, num_slots,
                          HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    segment = tl.load(segment_ids_ptr + tokens, mask=tokens < rows, other=-1).to(tl.int64)
    scored = segment >= 0
    slot = (tokens // length) * num_slots + segment
    tl.atomic_add(count_ptr + slot, tl.full([BLOCK], 1, tl.int32), mask=scored)
    logp = tl.load(logp_ptr + tokens, mask=scored, other=0.0)
    if HAS_OLD:
        old = tl.load(old_ptr + tokens, mask=scored, other=0.0).to(logp.dtype)
        tl.atomic_add(log_ratio_sum_ptr + slot, (logp - old).to(tl.float64), mask=scored)
    if HAS_KL:
        ref_minus_logp = tl.load(ref_ptr + tokens, mask=scored, other=0.0).to(logp.dtype) - logp
        k3 = tl.exp(ref_minus_logp) - ref_minus_logp - 1.0
        tl.atomic_add(kl_sum_ptr + slot, k3.to(tl.float64), mask=scored)


@triton.jit
def _sentence_terms_kernel(count_ptr, log_ratio_sum_ptr, kl_sum_ptr, advantages_ptr,
                           sentence_loss_ptr, sentence_ratio_ptr, ratio_coef_ptr, kl_coef_ptr,
                           row_loss_ptr, row_sentences_ptr, row_tokens_ptr,
                           num_slots, eps_low, eps_high, beta, delta, clamp_log_ratio,
                           ROW_ADVANTAGES: tl.constexpr, RATIO_MEAN: tl.constexpr, KL_MEAN: tl.constexpr,
                           HAS_KL: tl.constexpr, HAS_DELTA: tl.constexpr, REDUCTION: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = sentence_loss_ptr.dtype.element_ty
    row_slots = row * num_slots
    sentences = tl.zeros([], tl.int32)
    tokens = tl.zeros([], tl.int32)
    for start in range(0, num_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        count = tl.load(count_ptr + row_slots + slots, mask=slots < num_slots, other=0)
        sentences += tl.sum((count > 0).to(tl.int32), 0)
        tokens += tl.sum(count, 0)

    row_loss = tl.zeros([], acc_dtype)
    for start in range(0, num_slots, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        in_row = slots < num_slots
        index = row_slots + slots
        count = tl.load(count_ptr + index, mask=in_row, other=0)
        exists = count > 0
        divisor = tl.maximum(count, 1).to(acc_dtype)

        log_ratio = tl.load(log_ratio_sum_ptr + index, mask=in_row, other=0.0).to(acc_dtype)
        if RATIO_MEAN:
            log_ratio = log_ratio / divisor
        inside_clamp = (log_ratio >= -clamp_log_ratio) & (log_ratio <= clamp_log_ratio)
        ratio = tl.exp(tl.clamp(log_ratio, -clamp_log_ratio, clamp_log_ratio, propagate_nan=NAN))
        if ROW_ADVANTAGES:
            advantage = tl.load(advantages_ptr + row + slots * 0, mask=in_row & exists, other=0.0)
        else:
            advantage = tl.load(advantages_ptr + index, mask=in_row & exists, other=0.0)
        advantage = advantage.to(acc_dtype)

        # surrogate = min(ρ_u·Â, clip(ρ)·Â) and its derivative with respect to log ρ; on a tie the
        # two branches share the gradient equally, as torch.minimum does.
        unclipped = ratio
        unclipped_slope = ratio
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta, propagate_nan=NAN)
            unclipped_slope = tl.where(ratio <= delta, ratio, 0.0)
        clipped = tl.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high, propagate_nan=NAN)
        clipped_slope = tl.where((ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high), ratio, 0.0)
        unclipped_term = unclipped * advantage
        clipped_term = clipped * advantage
        surrogate = tl.minimum(unclipped_term, clipped_term, propagate_nan=NAN)
        surrogate_slope = tl.where(unclipped_term < clipped_term, unclipped_slope,
                                   tl.where(unclipped_term > clipped_term, clipped_slope,
                                            0.5 * (unclipped_slope + clipped_slope))) * advantage
        per_token_slope = tl.where(inside_clamp, 1.0, 0.0)       # ∂ log ρ / ∂ logp_t
        if RATIO_MEAN:
            per_token_slope = per_token_slope / divisor

        loss = -surrogate
        kl_weight = tl.zeros([BLOCK_S], acc_dtype)
        if HAS_KL:
            kl = tl.load(kl_sum_ptr + index, mask=in_row, other=0.0).to(acc_dtype)
            if KL_MEAN:
                kl = kl / divisor
                kl_weight += beta / divisor
            else:
                kl_weight += beta
            loss += beta * kl

        if REDUCTION == 0:      # sentence_mean: (1/B') Σ_i (1/S_i) Σ_s
            weight = tl.full([BLOCK_S], 1.0, acc_dtype) / tl.maximum(sentences, 1).to(acc_dtype)
        elif REDUCTION == 1:    # token_mean: Σ n·L / Σ n
            weight = count.to(acc_dtype)
        else:                   # sum
            weight = tl.full([BLOCK_S], 1.0, acc_dtype)
        loss = tl.where(exists, loss, 0.0)
        tl.store(sentence_loss_ptr + index, loss, mask=in_row)
        tl.store(sentence_ratio_ptr + index, ratio, mask=in_row)
        tl.store(ratio_coef_ptr + index, tl.where(exists, -weight * surrogate_slope * per_token_slope, 0.0),
                 mask=in_row)
        if HAS_KL:
            tl.store(kl_coef_ptr + index, tl.where(exists, weight * kl_weight, 0.0), mask=in_row)
        row_loss += tl.sum(weight * loss, 0)
    tl.store(row_loss_ptr + row, row_loss)
    tl.store(row_sentences_ptr + row, sentences)
    tl.store(row_tokens_ptr + row, tokens)


@triton.jit
def _token_coef_kernel(logp_ptr, ref_ptr, segment_ids_ptr, ratio_coef_ptr, kl_coef_ptr, denominator_ptr, coef_ptr,
                       rows, length, num_slots, HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
    # c_t = (ratio_coef[s] + kl_coef[s] · (1 − exp(ref_t − logp_t))) / denominator
    tokens = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = tokens < rows
    segment = tl.load(segment_ids_ptr + tokens, mask=in_range, other=-1).to(tl.int64)
    scored = segment >= 0
    slot = (tokens // length) * num_slots + segment
    coef = tl.load(ratio_coef_ptr + slot, mask=scored, other=0.0)
    if HAS_KL:
        logp = tl.load(logp_ptr + tokens, mask=scored, other=0.0)
        ref = tl.load(ref_ptr + tokens, mask=scored, other=0.0).to(logp.dtype)
        coef += tl.load(kl_coef_ptr + slot, mask=scored, other=0.0) * (1.0 - tl.exp(ref - logp))
    coef = coef / tl.load(denominator_ptr)
    tl.store(coef_ptr + tokens, tl.where(scored, coef, 0.0), mask=in_range)


def reduction_denominator(config: LossConfig, row_sentences: torch.Tensor, row_tokens: torch.Tensor):
    """``B'`` (rows with a sentence), ``Σ n`` or 1, as a tensor (no host synchronisation)."""
    if config.reduction == "sentence_mean":
        return (row_sentences > 0).sum().clamp(min=1)
    if config.reduction == "token_mean":
        return row_tokens.sum().clamp(min=1)
    return torch.ones((), dtype=torch.int64, device=row_tokens.device)


def sentence_pass(logp, old_logps, ref_logps, segment_ids, advantages, config: LossConfig, num_slots: int):
    """Pass B. logp, old_logps, ref_logps, segment_ids: ``[B, T]`` or flat ``[B*T]`` (logp unread where the
    segment is ``-1``); advantages ``[B]`` or ``[B, num_slots]``.

    Returns ``(loss, token_coef [B*T], SentenceArrays)``; ``token_coef`` is ``∂loss/∂logp_t``, 0 where unscored.
    """
    batch, length = segment_ids.shape
    rows, slots = batch * length, batch * num_slots
    device, dtype = logp.device, logp.dtype
    has_kl = config.beta > 0
    segments = segment_ids.reshape(rows).contiguous()
    old = logp if old_logps is None else old_logps.reshape(rows).contiguous()
    ref = logp if ref_logps is None else ref_logps.reshape(rows).contiguous()

    count = torch.zeros(slots, dtype=torch.int32, device=device)
    log_ratio_sum = torch.zeros(slots, dtype=torch.float64, device=device)
    kl_sum = torch.zeros(slots, dtype=torch.float64, device=device) if has_kl else None
    token_grid = (triton.cdiv(rows, TOKEN_BLOCK),)
    if rows:
        _sentence_sums_kernel[token_grid](
            logp, old, ref, segments, count, log_ratio_sum, kl_sum if has_kl else log_ratio_sum,
            rows, length, num_slots, HAS_OLD=old_logps is not None, HAS_KL=has_kl, BLOCK=TOKEN_BLOCK)

    sentence_loss = new_output((slots,), dtype, device)
    sentence_ratio = new_output((slots,), dtype, device)
    ratio_coef = new_output((slots,), dtype, device)
    kl_coef = new_output((slots,), dtype, device) if has_kl else ratio_coef
    row_loss = new_output((batch,), dtype, device)
    row_sentences = new_output((batch,), torch.int32, device)
    row_tokens = new_output((batch,), torch.int32, device)
    if batch:
        _sentence_terms_kernel[(batch,)](
            count, log_ratio_sum, kl_sum if has_kl else log_ratio_sum, advantages.contiguous(),
            sentence_loss, sentence_ratio, ratio_coef, kl_coef, row_loss, row_sentences, row_tokens,
            num_slots, config.eps_low, config.eps_high, config.beta,
            config.delta if config.delta is not None else 0.0, config.clamp_log_ratio,
            ROW_ADVANTAGES=advantages.dim() == 1, RATIO_MEAN=config.ratio_level == "mean",
            KL_MEAN=config.kl_reduction == "mean", HAS_KL=has_kl, HAS_DELTA=config.delta is not None,
            REDUCTION=REDUCTION_CODES[config.reduction],
            BLOCK_S=min(triton.next_power_of_2(max(num_slots, 16)), 1024))

    denominator = reduction_denominator(config, row_sentences, row_tokens).to(dtype)
    loss = row_loss.sum() / denominator
    token_coef = new_output((rows,), dtype, device)
    if rows:
        _token_coef_kernel[token_grid](
            logp, ref, segments, ratio_coef, kl_coef, denominator.reshape(1), token_coef,
            rows, length, num_slots, HAS_KL=has_kl, BLOCK=TOKEN_BLOCK)
    arrays = SentenceArrays(count=count, ratio=sentence_ratio, kl_sum=kl_sum)
    return loss, token_coef, arrays


TRITON_PASSES = Passes(logsumexp=logsumexp_pass, sentence=sentence_pass, logits_grad=logits_grad_pass)
