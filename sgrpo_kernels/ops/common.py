"""What the kernel backends share: output allocation, the autograd Functions and the pass orchestration.

A backend is a :class:`Passes`: pass A (log-probs, logsumexp, entropy from one read of the logits),
pass B (per-sentence sums, terms and the per-token coefficient ``c_t = ∂loss/∂logp_t``) and pass C
(``c_t / T · (onehot − softmax)``). The Triton backend and the chunked PyTorch backend implement the same
passes; this module runs either of them on logits, ``ops/fused_linear.py`` on chunks of ``hidden @ weight.T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sentence_layout import SentenceArrays, SentenceLayout, sentence_layout, sentence_metrics

# Tests set this to True: every fresh output is then filled with NaN, so an element that a kernel
# forgets to write shows up as a failure instead of as a lucky zero.
POISON_FRESH_OUTPUTS = False


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


class EagerGradient(torch.autograd.Function):
    """Attach to some inputs gradients already computed in the forward pass.

    ``EagerGradient.apply(value, gradients, *inputs)`` returns ``value``; ``backward`` hands ``gradients[k]``
    to ``inputs[k]``, scaled by ``grad_output`` (skipped when it is exactly 1, the usual ``loss.backward()``,
    which saves a full read and write of each gradient). The gradients are handed over once: a second
    backward through the same graph (``retain_graph=True``) raises instead of returning stale buffers.
    """

    @staticmethod
    def forward(ctx, value, gradients, *inputs):
        ctx.gradients = list(gradients)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.gradients is None:
            raise RuntimeError("this fused loss computed its gradient in the forward pass and has already "
                               "handed it over; backward can run once per forward (no retain_graph reuse)")
        gradients, ctx.gradients = ctx.gradients, None
        if grad_output.item() != 1.0:
            gradients = [None if gradient is None else gradient.mul_(grad_output.to(gradient.dtype))
                         for gradient in gradients]
        return (None, None, *gradients)


@dataclass(frozen=True)
class Passes:
    """The passes of one backend (contracts in ``ops/logprobs.py`` and ``ops/sentence_grpo.py``)."""

    logsumexp: Callable       # A: logits -> logp, lse, entropy
    sentence_sums: Callable   # B: Σ Δ_t and Σ k3_t per sentence
    sentence_terms: Callable  # B: ratio, clipping, w · L and the gradient factors per sentence
    token_coef: Callable      # B: c_t = ∂loss/∂logp_t
    logits_grad: Callable     # C: c_t / T · (onehot − softmax)


def sentence_sums_buffers(layout: SentenceLayout, with_kl: bool):
    """Zeroed fp64 accumulators ``(Σ Δ, Σ k3 or None)``, flat ``[B * S_max]``."""
    zeros = lambda: torch.zeros(layout.count.numel(), dtype=torch.float64, device=layout.count.device)  # noqa: E731
    return zeros(), zeros() if with_kl else None


def run_sentence_grpo_loss(passes: Passes, logits, completion_ids, segment_ids, advantages, old_logps, ref_logps,
                           config, num_slots: int, *, inplace: bool, return_metrics: bool, process_group=None):
    """The loss of DESIGN.md §1 with passes A, B and, when ``logits`` needs a gradient, C.

    Inputs as ``reference.sentence_grpo_loss`` (already validated); ``num_slots`` is ``S_max``.
    The gradient is computed here, in the forward pass, into a new buffer or into ``logits``
    (``inplace=True``, which overwrites the logits); backward only scales it by ``grad_output``.
    """
    needs_gradient = logits.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():   # the passes compute the gradient themselves: autograd must record nothing here
        logp, lse, entropy = passes.logsumexp(logits, completion_ids, config.temperature, segment_ids=segment_ids,
                                              with_entropy=return_metrics)
        layout = sentence_layout(segment_ids, num_slots, config.reduction, logp.dtype, process_group)
        log_ratio_sum, kl_sum = sentence_sums_buffers(layout, config.beta > 0)
        passes.sentence_sums(logp, old_logps, ref_logps, segment_ids, num_slots, log_ratio_sum, kl_sum)
        terms = passes.sentence_terms(layout, log_ratio_sum, kl_sum, advantages, config)
        loss = terms.weighted_loss.sum()
        if needs_gradient:
            token_coef = passes.token_coef(logp, ref_logps, segment_ids, num_slots, terms)
            gradient = logits.detach() if inplace else new_output(logits.shape, logits.dtype, logits.device)
            passes.logits_grad(logits.detach(), completion_ids, token_coef, lse, config.temperature, gradient)
    if needs_gradient:
        if inplace:   # autograd must refuse any later use of the overwritten logits
            torch.autograd.graph.increment_version(logits)
        loss = EagerGradient.apply(loss, (gradient,), logits)
    if not return_metrics:
        return loss
    arrays = SentenceArrays(count=layout.count, ratio=terms.ratio, kl_sum=kl_sum)
    return loss, sentence_metrics(arrays, advantages, segment_ids.reshape(-1) >= 0, entropy, config)


class TokenLogprobs(torch.autograd.Function):
    """``logp[b, t]`` (and entropy) of ``[B, T, V]`` logits by pass A; backward runs pass C with the
    incoming gradients as coefficients (this one is not eager: the coefficients arrive in backward)."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, with_entropy, passes):
        logp, lse, entropy = passes.logsumexp(logits, ids, temperature, with_entropy=with_entropy)
        ctx.save_for_backward(logits, ids, lse, entropy)
        ctx.temperature, ctx.passes = temperature, passes
        shape = logits.shape[:-1]
        if with_entropy:
            return logp.view(shape), entropy.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, ids, lse, entropy = ctx.saved_tensors
        rows = lse.numel()
        logp_coef = torch.zeros(rows, dtype=lse.dtype, device=lse.device) if grad_logp is None else grad_logp
        entropy_coef = None if grad_entropy is None else grad_entropy.reshape(rows).to(lse.dtype)
        gradient = new_output(logits.shape, logits.dtype, logits.device)
        ctx.passes.logits_grad(logits, ids, logp_coef.reshape(rows).to(lse.dtype), lse, ctx.temperature, gradient,
                               entropy_coef=entropy_coef, entropy=entropy)
        return gradient, None, None, None, None


def run_token_logprobs(passes: Passes, logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                       return_entropy: bool):
    """``[..., V]`` logits, ``[...]`` ids -> logp ``[...]`` (and entropy) in the accumulator dtype."""
    vocab = logits.shape[-1]
    if logits.dim() != 3 or logits.stride(-1) != 1:
        logits = logits.reshape(-1, 1, vocab).contiguous()
    result = TokenLogprobs.apply(logits, ids.reshape(logits.shape[:-1]), temperature, return_entropy, passes)
    if return_entropy:
        return result[0].view(ids.shape), result[1].view(ids.shape)
    return result.view(ids.shape)
