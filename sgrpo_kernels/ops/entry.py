"""What the public functions call below them: each entry point takes a call's tensors and its
:class:`~sgrpo_kernels.ops.request.LossRequest` (built and checked once, above) and runs the request's backend,
through a custom op, or through the driver directly for the loss that writes its gradient over the logits in eager
mode (``inplace=True``; a custom op may not mutate an input it differentiates)."""

from __future__ import annotations

import dataclasses

import torch

from ..config import check_loss_values
from . import custom_ops
from .backends import backend_passes
from .driver import LossOutputs, run_loss_on_logps, sentence_grpo_loss_inplace
from .fused_linear import default_chunk_size
from .request import LossRequest
from .rows import RowInputs, num_slots


def _shaped(outputs: LossOutputs, shape) -> LossOutputs:
    """The token scores in the shape of the token axes (``[B, T]``, or ``[N]`` packed)."""
    if outputs.token_logp is None:
        return outputs
    return outputs._replace(token_logp=outputs.token_logp.view(shape), token_entropy=outputs.token_entropy.view(shape))


def loss_on_logits(logits, completion_ids, segment_ids, advantages, request: LossRequest, *,
                   inplace: bool) -> LossOutputs:
    """The loss of ``logits`` ``[B, T, V]`` (packed: ``[N, V]``); with ``inplace`` (eager mode) its gradient
    overwrites the logits."""
    request = dataclasses.replace(request, grad_input=logits.requires_grad and torch.is_grad_enabled())
    if inplace and request.grad_input and not torch.compiler.is_compiling():
        check_loss_values(completion_ids, segment_ids, advantages, request.vocab_size(logits.shape[-1]))
        rows = RowInputs.of(completion_ids, segment_ids, advantages, request)
        outputs = sentence_grpo_loss_inplace(request.passes(logits.shape[-1]), logits, rows, request)
    else:
        outputs = custom_ops.sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, request)
    return _shaped(outputs, logits.shape[:-1])


def loss_on_hidden(hidden, weight, bias, completion_ids, segment_ids, advantages,
                   request: LossRequest) -> LossOutputs:
    """The loss of ``hidden @ weight.T + bias`` (hidden ``[B, T, H]`` or packed ``[N, H]``), a chunk at a time."""
    grad = torch.is_grad_enabled()
    request = dataclasses.replace(request, grad_input=grad and hidden.requires_grad,
                                  grad_weight=grad and weight.requires_grad,
                                  grad_bias=grad and bias is not None and bias.requires_grad)
    outputs = custom_ops.fused_linear_sentence_grpo_loss(hidden, weight, bias, completion_ids, segment_ids,
                                                         advantages, request)
    return _shaped(outputs, hidden.shape[:-1])


def logprobs_on_logits(logits, ids, request: LossRequest):
    """``(logp, entropy or None)`` of ``ids`` under ``softmax(logits / T)``, differentiable: logits ``[..., V]``,
    ids ``[...]`` -> ``[...]`` each."""
    vocab = logits.shape[-1]
    rows = logits if logits.dim() == 3 and logits.stride(-1) == 1 else logits.reshape(-1, 1, vocab).contiguous()
    logp, entropy = custom_ops.token_logprobs(rows, ids.reshape(rows.shape[:-1]), request)
    return logp.view(ids.shape), None if entropy is None else entropy.view(ids.shape)


def logprobs_on_hidden(hidden, weight, bias, ids, request: LossRequest):
    """:func:`logprobs_on_logits` of ``hidden @ weight.T + bias`` (hidden ``[B, T, H]``, ids ``[B, T]``), a chunk
    of rows at a time."""
    chunk_size = request.chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    request = dataclasses.replace(request, chunk_size=chunk_size)
    logp, entropy = custom_ops.fused_linear_token_logprobs(hidden, weight, bias, ids, request)
    return logp.view(ids.shape), None if entropy is None else entropy.view(ids.shape)


class _LossOnLogps(torch.autograd.Function):
    """The loss of given log-probs; its gradient (``∂loss/∂logp``, and ``∂loss/∂H`` of the entropy bonus) is
    finished in the forward pass, and backward scales it by ``grad_output``."""

    @staticmethod
    def forward(ctx, logps, entropy, segment_ids, advantages, request, results):
        rows = RowInputs(None, segment_ids, advantages, request.old_logps, request.ref_logps, request.is_weights,
                         request.sampling_logps, num_slots(segment_ids, advantages))
        outputs, logp_coef, entropy_coef = run_loss_on_logps(backend_passes(request.backend), logps, entropy, rows,
                                                             request)
        results.append(outputs)
        ctx.has_entropy_gradient = entropy is not None and entropy_coef is not None
        ctx.save_for_backward(logp_coef.view(logps.shape).to(logps.dtype),
                              entropy_coef.view(entropy.shape).to(entropy.dtype) if ctx.has_entropy_gradient
                              else None)
        return outputs.loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        logp_coef, entropy_coef = ctx.saved_tensors
        grad_entropy = grad_output * entropy_coef if ctx.has_entropy_gradient else None
        return grad_output * logp_coef, grad_entropy, None, None, None, None


def loss_on_logps(logps, entropy, segment_ids, advantages, request: LossRequest) -> LossOutputs:
    """The loss from token log-probs ``[B, T]`` (a trainer that already has them, as verl's policy losses do) and
    their entropies ``[B, T]`` or ``None``: pass B only, O(tokens) work; gradients flow into ``logps`` (and
    ``entropy``, for the entropy bonus)."""
    check_loss_values(None, segment_ids, advantages, 0)
    results = []
    loss = _LossOnLogps.apply(logps, entropy, segment_ids, advantages, request, results)
    return results[0]._replace(loss=loss)


def group_advantages(rewards, num_sentences, group_size: int, backend: str, **options) -> torch.Tensor | None:
    """The resolved ``backend``'s group advantages (``None``: it cannot take the shape)."""
    return backend_passes(backend).group_advantages(rewards, num_sentences, group_size, **options)
