"""Packed (padding-free) inputs and sequence-parallel shards, run as one row of the padded layout.

A packed batch holds its ``B`` answers back to back on one token axis of ``N`` tokens, answer ``i`` at
``cu_seqlens[i]:cu_seqlens[i + 1]`` (verl's remove-padding layout, flash-attn's varlen API). Every pass addresses
a sentence slot as ``row * num_slots + segment``, so a packed batch is handed to them as ONE row of its tokens
whose segment ids are made global: answer ``i``'s sentences take the slots ``slot_start[i] .. slot_start[i] +
S_i − 1`` with ``S_i`` one more than its largest segment id. The numbering is compact (``Σ S_i ≤ N + B``, whatever
the longest answer), so neither a ``[B, T_max]`` nor a ``[B, S_max]`` tensor is made, and no kernel changes: only
the reduction weights (``B'``, ``S_i``) group the slots by answer (:class:`Packing`, read by
``layout.sentence_layout``), and the sequence-level rollout weights group the tokens by answer.

Sequence parallel (``sp_group``): each rank holds a contiguous slice of the ``N`` tokens (any split points) and the
global ``cu_seqlens``. Its slice starts at the sum of the lower ranks' token counts (one all-gather of an int per
rank, ``distributed.sequence_slice``); every rank numbers the slots alike (``S_i``: one all-reduce (max) of ``B``
ints) and the per-slot sums of its tokens are summed over the group (``Packing.total``): the token counts before
the reduction weights, pass B's sums before the terms, the entropy sums. That is ``O(sentences)`` floats per
array, never ``O(tokens)``; a sentence split between ranks is then finished like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..config import check_cu_seqlens_values


@dataclass
class Packing:
    """How the slots of a packed row group into answers, and how per-slot sums span the sequence-parallel ranks.

    ``answers``: ``B`` (at least 1); ``slot_answers``: int64 ``[num_slots]``, the answer of each slot;
    ``sequence_group``: the ``sp_group`` or ``None``.
    """

    answers: int
    slot_answers: torch.Tensor
    sequence_group: object = None

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks that share the sequence (itself without ``sp_group``)."""
        return distributed.global_sum(tensor, self.sequence_group)

    @property
    def split(self) -> bool:
        """Whether the sequence is split over ranks."""
        return self.sequence_group is not None

    def layout_options(self) -> dict:
        """The keywords of ``layout.sentence_layout`` for this packing."""
        return dict(answers=self.answers, slot_answers=self.slot_answers,
                    slot_total=self.total if self.split else None)


def packed_row(cu_seqlens: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor, sp_group=None):
    """The one-row form of a packed batch (or of this rank's slice of it).

    cu_seqlens ``[B + 1]`` int (checked here: ``0 = cu[0] <= ... <= cu[B] = N``, ``N`` summed over ``sp_group``),
    segment_ids ``[n]`` int (sentence index within its answer, ``-1`` unscored; ``n = N`` without ``sp_group``),
    advantages ``[B, S_max]`` or ``[B]``. Returns ``(segment_ids [1, n] int64 global slot ids or -1,
    advantages [1, num_slots] (one per slot, in the dtype of ``advantages``), num_slots, Packing)``.
    Reads ``B + 1`` ints on the host and the total slot count (one sync each).
    """
    device = segment_ids.device
    start, total_tokens = distributed.sequence_slice(segment_ids.numel(), sp_group, device)
    check_cu_seqlens_values(cu_seqlens, total_tokens)
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    batch = offsets.numel() - 1
    positions = torch.arange(start, start + segment_ids.numel(), device=device)
    answer = torch.searchsorted(offsets, positions, right=True) - 1         # [n]: last answer starting at or before
    segments = segment_ids.reshape(-1).long()
    scored = segments >= 0
    sentences = torch.zeros(batch, dtype=torch.int64, device=device).scatter_reduce_(
        0, answer, torch.where(scored, segments + 1, 0), reduce="amax")         # S_i of this rank's tokens
    sentences = distributed.global_max(sentences, sp_group)
    slot_start = torch.cumsum(sentences, 0) - sentences
    real_slots = int(sentences.sum())
    num_slots = max(real_slots, 1)               # a batch without sentences keeps one empty slot, as padded rows do
    answers = torch.arange(batch, device=device)
    slot_answers = torch.repeat_interleave(answers, sentences, output_size=real_slots)
    within = torch.arange(real_slots, device=device) - slot_start[slot_answers]
    slot_advantages = advantages.new_zeros(num_slots)
    slot_advantages[:real_slots] = (advantages[slot_answers, within] if advantages.dim() == 2
                                    else advantages[slot_answers])
    row_segments = torch.where(scored, slot_start[answer] + segments, -1) if segments.numel() else segments
    slot_answers = torch.cat([slot_answers, slot_answers.new_zeros(num_slots - real_slots)])
    packing = Packing(max(batch, 1), slot_answers, sp_group)
    return row_segments.unsqueeze(0), slot_advantages.unsqueeze(0), num_slots, packing


def as_row(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A packed per-token tensor ``[N, ...]`` as the one row ``[1, N, ...]`` (a view; ``None`` stays ``None``)."""
    return None if tensor is None else tensor.unsqueeze(0)
