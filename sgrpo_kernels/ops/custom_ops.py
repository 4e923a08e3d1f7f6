"""The kernel backends' entry points as ``torch.library`` custom ops, so that ``torch.compile`` sees each as one node.

Each op has a fake (meta) implementation giving its output shapes, and an autograd formula. The loss ops return
the gradient they finished in the forward pass (``docs/design.md``, "The passes"); their backward only scales it
by ``grad_output``, in place and without a host sync (:func:`scale_gradients_`). Every op takes its tensors and
then the call's :class:`~sgrpo_kernels.ops.request.LossRequest` as the flat argument list that ``request.py``
generates from one field list (schema, packing, unpacking and the backward's ``None`` gradients alike). Value
checks of the ids (which read tensors) run inside the ops, before any kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import check_loss_values, check_token_ids
from . import packed
from .driver import LossOutputs, run_sentence_grpo_loss, token_logprobs_backward
from .fused_linear import fused_linear_token_scores, fused_linear_token_scores_backward, run_fused_linear_loss
from .library import LIBRARY, NAMESPACE, scale_gradients_
from .passes import accumulator_dtype
from .request import NUM_REQUEST_ARGUMENTS, REQUEST_SCHEMA, LossRequest, pack, unpack
from .rows import RowInputs

_NO_REQUEST_GRADIENTS = (None,) * NUM_REQUEST_ARGUMENTS


def _define(name: str, tensors: str, outputs: str, implementation, fake) -> None:
    LIBRARY.define(f"{name}({tensors}, {REQUEST_SCHEMA}) -> {outputs}")
    LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)


def _op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stands for an absent output (ops return a fixed set of tensors)."""
    return like.new_empty(0)


def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return _empty(like) if tensor is None else tensor


# ---- metrics and token scores: fixed outputs ------------------------------------------------------------------

def metric_names(request: LossRequest) -> list[str]:
    """The metrics of ``return_metrics=True``, in the order the ops return them."""
    return ["clip_fraction", "ratio_mean", "num_sentences", "num_tokens", "entropy_mean"] + (
        ["kl_mean"] if request.config.beta > 0 else [])


def _metric_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if name.startswith("num_") else dtype


def _metric_list(metrics: dict | None, request: LossRequest, dtype: torch.dtype) -> list[torch.Tensor]:
    if metrics is None:
        return []
    return [metrics[name].to(_metric_dtype(name, dtype)) for name in metric_names(request)]


def _fake_metrics(like: torch.Tensor, request: LossRequest, dtype: torch.dtype) -> list[torch.Tensor]:
    if not request.with_metrics:
        return []
    return [like.new_empty((), dtype=_metric_dtype(name, dtype)) for name in metric_names(request)]


def _score_outputs(outputs: LossOutputs, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _or_empty(outputs.token_logp, like), _or_empty(outputs.token_entropy, like)


def _fake_scores(like: torch.Tensor, request: LossRequest, tokens: int, dtype: torch.dtype) -> tuple:
    if not request.with_token_scores:
        return _empty(like), _empty(like)
    return like.new_empty(tokens, dtype=dtype), like.new_empty(tokens, dtype=dtype)


def _outputs(loss, metrics: list, token_logp, token_entropy, request: LossRequest) -> LossOutputs:
    """The op's outputs as :class:`LossOutputs` (metrics named, absent token scores ``None``)."""
    named = {name: value.detach() for name, value in zip(metric_names(request), metrics)} \
        if request.with_metrics else None
    if not request.with_token_scores:
        return LossOutputs(loss, named)
    return LossOutputs(loss, named, token_logp.detach(), token_entropy.detach())


def _saved_gradients(ctx) -> tuple:
    try:
        return ctx.saved_tensors
    except RuntimeError as error:    # the saved gradient was scaled in place by an earlier backward
        raise RuntimeError("this fused loss computed its gradient in the forward pass and the first backward "
                           "scaled it in place by its grad_output; backward can run once per forward (a second "
                           "backward through the same graph works only while grad_output is 1)") from error


def _rows(request: LossRequest, completion_ids, segment_ids, advantages, local_vocab: int) -> RowInputs:
    check_loss_values(completion_ids, segment_ids, advantages, request.vocab_size(local_vocab))
    return RowInputs.of(completion_ids, segment_ids, advantages, request)


def _as_rows(tensor: torch.Tensor, request: LossRequest) -> torch.Tensor:
    """Packed per-token tensors ``[N, ·]`` as their one row ``[1, N, ·]``."""
    return packed.as_row(tensor) if request.cu_seqlens is not None else tensor


# ---- the loss from logits -------------------------------------------------------------------------------------

def _loss_implementation(logits, completion_ids, segment_ids, advantages, *arguments):
    request = unpack(arguments)
    rows = _rows(request, completion_ids, segment_ids, advantages, logits.shape[-1])
    gradient = torch.empty_like(logits) if request.grad_input else None
    outputs = run_sentence_grpo_loss(request.passes(logits.shape[-1]), _as_rows(logits, request), rows, request,
                                     gradient_out=None if gradient is None else _as_rows(gradient, request))
    dtype = accumulator_dtype(logits.dtype)
    return (outputs.loss.to(dtype), _or_empty(gradient, logits), _metric_list(outputs.metrics, request, dtype),
            *_score_outputs(outputs, logits))


def _loss_fake(logits, completion_ids, segment_ids, advantages, *arguments):
    request = unpack(arguments)
    dtype = accumulator_dtype(logits.dtype)
    gradient = torch.empty_like(logits) if request.grad_input else _empty(logits)
    return (logits.new_empty((), dtype=dtype), gradient, _fake_metrics(logits, request, dtype),
            *_fake_scores(logits, request, logits.shape[:-1].numel(), dtype))


_define("sentence_grpo_loss", "Tensor logits, Tensor completion_ids, Tensor segment_ids, Tensor advantages",
        "(Tensor, Tensor, Tensor[], Tensor, Tensor)", _loss_implementation, _loss_fake)


def _loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # else autograd hands backward zeros of the [B, T, V] gradient output
    ctx.save_for_backward(output[1])


def _loss_backward(ctx, grad_loss, *unused):
    (gradient,) = _saved_gradients(ctx)
    scale_gradients_([gradient], grad_loss)
    return (gradient, None, None, None) + _NO_REQUEST_GRADIENTS


torch.library.register_autograd(f"{NAMESPACE}::sentence_grpo_loss", _loss_backward, setup_context=_loss_setup,
                                lib=LIBRARY)


def sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, request: LossRequest) -> LossOutputs:
    """The loss from logits through the custom op; gradient to ``logits`` (when ``request.grad_input``)."""
    loss, _, metrics, token_logp, token_entropy = _op("sentence_grpo_loss")(
        logits, completion_ids, segment_ids, advantages, *pack(request))
    return _outputs(loss, metrics, token_logp, token_entropy, request)


# ---- the loss from hidden states and the LM head --------------------------------------------------------------

def _fused_implementation(hidden, weight, bias, completion_ids, segment_ids, advantages, *arguments):
    request = unpack(arguments)
    rows = _rows(request, completion_ids, segment_ids, advantages, weight.shape[0])
    outputs, gradients = run_fused_linear_loss(request.passes(weight.shape[0]), _as_rows(hidden, request), weight,
                                               bias, rows, request)
    dtype = accumulator_dtype(hidden.dtype)
    return (outputs.loss.to(dtype), *(_or_empty(gradient, hidden) for gradient in gradients),
            _metric_list(outputs.metrics, request, dtype), *_score_outputs(outputs, hidden))


def _fused_fake(hidden, weight, bias, completion_ids, segment_ids, advantages, *arguments):
    request = unpack(arguments)
    dtype = accumulator_dtype(hidden.dtype)
    tokens = hidden.shape[:-1].numel()
    grad_hidden = hidden.new_empty(tokens, hidden.shape[-1]) if request.grad_input else None
    grad_weight = weight.new_empty(weight.shape, dtype=dtype) if request.grad_weight else None
    grad_bias = weight.new_empty(weight.shape[0], dtype=dtype) if request.grad_bias and bias is not None else None
    return (hidden.new_empty((), dtype=dtype), *(_or_empty(gradient, hidden) for gradient in
                                                 (grad_hidden, grad_weight, grad_bias)),
            _fake_metrics(hidden, request, dtype), *_fake_scores(hidden, request, tokens, dtype))


_define("fused_linear_sentence_grpo_loss",
        "Tensor hidden, Tensor weight, Tensor? bias, Tensor completion_ids, Tensor segment_ids, Tensor advantages",
        "(Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor, Tensor)", _fused_implementation, _fused_fake)


def _fused_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # else autograd hands backward zeros of the [V, H] gradient outputs
    hidden, weight, bias = inputs[:3]
    request = unpack(inputs[6:])
    ctx.wanted = (request.grad_input, request.grad_weight, request.grad_bias and bias is not None)
    ctx.targets = tuple(None if tensor is None else (tensor.shape, tensor.dtype) for tensor in (hidden, weight, bias))
    ctx.save_for_backward(*output[1:4])


def _fused_backward(ctx, grad_loss, *unused):
    gradients = [gradient if wanted else None for gradient, wanted in zip(_saved_gradients(ctx), ctx.wanted)]
    scale_gradients_([gradient for gradient in gradients if gradient is not None], grad_loss)
    # the gradients accumulated in fp32 (grad_hidden in the dtype of hidden): rounded once, after scaling
    finished = tuple(None if gradient is None else gradient.view(target[0]).to(target[1])
                     for gradient, target in zip(gradients, ctx.targets))
    return finished + (None, None, None) + _NO_REQUEST_GRADIENTS


torch.library.register_autograd(f"{NAMESPACE}::fused_linear_sentence_grpo_loss", _fused_backward,
                                setup_context=_fused_setup, lib=LIBRARY)


def fused_linear_sentence_grpo_loss(hidden, weight, bias, completion_ids, segment_ids, advantages,
                                    request: LossRequest) -> LossOutputs:
    """The loss from ``hidden @ weight.T + bias`` through the custom op."""
    loss, _, _, _, metrics, token_logp, token_entropy = _op("fused_linear_sentence_grpo_loss")(
        hidden, weight, bias, completion_ids, segment_ids, advantages, *pack(request))
    return _outputs(loss, metrics, token_logp, token_entropy, request)


# ---- token log-probs ------------------------------------------------------------------------------------------

def _logprobs_implementation(logits, ids, *arguments):
    request = unpack(arguments)
    check_token_ids("ids", ids, request.vocab_size(logits.shape[-1]))
    scores = request.passes(logits.shape[-1]).token_scores(logits, ids, request.config.temperature,
                                                           with_entropy=request.with_entropy)
    return scores.logp, scores.lse, _or_empty(scores.entropy, scores.lse)


def _logprobs_fake(logits, ids, *arguments):
    request = unpack(arguments)
    flat = logits.new_empty(logits.shape[0] * logits.shape[1], dtype=accumulator_dtype(logits.dtype))
    return flat, torch.empty_like(flat), torch.empty_like(flat) if request.with_entropy else _empty(flat)


_define("token_logprobs", "Tensor logits, Tensor ids", "(Tensor, Tensor, Tensor)", _logprobs_implementation,
        _logprobs_fake)


def _logprobs_backward_implementation(logits, ids, grad_logp, grad_entropy, lse, entropy, *arguments):
    request = unpack(arguments)
    return token_logprobs_backward(request.passes(logits.shape[-1]), logits, ids, grad_logp, grad_entropy, lse,
                                   entropy, request.config.temperature)


_define("token_logprobs_backward",
        "Tensor logits, Tensor ids, Tensor? grad_logp, Tensor? grad_entropy, Tensor lse, Tensor entropy", "Tensor",
        _logprobs_backward_implementation, lambda logits, *rest: torch.empty_like(logits))


def _logprobs_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, ids, *arguments = inputs
    ctx.save_for_backward(logits, ids, output[1], output[2])
    ctx.arguments = arguments


def _logprobs_backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, ids, lse, entropy = ctx.saved_tensors
    with_entropy = unpack(ctx.arguments).with_entropy
    gradient = _op("token_logprobs_backward")(logits, ids, grad_logp, grad_entropy if with_entropy else None, lse,
                                               entropy, *ctx.arguments)
    return (gradient, None) + _NO_REQUEST_GRADIENTS


torch.library.register_autograd(f"{NAMESPACE}::token_logprobs", _logprobs_backward, setup_context=_logprobs_setup,
                                lib=LIBRARY)


def token_logprobs(logits, ids, request: LossRequest):
    """``[B, T, V]`` logits, ``[B, T]`` ids -> flat ``[B*T]`` logp (and entropy or ``None``), differentiable."""
    logp, _, entropy = _op("token_logprobs")(logits, ids, *pack(request))
    return logp, entropy if request.with_entropy else None


def _fused_logprobs_implementation(hidden, weight, bias, ids, *arguments):
    request = unpack(arguments)
    check_token_ids("ids", ids, request.vocab_size(weight.shape[0]))
    logp, lse, entropy = fused_linear_token_scores(request.passes(weight.shape[0]), hidden, weight, bias, ids,
                                                   request.config.temperature, request.with_entropy,
                                                   request.chunk_size)
    return logp, lse, _or_empty(entropy, lse)


def _fused_logprobs_fake(hidden, weight, bias, ids, *arguments):
    request = unpack(arguments)
    flat = hidden.new_empty(ids.numel(), dtype=accumulator_dtype(hidden.dtype))
    return flat, torch.empty_like(flat), torch.empty_like(flat) if request.with_entropy else _empty(flat)


_define("fused_linear_token_logprobs", "Tensor hidden, Tensor weight, Tensor? bias, Tensor ids",
        "(Tensor, Tensor, Tensor)", _fused_logprobs_implementation, _fused_logprobs_fake)


def _fused_logprobs_backward_implementation(hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy,
                                            *arguments):
    request = unpack(arguments)
    wanted = (request.grad_input, request.grad_weight, request.grad_bias and bias is not None)
    grad_hidden, grad_weight, grad_bias = fused_linear_token_scores_backward(
        request.passes(weight.shape[0]), hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy,
        request.config.temperature, request.chunk_size, wanted)
    return (_empty(hidden) if grad_hidden is None else grad_hidden.view(hidden.shape),
            _empty(hidden) if grad_weight is None else grad_weight.to(weight.dtype),
            _empty(hidden) if grad_bias is None else grad_bias.to(bias.dtype))


def _fused_logprobs_backward_fake(hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy, *arguments):
    request = unpack(arguments)
    return (torch.empty_like(hidden) if request.grad_input else _empty(hidden),
            torch.empty_like(weight) if request.grad_weight else _empty(hidden),
            torch.empty_like(bias) if request.grad_bias and bias is not None else _empty(hidden))


_define("fused_linear_token_logprobs_backward",
        "Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor? grad_logp, Tensor? grad_entropy, Tensor lse, "
        "Tensor entropy", "(Tensor, Tensor, Tensor)",
        _fused_logprobs_backward_implementation, _fused_logprobs_backward_fake)


def _fused_logprobs_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    hidden, weight, bias, ids, *arguments = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, output[1], output[2])
    ctx.request = unpack(arguments)


def _fused_logprobs_backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    request = dataclasses.replace(ctx.request, grad_input=want_hidden, grad_weight=want_weight, grad_bias=want_bias)
    grad_hidden, grad_weight, grad_bias = _op("fused_linear_token_logprobs_backward")(
        hidden, weight, bias, ids, grad_logp, grad_entropy if request.with_entropy else None, lse, entropy,
        *pack(request))
    return (grad_hidden if want_hidden else None, grad_weight if want_weight else None,
            grad_bias if want_bias and bias is not None else None, None) + _NO_REQUEST_GRADIENTS


torch.library.register_autograd(f"{NAMESPACE}::fused_linear_token_logprobs", _fused_logprobs_backward,
                                setup_context=_fused_logprobs_setup, lib=LIBRARY)


def fused_linear_token_logprobs(hidden, weight, bias, ids, request: LossRequest):
    """``hidden [B, T, H] @ weight.T + bias`` -> flat ``[B*T]`` logp (and entropy or ``None``), differentiable."""
    logp, _, entropy = _op("fused_linear_token_logprobs")(hidden, weight, bias, ids, *pack(request))
    return logp, entropy if request.with_entropy else None
