"""The Triton backend: fused kernels for CUDA (and CPU under ``TRITON_INTERPRET=1``); an ``ops.passes.Passes``.

``logprobs.py``: passes A and C over the vocabulary; ``sentence_grpo.py``: pass B; ``group_advantages.py``: the
group-relative advantages; ``common.py``: what the kernels share. The source checkout's ``tools/kernel_builds.py``
builds every kernel for real GPU targets without a GPU (the test suite's compile gate); it is not shipped here.
"""

from .group_advantages import group_advantages
from .logprobs import logits_gradient, token_scores
from .sentence_grpo import sentence_sums, sentence_terms, token_coefficients

__all__ = ["group_advantages", "logits_gradient", "sentence_sums", "sentence_terms", "token_coefficients",
           "token_scores"]
