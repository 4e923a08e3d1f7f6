"""The PyTorch backend: the passes in chunked PyTorch for CPU (or any) tensors; an ``ops.passes.Passes``."""

from .group_advantages import group_advantages
from .passes import (
    logits_gradient,
    sentence_sums,
    sentence_terms,
    token_coefficients,
    token_scores,
)

__all__ = ["group_advantages", "logits_gradient", "sentence_sums", "sentence_terms", "token_coefficients",
           "token_scores"]
