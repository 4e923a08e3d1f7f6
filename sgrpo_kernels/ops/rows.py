"""The loss's per-token inputs in the row layout the passes address: ``[B, T]`` rows as given, or a packed batch
(``cu_seqlens``) as one row with global sentence slots (``ops/packed.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packed import as_row, packed_row


def num_slots(segment_ids: torch.Tensor, advantages: torch.Tensor) -> int:
    """``S_max``: ``advantages.shape[1]``, or one more than the largest segment id for ``[B]`` advantages."""
    if advantages.dim() == 2:
        return advantages.shape[1]
    return max(int(segment_ids.max()) + 1, 1) if segment_ids.numel() else 1


@dataclass
class RowInputs:
    """``completion_ids``, ``segment_ids`` ``[rows, T]``, ``advantages`` ``[rows, num_slots]`` or ``[rows]``, the
    per-token ``old_logps``, ``ref_logps``, ``is_weights`` (or ``[rows]``), ``sampling_logps`` (each ``None`` when
    absent), ``num_slots`` (``S_max``) and the :class:`~sgrpo_kernels.ops.packed.Packing` of a packed row (else
    ``None``)."""

    completion_ids: torch.Tensor
    segment_ids: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    is_weights: torch.Tensor | None
    sampling_logps: torch.Tensor | None
    num_slots: int
    packing: object = None

    @classmethod
    def of(cls, completion_ids, segment_ids, advantages, request) -> RowInputs:
        """The rows of a call's inputs and its request's per-rollout tensors (packed ones as one row; with the
        request's ``sp_group``, this rank's slice of it)."""
        if request.cu_seqlens is not None:
            segments, slot_advantages, slots, packing = packed_row(request.cu_seqlens, segment_ids, advantages,
                                                                   request.sp_group)
            return cls(as_row(completion_ids), segments, slot_advantages, as_row(request.old_logps),
                       as_row(request.ref_logps), as_row(request.is_weights), as_row(request.sampling_logps), slots,
                       packing)
        return cls(completion_ids, segment_ids, advantages, request.old_logps, request.ref_logps, request.is_weights,
                   request.sampling_logps, num_slots(segment_ids, advantages))
