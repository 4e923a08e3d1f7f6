"""What a kernel backend provides (the :class:`Passes` protocol) and the helpers every backend shares.

A backend is a module under ``ops/`` (``ops/triton``, ``ops/torch``) that defines the functions of
:class:`Passes`; the driver (``ops/driver.py``, ``ops/fused_linear.py``) runs them. Pass A reads the logits once,
pass B works on ``[B, T]`` and per-sentence data, pass C writes the gradient of the logits
(``docs/design.md``, "The passes"). Backends know nothing of processes: what spans ranks is done by the driver.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from ..config import KL_ESTIMATORS, OBJECTIVES

# The integer codes the compiled backends (Triton, C++) take for the string options.
KL_ESTIMATOR_CODES = {name: code for code, name in enumerate(KL_ESTIMATORS)}
OBJECTIVE_CODES = {name: code for code, name in enumerate(OBJECTIVES)}
# group advantages: 0 only centres, 1 divides by the standard deviation, 2 by the Bessel-corrected one
SCALE_CODES = {"none": 0, "std": 1, "unbiased_std": 2}

# Tests set this to True: every fresh output is then filled with NaN, so an element that a kernel
# forgets to write shows up as a failure instead of as a lucky zero.
POISON_FRESH_OUTPUTS = False


class TokenScores(NamedTuple):
    """Pass A's results, flat ``[B*T]`` in the accumulator dtype: ``log softmax(z/T)[id]``, ``logsumexp(z/T)``
    and the entropy of ``softmax(z/T)`` (``None`` unless asked for). Rows not scored are left unwritten."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None


@runtime_checkable
class Passes(Protocol):
    """The passes of one backend. Flat positions index ``[B*T]``; ``num_slots`` is ``S_max``.

    The per-sentence arrays (``SentenceLayout``, ``SentenceTerms`` of ``ops/layout.py``) are flat ``[B*S_max]``.
    """

    def token_scores(self, logits: torch.Tensor, ids: torch.Tensor, temperature: float, *,
                     segment_ids: torch.Tensor | None = None, with_entropy: bool = False) -> TokenScores:
        """Pass A on ``logits [B, T, V]`` (vocabulary contiguous) and ``ids [B, T]``; only rows with
        ``segment_ids >= 0`` when ``segment_ids`` is given."""

    def sentence_sums(self, logp, old_logps, ref_logps, segment_ids, num_slots: int, sums, config,
                      tokens=None, token_weights=None, advantages=None) -> None:
        """Pass B: add ``Δ_t = logp − old``, the KL estimate ``kl_t``, ``q_t logp_t``, ``q_t`` and (``geo_mean``,
        whose clip depends on the sign of the sentence's ``advantages``) the clipped ``Δ_t`` and the clip count of
        each scored token (of ``tokens``, flat positions, if given) into the fp64 ``layout.SentenceSums`` that
        are not ``None``; ``token_weights``: flat ``[B*T]`` ``q_t`` or ``None`` (all 1)."""

    def sentence_terms(self, layout, sums, advantages, config):
        """Pass B: per sentence, the ratio, ``w · L`` and the two gradient factors -> ``SentenceTerms``."""

    def token_coefficients(self, logp, ref_logps, segment_ids, num_slots: int, terms, config,
                           tokens=None, token_weights=None, old_logps=None, advantages=None) -> torch.Tensor:
        """Pass B: ``c_t = ∂loss/∂logp_t`` for every token (or for ``tokens``), 0 where not scored
        (``old_logps``, ``advantages``: for ``geo_mean``'s per-token clip)."""

    def logits_gradient(self, logits, ids, logp_coef, lse, temperature: float, out, *, entropy_coef=None,
                        entropy=None) -> torch.Tensor:
        """Pass C: ``out = (logp_coef · (onehot − p) − entropy_coef · p (log p + H)) / T``; ``out`` may be
        ``logits`` itself. Rows whose coefficients are all 0 get zeros."""

    def group_advantages(self, rewards, num_sentences, group_size: int, eps: float, weighting: str, scale: str,
                         mode: str, answer_mix: float = 0.0, baseline: str = "pooled") -> torch.Tensor | None:
        """Group-relative sentence advantages ``[B, S_max]`` (``reference.group_sentence_advantages``), or
        ``None`` when this backend cannot take the shape (the caller then uses the reference)."""


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled (integer: -1) tensor when ``POISON_FRESH_OUTPUTS`` is set."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if POISON_FRESH_OUTPUTS:
        tensor.fill_(math.nan if dtype.is_floating_point else -1)
    return tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_vector(tensor: torch.Tensor) -> torch.Tensor:
    """Flat contiguous int64 copy (or view) of token ids, segment ids or counts of any integer dtype.

    The kernels are compiled once per pointer type: giving them one index dtype and one float dtype (below)
    for the small per-token tensors keeps the number of compiled specialisations small and known.
    """
    return tensor.reshape(-1).to(torch.int64).contiguous()


def float_vector(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat contiguous ``dtype`` (the accumulator dtype) copy (or view) of a per-token or per-sentence tensor."""
    return tensor.reshape(-1).to(dtype).contiguous()


def check_row_layout(name: str, tensor: torch.Tensor) -> None:
    """The kernels address ``[B, T, V]`` rows by two strides and need the vocabulary dimension contiguous."""
    if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous along the vocabulary (last) dimension, "
                         f"got strides {tuple(tensor.stride())}; call .contiguous() first")


def flat_token_weights(is_weights: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``[B]`` (one per answer) or ``[B, T]`` token weights as a flat ``[B*T]`` tensor (``None`` stays ``None``)."""
    if is_weights is None:
        return None
    per_token = is_weights.unsqueeze(1).expand(batch, length) if is_weights.dim() == 1 else is_weights
    return per_token.reshape(-1)


def new_token_scores(logits: torch.Tensor, with_entropy: bool) -> TokenScores:
    """Fresh flat ``[B*T]`` outputs of pass A for ``[B, T, V]`` logits (checked for a contiguous vocabulary)."""
    check_row_layout("logits", logits)
    rows = logits.shape[0] * logits.shape[1]
    dtype = accumulator_dtype(logits.dtype)
    entropy = new_output((rows,), dtype, logits.device) if with_entropy else None
    return TokenScores(new_output((rows,), dtype, logits.device), new_output((rows,), dtype, logits.device), entropy)
