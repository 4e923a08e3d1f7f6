"""What pass B needs that depends only on ``segment_ids``: token counts and reduction weights per sentence.

The reduction weight ``w(i, s)`` (``reference.py``) (``1 / (S_i · B')``, ``n(i, s) / Σ n`` or 1) is known before
any logit is read, so ``loss = Σ w · L`` and ``∂loss/∂logp_t`` can be finished sentence by sentence, as the
fused linear path does chunk by chunk. Plus the metrics, computed from the per-sentence arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sentence_math import clipped_sentences


@dataclass
class SentenceLayout:
    """Per-sentence-slot facts of a ``[B, T]`` batch with ``num_slots`` slots per row (flat ``[B * num_slots]``)."""

    batch: int
    length: int
    num_slots: int
    count: torch.Tensor      # int32, tokens of each sentence (0: the sentence does not exist)
    weight: torch.Tensor     # accumulator dtype, the reduction weight w(i, s); 0 where the sentence does not exist
    shared: torch.Tensor | None = None   # bool, sentences with tokens here and on other ranks (slot_total given)


def sentence_layout(segment_ids: torch.Tensor, num_slots: int, reduction: str, dtype: torch.dtype, *,
                    total: Callable[[torch.Tensor], torch.Tensor] = lambda local: local,
                    ranks: int = 1, normalizer: torch.Tensor | None = None, answers: int | None = None,
                    slot_answers: torch.Tensor | None = None,
                    slot_total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SentenceLayout:
    """Counts and reduction weights from ``segment_ids [B, T]`` (ids in ``[-1, num_slots)``), no host sync.

    ``total`` turns this batch's denominator (``B'`` or ``Σ n``, a 0-dim tensor) into the global one and ``ranks``
    multiplies the weights: the driver passes a sum over the data-parallel ranks and their number
    (see ``ops/driver.py``); this module knows nothing of processes. A ``normalizer`` (0-dim tensor) replaces
    the global denominator (``B'``, ``Σ n`` or 1). Each row is an answer unless ``slot_answers`` (int64
    ``[B * num_slots]``, values in ``[0, answers)``) says which answer each slot belongs to (packed inputs,
    ``ops/packed.py``); ``slot_total`` sums the per-slot token counts over the ranks that share the sequence.
    """
    batch, length = segment_ids.shape
    segments = segment_ids.reshape(-1).long()
    rows = torch.arange(segments.numel(), device=segments.device) // max(length, 1)
    slots = torch.where(segments >= 0, rows * num_slots + segments, batch * num_slots)   # unscored -> spare bin
    # a bincount of known length (bincount's length depends on the data: no meta tensors, no torch.compile graph)
    count = torch.zeros(batch * num_slots + 1, dtype=torch.int64, device=segments.device)
    count = count.scatter_add_(0, slots, torch.ones_like(slots))[:batch * num_slots]
    shared = None
    if slot_total is not None:
        local, count = count, slot_total(count)
        shared = (local > 0) & (local < count)
    exists = count > 0

    def denominator(local: torch.Tensor) -> torch.Tensor:
        return total(local).clamp(min=1).to(dtype) if normalizer is None else normalizer.to(dtype)

    if reduction.startswith("answer_mean") or reduction == "sentence_mean":   # 1 / (S_i · B'), 1 / B', n / B'
        if slot_answers is None:
            sentences_per_row = exists.view(batch, num_slots).sum(1)
            to_slots = lambda per_row: per_row.expand(batch).repeat_interleave(num_slots)  # noqa: E731
        else:
            sentences_per_row = torch.zeros(answers, dtype=torch.int64, device=segments.device).index_add_(
                0, slot_answers, exists.long())
            to_slots = lambda per_row: per_row.expand(answers)[slot_answers]  # noqa: E731
        rows = denominator((sentences_per_row > 0).sum())
        per_row = sentences_per_row.clamp(min=1).to(dtype) if reduction == "sentence_mean" else 1.0
        weight = to_slots(1.0 / (per_row * rows))
        if reduction == "answer_mean_token_sum":
            weight = weight * count.to(dtype)
    elif reduction == "token_mean":      # n(i, s) / Σ n
        weight = count.to(dtype) / denominator(count.sum())
    else:
        weight = torch.ones(batch * num_slots, dtype=dtype, device=segments.device)
        if normalizer is not None:
            weight = weight / normalizer.to(dtype)
    weight = torch.where(exists, weight * ranks, 0.0)
    return SentenceLayout(batch, length, num_slots, count.to(torch.int32), weight, shared)


@dataclass
class SentenceSums:
    """Pass B's per-sentence sums over the tokens, fp64, flat ``[B * S_max]`` (``None``: not needed):
    ``Σ Δ_t`` (log-ratio), ``Σ kl_t`` (the KL estimator, when ``beta > 0``), ``Σ q_t logp_t`` (for ``cispo`` and
    ``vespo``; ``q_t`` the token weight, 1 without one), ``Σ q_t`` (with token weights), for ``geo_mean`` the sum
    of the clipped ``Δ_t`` and the number of clipped tokens, and for ``vespo`` with importance weights the sum of
    their logs (computed by the driver, not by the passes)."""

    log_ratio: torch.Tensor
    kl: torch.Tensor | None
    logp: torch.Tensor | None
    weight: torch.Tensor | None = None
    clipped_log_ratio: torch.Tensor | None = None
    clipped_tokens: torch.Tensor | None = None
    log_is: torch.Tensor | None = None

    @classmethod
    def zeros(cls, layout: SentenceLayout, config, with_token_weights: bool = False,
              log_is: torch.Tensor | None = None) -> SentenceSums:
        """Zeroed accumulators for the options of ``config`` (a ``LossConfig``) and token weights if any;
        ``log_is`` (``vespo``'s per-sentence log importance weights) is kept as given."""
        def zeros(needed=True):
            return torch.zeros(layout.count.numel(), dtype=torch.float64, device=layout.count.device) if needed \
                else None
        geo = config.objective == "geo_mean"
        return cls(zeros(), zeros(config.beta > 0), zeros(config.objective in ("cispo", "vespo")),
                   zeros(with_token_weights), zeros(geo), zeros(geo), log_is)


@dataclass
class SentenceTerms:
    """Output of the terms step, flat ``[B * S_max]``: ``w · L``, ratio, and the two gradient factors:
    ``ratio_coef``, the part of ``c_t`` every token of the sentence shares, ``kl_coef``, which multiplies the
    token's own ``∂kl_t/∂logp_t``, ``weight_coef`` (``cispo``, ``vespo``), which multiplies the token's weight
    ``q_t`` (1 without token weights), and ``clip_coef`` (``geo_mean``), which reaches only the tokens its clip
    left alone."""

    weighted_loss: torch.Tensor
    ratio: torch.Tensor
    ratio_coef: torch.Tensor
    kl_coef: torch.Tensor | None
    weight_coef: torch.Tensor | None = None
    clip_coef: torch.Tensor | None = None


@dataclass
class SentenceArrays:
    """Per-slot results of pass B, flat ``[B * S_max]``: token count (int32), ratio ρ (after the log clamp),
    the raw sum of k3 (fp64, ``None`` when ``beta == 0``) and ``geo_mean``'s count of clipped tokens."""

    count: torch.Tensor
    ratio: torch.Tensor
    kl_sum: torch.Tensor | None
    clipped_tokens: torch.Tensor | None = None


def sentence_metrics(arrays: SentenceArrays, advantages: torch.Tensor, scored: torch.Tensor,
                     entropy: torch.Tensor | None, config,
                     total: Callable[[torch.Tensor], torch.Tensor] = lambda local: local) -> dict:
    """The metrics of ``sentence_grpo_loss(return_metrics=True)`` as detached 0-dim tensors (no host sync).

    ``scored``: flat ``[B*T]`` bool; ``entropy``: flat ``[B*T]`` (read only where scored) or ``None``;
    ``total`` sums the entropies over the ranks that share the sequence (the arrays are already global).
    """
    with torch.no_grad():
        exists = arrays.count > 0
        num_sentences = exists.sum()
        num_tokens = arrays.count.sum(dtype=torch.int64)
        if advantages.dim() == 2:
            slot_advantages = advantages.reshape(-1)
        else:
            slot_advantages = advantages.repeat_interleave(arrays.count.numel() // max(advantages.shape[0], 1))
        ratio = arrays.ratio
        clipped = clipped_sentences(ratio, slot_advantages.to(ratio.dtype), config, arrays.clipped_tokens)
        sentences = num_sentences.clamp(min=1)
        metrics = {
            "clip_fraction": ((clipped & exists).sum() / sentences).to(ratio.dtype),   # int/int is float32
            "ratio_mean": torch.where(exists, ratio, 0.0).sum() / sentences,
            "num_sentences": num_sentences,
            "num_tokens": num_tokens,
        }
        if arrays.kl_sum is not None:
            metrics["kl_mean"] = (arrays.kl_sum.sum() / num_tokens.clamp(min=1)).to(ratio.dtype)
        if entropy is not None:
            metrics["entropy_mean"] = total(torch.where(scored, entropy, 0.0).sum()) / num_tokens.clamp(min=1)
        return metrics
