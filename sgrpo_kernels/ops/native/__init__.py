"""The native backend: passes A, B and C and the group advantages in C++ (``csrc/``, the extension
``sgrpo_kernels._native``) for CPU tensors; an ``ops.passes.Passes``."""

from .passes import logits_gradient, token_scores
from .sentence import group_advantages, sentence_sums, sentence_terms, token_coefficients

__all__ = ["group_advantages", "logits_gradient", "sentence_sums", "sentence_terms", "token_coefficients",
           "token_scores"]
