"""The three passes of the Triton backend in chunked PyTorch, for CPU tensors (``backend="torch"``).

Same algorithm, same memory behaviour: the logits are read in chunks of rows, so no ``[N, V]`` fp32
temporary exists; the only ``[N, V]`` buffer is the gradient (none with ``inplace=True``).
"""

from __future__ import annotations

import torch

from ...config import LossConfig
from ..layout import SentenceLayout, SentenceSums, SentenceTerms
from ..passes import TokenScores, check_row_layout, new_token_scores
from ..sentence_math import geo_clip, kl_slope, kl_value, policy_surrogate_and_slope, vespo_weight

CHUNK_BYTES = 16 * 2**20


def rows_per_chunk(vocab: int) -> int:
    """Rows whose fp32 temporaries (about three ``[rows, V]`` tensors) fit in ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (12 * max(vocab, 1)))


def _row_chunks(selected: torch.Tensor, length: int, vocab: int):
    """Yield ``(flat_rows, batch_index, time_index)`` for chunks of the selected flat row indices."""
    step = rows_per_chunk(vocab)
    for start in range(0, selected.numel(), step):
        flat_rows = selected[start:start + step]
        yield flat_rows, flat_rows // length, flat_rows % length


def token_scores(logits: torch.Tensor, ids: torch.Tensor, temperature: float, *,
                 segment_ids: torch.Tensor | None = None, with_entropy: bool = False):
    """Pass A; the contract of ``ops.passes.Passes.token_scores``."""
    logp, lse, entropy = new_token_scores(logits, with_entropy)
    batch, length, vocab = logits.shape
    rows = batch * length
    dtype = lse.dtype
    flat_ids = ids.reshape(rows)
    if segment_ids is None:
        selected = torch.arange(rows, device=logits.device)
    else:
        selected = torch.nonzero(segment_ids.reshape(rows) >= 0).squeeze(1)
    for flat_rows, batch_index, time_index in _row_chunks(selected, length, vocab):
        z = logits[batch_index, time_index].to(dtype) / temperature
        # lse = m + log Σ exp(z − m) by hand rather than torch.logsumexp, which returns a finite-looking
        # +inf for a +inf logit: here +inf and NaN logits give NaN, as in the Triton kernel.
        row_max = z.amax(dim=-1, keepdim=True)
        shifted = torch.exp(z - row_max)
        total = shifted.sum(-1)
        chunk_lse = row_max.squeeze(1) + torch.log(total)
        logp[flat_rows] = z.gather(1, flat_ids[flat_rows, None].long()).squeeze(1) - chunk_lse
        lse[flat_rows] = chunk_lse
        if with_entropy:   # H = lse − Σ p z, with p z = 0 where p = 0
            entropy[flat_rows] = chunk_lse - (shifted * torch.where(shifted > 0, z, 0.0)).sum(-1) / total
    return TokenScores(logp, lse, entropy)


def logits_gradient(logits: torch.Tensor, ids: torch.Tensor, logp_coef: torch.Tensor, lse: torch.Tensor,
                    temperature: float, out: torch.Tensor, *, entropy_coef: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Pass C; the contract of ``ops.passes.Passes.logits_gradient`` (``out`` may be ``logits``)."""
    check_row_layout("logits", logits)
    batch, length, vocab = logits.shape
    rows = batch * length
    flat_ids = ids.reshape(rows).long()
    active = logp_coef != 0
    if entropy_coef is not None:
        active |= entropy_coef != 0
    inactive = torch.nonzero(~active).squeeze(1)
    out[inactive // length, inactive % length] = 0
    for flat_rows, batch_index, time_index in _row_chunks(torch.nonzero(active).squeeze(1), length, vocab):
        z = logits[batch_index, time_index].to(lse.dtype) / temperature
        log_p = z - lse[flat_rows, None]
        p = torch.exp(log_p)
        coef = logp_coef[flat_rows, None]
        grad = -coef * p
        grad.scatter_add_(1, flat_ids[flat_rows, None], coef)
        if entropy_coef is not None:   # ∂H/∂z = −p (log p + H)
            grad -= entropy_coef[flat_rows, None] * torch.where(p > 0, p * (log_p + entropy[flat_rows, None]), 0.0)
        out[batch_index, time_index] = (grad / temperature).to(out.dtype)
    return out


def _token_slots(segment_ids: torch.Tensor, num_slots: int, tokens: torch.Tensor | None):
    """Flat positions of the scored tokens among ``tokens`` (all tokens if ``None``), their list positions
    and their sentence slots."""
    length = segment_ids.shape[1]
    segments = segment_ids.reshape(-1)
    listed = torch.arange(segments.numel(), device=segments.device) if tokens is None else tokens
    list_positions = torch.nonzero(segments[listed] >= 0).squeeze(1)
    positions = listed[list_positions]
    return positions, list_positions, (positions // length) * num_slots + segments[positions].long()


def _slot_advantages(advantages, num_slots: int, slots, dtype):
    """The advantage of each listed token's sentence slot."""
    per_slot = advantages.reshape(-1) if advantages.dim() == 2 else advantages.repeat_interleave(num_slots)
    return per_slot[slots].to(dtype)


def sentence_sums(logp, old_logps, ref_logps, segment_ids, num_slots: int, sums: SentenceSums, config,
                  tokens=None, token_weights=None, advantages=None) -> None:
    """Pass B, sums; the contract of ``ops.passes.Passes.sentence_sums``."""
    positions, _, slots = _token_slots(segment_ids, num_slots, tokens)
    token_logp = logp[positions]
    if old_logps is not None:
        token_delta = token_logp - old_logps.reshape(-1)[positions].to(logp.dtype)
        sums.log_ratio.index_add_(0, slots, token_delta.double())
        if sums.clipped_log_ratio is not None:
            kept, clipped = geo_clip(token_delta, _slot_advantages(advantages, num_slots, slots, logp.dtype), config)
            sums.clipped_log_ratio.index_add_(0, slots, kept.double())
            sums.clipped_tokens.index_add_(0, slots, clipped.double())
    if sums.kl is not None:
        ref_minus_logp = ref_logps.reshape(-1)[positions].to(logp.dtype) - token_logp
        sums.kl.index_add_(0, slots, kl_value(ref_minus_logp, config.kl_estimator).double())
    weight = None if token_weights is None else token_weights[positions].to(logp.dtype)
    if sums.logp is not None:
        sums.logp.index_add_(0, slots, (token_logp if weight is None else weight * token_logp).double())
    if sums.weight is not None:
        sums.weight.index_add_(0, slots, weight.double())


def sentence_terms(layout: SentenceLayout, sums: SentenceSums, advantages, config: LossConfig) -> SentenceTerms:
    """Pass B, per-sentence terms; the same arithmetic as ``ops/triton/sentence_grpo.py``."""
    dtype = layout.weight.dtype
    exists = layout.count > 0
    divisor = layout.count.clamp(min=1).to(dtype)
    log_ratio = sums.log_ratio.to(dtype)
    if config.ratio_level == "mean":
        log_ratio = log_ratio / divisor
    clamp = config.clamp_log_ratio
    inside_clamp = (log_ratio >= -clamp) & (log_ratio <= clamp)
    ratio = torch.exp(log_ratio.clamp(-clamp, clamp))
    if advantages.dim() == 2:
        advantage = advantages.reshape(-1).to(dtype)
    else:
        advantage = advantages.to(dtype).repeat_interleave(layout.num_slots)
    advantage = torch.where(exists, advantage, 0.0)
    per_token_slope = inside_clamp.to(dtype)           # ∂ log ρ / ∂ logp_t
    if config.ratio_level == "mean":
        per_token_slope = per_token_slope / divisor

    mean_weight = None if sums.weight is None else sums.weight.to(dtype) / divisor
    weight_coef = clip_coef = None
    if config.objective in ("cispo", "vespo"):     # L = −sg(weight) · Â · mean_t q_t logp_t
        if config.objective == "cispo":
            weight = ratio.clamp(max=config.eps_high)
        else:
            log_is = None if sums.log_is is None else sums.log_is.to(dtype)
            weight = vespo_weight(sums.log_ratio.to(dtype), log_is, advantage, config)
        loss = -weight * advantage * sums.logp.to(dtype) / divisor
        weight_coef = torch.where(exists, layout.weight * -weight * advantage / divisor, 0.0)
        shared = torch.zeros_like(loss)
    elif config.objective == "geo_mean":      # L = −Â · ρ_clip · mean_t q_t; the clip decides which tokens it reaches
        geo_log_ratio = sums.clipped_log_ratio.to(dtype)
        geo_slope = torch.ones_like(divisor)
        if config.ratio_level == "mean":
            geo_log_ratio, geo_slope = geo_log_ratio / divisor, geo_slope / divisor
        geo_slope = torch.where((geo_log_ratio >= -clamp) & (geo_log_ratio <= clamp), geo_slope, 0.0)
        loss = -advantage * torch.exp(geo_log_ratio.clamp(-clamp, clamp))
        if mean_weight is not None:
            loss = loss * mean_weight
        clip_coef = torch.where(exists, layout.weight * loss * geo_slope, 0.0)
        shared = torch.zeros_like(loss)
    else:                               # L = ℓ(ρ) · mean_t q_t
        surrogate, slope = policy_surrogate_and_slope(ratio, advantage, config)
        loss, shared = -surrogate, -slope * per_token_slope
        if mean_weight is not None:
            loss, shared = loss * mean_weight, shared * mean_weight
    kl_coef = None
    if sums.kl is not None:
        kl, kl_weight = sums.kl.to(dtype), torch.full_like(divisor, config.beta)
        if config.kl_reduction == "mean":
            kl, kl_weight = kl / divisor, kl_weight / divisor
        if config.kl_importance_weighting:          # β · ρ · KL: the gradient reaches ρ too
            shared = shared + config.beta * kl * ratio * per_token_slope
            kl, kl_weight = kl * ratio, kl_weight * ratio
        loss = loss + config.beta * kl
        kl_coef = torch.where(exists, layout.weight * kl_weight, 0.0)
    return SentenceTerms(weighted_loss=torch.where(exists, layout.weight * loss, 0.0), ratio=ratio,
                         ratio_coef=torch.where(exists, layout.weight * shared, 0.0), kl_coef=kl_coef,
                         weight_coef=weight_coef, clip_coef=clip_coef)


def token_coefficients(logp, ref_logps, segment_ids, num_slots: int, terms: SentenceTerms, config,
                       tokens=None, token_weights=None, old_logps=None, advantages=None):
    """Pass B, per-token coefficient; the contract of ``ops.passes.Passes.token_coefficients``."""
    count = segment_ids.numel() if tokens is None else tokens.numel()
    coef = torch.zeros(count, dtype=logp.dtype, device=logp.device)
    positions, list_positions, slots = _token_slots(segment_ids, num_slots, tokens)
    values = terms.ratio_coef[slots]
    if terms.clip_coef is not None:       # geo_mean: only the tokens its clip left alone (none clipped without old)
        clip_coef = terms.clip_coef[slots]
        if old_logps is not None:
            token_delta = logp[positions] - old_logps.reshape(-1)[positions].to(logp.dtype)
            _, clipped = geo_clip(token_delta, _slot_advantages(advantages, num_slots, slots, logp.dtype), config)
            clip_coef = torch.where(clipped, 0.0, clip_coef)
        values = values + clip_coef
    if terms.weight_coef is not None:
        weight = 1.0 if token_weights is None else token_weights[positions].to(logp.dtype)
        values = values + terms.weight_coef[slots] * weight
    if terms.kl_coef is not None:
        ref = ref_logps.reshape(-1)[positions].to(logp.dtype)
        values = values + terms.kl_coef[slots] * kl_slope(ref - logp[positions], config.kl_estimator)
    coef[list_positions] = values
    return coef
