"""The kernel backends' entry points as ``torch.library`` custom ops, so that ``torch.compile`` sees each as one node.

Each op has a fake (meta) implementation giving its output shapes, and an autograd formula. The loss ops return
the gradient they finished in the forward pass (``docs/design.md``, "The passes"); their backward only scales it
by ``grad_output``, in place and without a host sync (:func:`scale_gradients_`). The options of the loss are
the op's scalar arguments, one per ``LossConfig`` field, in field order: the schema is generated from
``LossConfig``, so an option added there reaches every op. Value checks of the ids (which read tensors) run
inside the ops, before any kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import distributed
from ..backends import resolve_backend
from ..config import LossConfig, check_loss_values, check_token_ids
from . import packed
from .driver import run_sentence_grpo_loss, token_logprobs_backward
from .fused_linear import (
    default_chunk_size,
    fused_linear_token_scores,
    fused_linear_token_scores_backward,
    run_fused_linear_loss,
)
from .library import LIBRARY, NAMESPACE, scale_gradients_
from .passes import accumulator_dtype
from .vocab_parallel import VocabParallelPasses, split_backend

_SCHEMA_TYPES = {"float": "float", "float | None": "float?", "str": "str", "str | None": "str?", "int": "int",
                 "bool": "bool"}
OPTION_FIELDS = tuple(field.name for field in dataclasses.fields(LossConfig))
_OPTION_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}" for field in dataclasses.fields(LossConfig))


def _define(name: str, schema: str, implementation, fake) -> None:
    LIBRARY.define(f"{name}{schema}")
    LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)


def passes_for(backend: str, device: torch.device):
    """The backend's passes; on a vocabulary shard (``vocab_parallel.sharded_backend``) combined over its group."""
    name, shard = split_backend(backend)
    passes = resolve_backend(name, device).passes()
    return passes if shard is None else VocabParallelPasses(passes, shard)


def vocab_size(backend: str, local_vocab: int) -> int:
    """The size of the whole vocabulary: ``local_vocab`` unless the logits are a shard of it."""
    shard = split_backend(backend)[1]
    return local_vocab if shard is None else shard.total


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stands for an absent output (ops return a fixed set of tensors)."""
    return like.new_empty(0)


def num_slots(segment_ids: torch.Tensor, advantages: torch.Tensor) -> int:
    """``S_max``: ``advantages.shape[1]``, or one more than the largest segment id for ``[B]`` advantages."""
    if advantages.dim() == 2:
        return advantages.shape[1]
    return max(int(segment_ids.max()) + 1, 1) if segment_ids.numel() else 1


# ---- metrics: a fixed, named list of 0-dim tensors ------------------------------------------------------------

def metric_names(config: LossConfig) -> list[str]:
    """The metrics of ``return_metrics=True``, in the order the ops return them."""
    return ["clip_fraction", "ratio_mean", "num_sentences", "num_tokens", "entropy_mean"] + (
        ["kl_mean"] if config.beta > 0 else [])


def _metric_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if name.startswith("num_") else dtype


def _metric_list(metrics: dict | None, config: LossConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    if metrics is None:
        return []
    return [metrics[name].to(_metric_dtype(name, dtype)) for name in metric_names(config)]


def _named_metrics(metrics: list, config: LossConfig, with_metrics: bool) -> dict | None:
    return {name: value.detach() for name, value in zip(metric_names(config), metrics)} if with_metrics else None


def _fake_metrics(like: torch.Tensor, config: LossConfig, dtype: torch.dtype, with_metrics: bool):
    if not with_metrics:
        return []
    return [like.new_empty((), dtype=_metric_dtype(name, dtype)) for name in metric_names(config)]


def _saved_gradients(ctx) -> tuple:
    try:
        return ctx.saved_tensors
    except RuntimeError as error:    # the saved gradient was scaled in place by an earlier backward
        raise RuntimeError("this fused loss computed its gradient in the forward pass and the first backward "
                           "scaled it in place by its grad_output; backward can run once per forward (a second "
                           "backward through the same graph works only while grad_output is 1)") from error


# ---- the loss from logits -------------------------------------------------------------------------------------

def row_inputs(cu_seqlens, sp_group, completion_ids, segment_ids, advantages, old_logps, ref_logps, is_weights,
               sampling_logps) -> dict:
    """The drivers' keywords for the inputs: as given, or packed ones as one row (``ops/packed.py``; ``sp_group``
    a process group or ``None``)."""
    if cu_seqlens is not None:
        return packed.row_inputs(cu_seqlens, sp_group, completion_ids, segment_ids, advantages, old_logps,
                                 ref_logps, is_weights, sampling_logps)
    return dict(completion_ids=completion_ids, segment_ids=segment_ids, advantages=advantages, old_logps=old_logps,
                ref_logps=ref_logps, is_weights=is_weights, sampling_logps=sampling_logps,
                num_slots=num_slots(segment_ids, advantages))


def _loss_implementation(logits, completion_ids, segment_ids, advantages, old_logps, ref_logps, *options_and_flags):
    options, flags = options_and_flags[:-9], options_and_flags[-9:]
    backend, with_gradient, with_metrics, group, normalizer, is_weights, sampling_logps, cu_seqlens, sp_group = flags
    config = LossConfig(*options)
    check_loss_values(completion_ids, segment_ids, advantages, vocab_size(backend, logits.shape[-1]))
    inputs = row_inputs(cu_seqlens, distributed.group_from_name(sp_group), completion_ids, segment_ids, advantages,
                        old_logps, ref_logps, is_weights, sampling_logps)
    gradient = torch.empty_like(logits) if with_gradient else None
    loss, metrics = run_sentence_grpo_loss(
        passes_for(backend, logits.device), packed.as_row(logits) if cu_seqlens is not None else logits,
        config=config, gradient_out=gradient if cu_seqlens is None else packed.as_row(gradient),
        with_metrics=with_metrics, process_group=distributed.group_from_name(group), normalizer=normalizer,
        **inputs)
    dtype = accumulator_dtype(logits.dtype)
    return loss.to(dtype), _empty(logits) if gradient is None else gradient, _metric_list(metrics, config, dtype)


def _loss_fake(logits, completion_ids, segment_ids, advantages, old_logps, ref_logps, *options_and_flags):
    options, (_, with_gradient, with_metrics, *_) = options_and_flags[:-9], options_and_flags[-9:]
    dtype = accumulator_dtype(logits.dtype)
    gradient = torch.empty_like(logits) if with_gradient else _empty(logits)
    return (logits.new_empty((), dtype=dtype), gradient,
            _fake_metrics(logits, LossConfig(*options), dtype, with_metrics))


_define("sentence_grpo_loss",
        f"(Tensor logits, Tensor completion_ids, Tensor segment_ids, Tensor advantages, Tensor? old_logps, "
        f"Tensor? ref_logps, {_OPTION_SCHEMA}, str backend, bool with_gradient, bool with_metrics, str? group, "
        "Tensor? normalizer, Tensor? is_weights, Tensor? sampling_logps, Tensor? cu_seqlens, str? sp_group) "
        "-> (Tensor, Tensor, Tensor[])", _loss_implementation, _loss_fake)


def _loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # else autograd hands backward zeros of the [B, T, V] gradient output
    ctx.save_for_backward(output[1])


def _loss_backward(ctx, grad_loss, grad_gradient, grad_metrics):
    (gradient,) = _saved_gradients(ctx)
    scale_gradients_([gradient], grad_loss)
    return (gradient,) + (None,) * (5 + len(OPTION_FIELDS) + 9)


torch.library.register_autograd(f"{NAMESPACE}::sentence_grpo_loss", _loss_backward, setup_context=_loss_setup,
                                lib=LIBRARY)


def sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, old_logps, ref_logps, config: LossConfig,
                       backend: str, *, with_metrics: bool, process_group=None, normalizer=None, is_weights=None,
                       sampling_logps=None, cu_seqlens=None, sp_group=None):
    """The loss from logits through the custom op: ``(loss, metrics dict or None)``; gradient to ``logits``."""
    with_gradient = logits.requires_grad and torch.is_grad_enabled()
    loss, _, metrics = getattr(torch.ops, NAMESPACE).sentence_grpo_loss(
        logits, completion_ids, segment_ids, advantages, old_logps, ref_logps, *dataclasses.astuple(config),
        backend, with_gradient, with_metrics, distributed.group_name(process_group), normalizer, is_weights,
        sampling_logps, cu_seqlens, distributed.group_name(sp_group))
    return loss, _named_metrics(metrics, config, with_metrics)


# ---- the loss from hidden states and the LM head --------------------------------------------------------------

def _fused_implementation(hidden, weight, bias, completion_ids, segment_ids, advantages, old_logps, ref_logps,
                          *options_and_flags):
    options, flags = options_and_flags[:-12], options_and_flags[-12:]
    (backend, chunk_size, want_hidden, want_weight, want_bias, with_metrics, group, normalizer, is_weights,
     sampling_logps, cu_seqlens, sp_group) = flags
    config = LossConfig(*options)
    check_loss_values(completion_ids, segment_ids, advantages, vocab_size(backend, weight.shape[0]))
    wanted = (want_hidden, want_weight, want_bias and bias is not None)
    inputs = row_inputs(cu_seqlens, distributed.group_from_name(sp_group), completion_ids, segment_ids, advantages,
                        old_logps, ref_logps, is_weights, sampling_logps)
    loss, gradients, metrics = run_fused_linear_loss(
        passes_for(backend, hidden.device), packed.as_row(hidden) if cu_seqlens is not None else hidden, weight, bias,
        config=config, chunk_size=chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device),
        wanted=wanted, with_metrics=with_metrics, process_group=distributed.group_from_name(group),
        normalizer=normalizer, **inputs)
    dtype = accumulator_dtype(hidden.dtype)
    gradients = [_empty(hidden) if gradient is None else gradient for gradient in gradients]
    return (loss.to(dtype), *gradients, _metric_list(metrics, config, dtype))


def _fused_fake(hidden, weight, bias, completion_ids, segment_ids, advantages, old_logps, ref_logps,
                *options_and_flags):
    options, flags = options_and_flags[:-12], options_and_flags[-12:]
    _, _, want_hidden, want_weight, want_bias, with_metrics, *_ = flags
    dtype = accumulator_dtype(hidden.dtype)
    grad_hidden = hidden.new_empty(hidden.shape[:-1].numel(), hidden.shape[-1]) if want_hidden else None
    grad_weight = weight.new_empty(weight.shape, dtype=dtype) if want_weight else None
    grad_bias = weight.new_empty(weight.shape[0], dtype=dtype) if want_bias and bias is not None else None
    gradients = [_empty(hidden) if gradient is None else gradient for gradient in (grad_hidden, grad_weight,
                                                                                  grad_bias)]
    return (hidden.new_empty((), dtype=dtype), *gradients,
            _fake_metrics(hidden, LossConfig(*options), dtype, with_metrics))


_define("fused_linear_sentence_grpo_loss",
        f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor completion_ids, Tensor segment_ids, Tensor advantages, "
        f"Tensor? old_logps, Tensor? ref_logps, {_OPTION_SCHEMA}, str backend, int chunk_size, bool want_hidden, "
        "bool want_weight, bool want_bias, bool with_metrics, str? group, Tensor? normalizer, Tensor? is_weights, "
        "Tensor? sampling_logps, Tensor? cu_seqlens, str? sp_group) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor[])", _fused_implementation, _fused_fake)


def _fused_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)   # else autograd hands backward zeros of the [V, H] gradient outputs
    hidden, weight, bias = inputs[:3]
    want_hidden, want_weight, want_bias = inputs[-10:-7]   # then with_metrics, group, normalizer, weights, sampling,
    # cu_seqlens, sp_group
    ctx.wanted = (want_hidden, want_weight, want_bias and bias is not None)
    ctx.targets = tuple(None if tensor is None else (tensor.shape, tensor.dtype) for tensor in (hidden, weight, bias))
    ctx.save_for_backward(*output[1:4])


def _fused_backward(ctx, grad_loss, *unused):
    gradients = [gradient if wanted else None for gradient, wanted in zip(_saved_gradients(ctx), ctx.wanted)]
    scale_gradients_([gradient for gradient in gradients if gradient is not None], grad_loss)
    # the gradients accumulated in fp32 (grad_hidden in the dtype of hidden): rounded once, after scaling
    finished = tuple(None if gradient is None else gradient.view(target[0]).to(target[1])
                     for gradient, target in zip(gradients, ctx.targets))
    return finished + (None,) * (5 + len(OPTION_FIELDS) + 12)


torch.library.register_autograd(f"{NAMESPACE}::fused_linear_sentence_grpo_loss", _fused_backward,
                                setup_context=_fused_setup, lib=LIBRARY)


def fused_linear_sentence_grpo_loss(hidden, weight, bias, completion_ids, segment_ids, advantages, old_logps,
                                    ref_logps, config: LossConfig, backend: str, chunk_size: int | None, *,
                                    with_metrics: bool, process_group=None, normalizer=None, is_weights=None,
                                    sampling_logps=None, cu_seqlens=None, sp_group=None):
    """The loss from ``hidden @ weight.T + bias`` through the custom op: ``(loss, metrics dict or None)``."""
    grad_enabled = torch.is_grad_enabled()
    wanted = [grad_enabled and tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)]
    loss, _, _, _, metrics = getattr(torch.ops, NAMESPACE).fused_linear_sentence_grpo_loss(
        hidden, weight, bias, completion_ids, segment_ids, advantages, old_logps, ref_logps,
        *dataclasses.astuple(config), backend, chunk_size or 0, *wanted, with_metrics,
        distributed.group_name(process_group), normalizer, is_weights, sampling_logps, cu_seqlens,
        distributed.group_name(sp_group))
    return loss, _named_metrics(metrics, config, with_metrics)


# ---- token log-probs ------------------------------------------------------------------------------------------

def _logprobs_implementation(logits, ids, temperature, with_entropy, backend):
    check_token_ids("ids", ids, vocab_size(backend, logits.shape[-1]))
    scores = passes_for(backend, logits.device).token_scores(logits, ids, temperature, with_entropy=with_entropy)
    entropy = _empty(scores.lse) if scores.entropy is None else scores.entropy
    return scores.logp, scores.lse, entropy


def _logprobs_fake(logits, ids, temperature, with_entropy, backend):
    rows = logits.shape[0] * logits.shape[1]
    flat = logits.new_empty(rows, dtype=accumulator_dtype(logits.dtype))
    return flat, torch.empty_like(flat), torch.empty_like(flat) if with_entropy else _empty(flat)


_define("token_logprobs", "(Tensor logits, Tensor ids, float temperature, bool with_entropy, str backend) "
        "-> (Tensor, Tensor, Tensor)", _logprobs_implementation, _logprobs_fake)


def _logprobs_backward_implementation(logits, ids, grad_logp, grad_entropy, lse, entropy, temperature, backend):
    return token_logprobs_backward(passes_for(backend, logits.device), logits, ids, grad_logp, grad_entropy, lse,
                                   entropy, temperature)


_define("token_logprobs_backward", "(Tensor logits, Tensor ids, Tensor? grad_logp, Tensor? grad_entropy, Tensor lse, "
        "Tensor entropy, float temperature, str backend) -> Tensor", _logprobs_backward_implementation,
        lambda logits, *rest: torch.empty_like(logits))


def _logprobs_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, ids, temperature, with_entropy, backend = inputs
    ctx.save_for_backward(logits, ids, output[1], output[2])
    ctx.temperature, ctx.with_entropy, ctx.backend = temperature, with_entropy, backend


def _logprobs_backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, ids, lse, entropy = ctx.saved_tensors
    gradient = getattr(torch.ops, NAMESPACE).token_logprobs_backward(
        logits, ids, grad_logp, grad_entropy if ctx.with_entropy else None, lse, entropy, ctx.temperature,
        ctx.backend)
    return gradient, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::token_logprobs", _logprobs_backward, setup_context=_logprobs_setup,
                                lib=LIBRARY)


def token_logprobs(logits, ids, temperature: float, with_entropy: bool, backend: str):
    """``[B, T, V]`` logits, ``[B, T]`` ids -> flat ``[B*T]`` logp (and entropy or ``None``), differentiable."""
    logp, _, entropy = getattr(torch.ops, NAMESPACE).token_logprobs(logits, ids, temperature, with_entropy, backend)
    return logp, entropy if with_entropy else None


def _fused_logprobs_implementation(hidden, weight, bias, ids, temperature, with_entropy, chunk_size, backend):
    check_token_ids("ids", ids, vocab_size(backend, weight.shape[0]))
    logp, lse, entropy = fused_linear_token_scores(passes_for(backend, hidden.device), hidden, weight, bias, ids,
                                                   temperature, with_entropy, chunk_size)
    return logp, lse, _empty(lse) if entropy is None else entropy


def _fused_logprobs_fake(hidden, weight, bias, ids, temperature, with_entropy, chunk_size, backend):
    flat = hidden.new_empty(ids.numel(), dtype=accumulator_dtype(hidden.dtype))
    return flat, torch.empty_like(flat), torch.empty_like(flat) if with_entropy else _empty(flat)


_define("fused_linear_token_logprobs", "(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, float temperature, "
        "bool with_entropy, int chunk_size, str backend) -> (Tensor, Tensor, Tensor)",
        _fused_logprobs_implementation, _fused_logprobs_fake)


def _fused_logprobs_backward_implementation(hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy,
                                            temperature, chunk_size, backend, want_hidden, want_weight, want_bias):
    gradients = fused_linear_token_scores_backward(
        passes_for(backend, hidden.device), hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy,
        temperature, chunk_size, (want_hidden, want_weight, want_bias and bias is not None))
    grad_hidden, grad_weight, grad_bias = gradients
    return (_empty(hidden) if grad_hidden is None else grad_hidden.view(hidden.shape),
            _empty(hidden) if grad_weight is None else grad_weight.to(weight.dtype),
            _empty(hidden) if grad_bias is None else grad_bias.to(bias.dtype))


def _fused_logprobs_backward_fake(hidden, weight, bias, ids, grad_logp, grad_entropy, lse, entropy, temperature,
                                  chunk_size, backend, want_hidden, want_weight, want_bias):
    return (torch.empty_like(hidden) if want_hidden else _empty(hidden),
            torch.empty_like(weight) if want_weight else _empty(hidden),
            torch.empty_like(bias) if want_bias and bias is not None else _empty(hidden))


_define("fused_linear_token_logprobs_backward",
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor? grad_logp, Tensor? grad_entropy, Tensor lse, "
        "Tensor entropy, float temperature, int chunk_size, str backend, bool want_hidden, bool want_weight, "
        "bool want_bias) -> (Tensor, Tensor, Tensor)",
        _fused_logprobs_backward_implementation, _fused_logprobs_backward_fake)


def _fused_logprobs_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    hidden, weight, bias, ids, temperature, with_entropy, chunk_size, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, output[1], output[2])
    ctx.options = (temperature, chunk_size, backend)
    ctx.with_entropy = with_entropy


def _fused_logprobs_backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = getattr(torch.ops, NAMESPACE).fused_linear_token_logprobs_backward(
        hidden, weight, bias, ids, grad_logp, grad_entropy if ctx.with_entropy else None, lse, entropy,
        *ctx.options, want_hidden, want_weight, want_bias)
    return (grad_hidden if want_hidden else None, grad_weight if want_weight else None,
            grad_bias if want_bias and bias is not None else None, None, None, None, None, None)


torch.library.register_autograd(f"{NAMESPACE}::fused_linear_token_logprobs", _fused_logprobs_backward,
                                setup_context=_fused_logprobs_setup, lib=LIBRARY)


def fused_linear_token_logprobs(hidden, weight, bias, ids, temperature: float, with_entropy: bool,
                                chunk_size: int | None, backend: str):
    """``hidden [B, T, H] @ weight.T + bias`` -> flat ``[B*T]`` logp (and entropy or ``None``), differentiable."""
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    logp, _, entropy = getattr(torch.ops, NAMESPACE).fused_linear_token_logprobs(
        hidden, weight, bias, ids, temperature, with_entropy, chunk_size, backend)
    return logp, entropy if with_entropy else None
