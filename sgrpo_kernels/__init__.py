"""Fused kernels for sentence-level GRPO: per-sentence ratios, clipping, KL and group advantages.

Public API (DESIGN.md §2); everything else is internal.
"""

from .advantages import group_sentence_advantages
from .loss import (
    SentenceGRPOLoss,
    fused_linear_sentence_grpo_loss,
    fused_linear_token_logprobs,
    sentence_grpo_loss,
    token_logprobs,
)
from .segmentation import Segmentation, Segmenter

__version__ = "0.1.0"

__all__ = [
    "Segmentation",
    "Segmenter",
    "SentenceGRPOLoss",
    "fused_linear_sentence_grpo_loss",
    "fused_linear_token_logprobs",
    "group_sentence_advantages",
    "sentence_grpo_loss",
    "token_logprobs",
]
