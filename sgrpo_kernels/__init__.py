"""Fused kernels for sentence-level GRPO: per-sentence ratios, clipping, KL and group advantages.

The public API is the names below (``docs/design.md`` describes them); everything else is internal.
"""

from importlib.metadata import PackageNotFoundError, version

from .advantages import group_sentence_advantages
from .loss import (
    SentenceGRPOLoss,
    fused_linear_sentence_grpo_loss,
    fused_linear_token_logprobs,
    sentence_grpo_loss,
    token_logprobs,
)
from .segmentation import Segmentation, Segmenter

try:
    __version__ = version("sgrpo-kernels")     # one version: pyproject.toml's
except PackageNotFoundError:                    # a source tree that was never installed
    __version__ = "0+unknown"

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
