"""Passes A and C through the C++ operators ``torch.ops.sgrpo_native`` (``csrc/ops.cpp``)."""

from __future__ import annotations

import torch

from ..passes import TokenScores, check_row_layout, index_vector, new_token_scores
from .extension import load


def token_scores(logits: torch.Tensor, ids: torch.Tensor, temperature: float, *,
                 segment_ids: torch.Tensor | None = None, with_entropy: bool = False) -> TokenScores:
    """Pass A; the contract of ``ops.passes.Passes.token_scores``."""
    load()
    scores = new_token_scores(logits, with_entropy)
    rows = None if segment_ids is None else torch.nonzero(segment_ids.reshape(-1) >= 0).squeeze(1)
    torch.ops.sgrpo_native.token_scores_(logits, index_vector(ids), rows, float(temperature), scores.logp,
                                         scores.lse, scores.entropy)
    return scores


def logits_gradient(logits: torch.Tensor, ids: torch.Tensor, logp_coef: torch.Tensor, lse: torch.Tensor,
                    temperature: float, out: torch.Tensor, *, entropy_coef: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Pass C; the contract of ``ops.passes.Passes.logits_gradient`` (``out`` may be ``logits``)."""
    load()
    check_row_layout("logits", logits)
    dtype = lse.dtype
    as_vector = lambda tensor: None if tensor is None else tensor.reshape(-1).to(dtype).contiguous()  # noqa: E731
    torch.ops.sgrpo_native.logits_gradient_(logits, index_vector(ids), as_vector(logp_coef), lse.contiguous(),
                                            float(temperature), out, as_vector(entropy_coef), as_vector(entropy))
    return out
