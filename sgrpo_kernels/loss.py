"""Public entry points of the loss: option handling, input checks and backend dispatch.

Each public function checks its options and inputs once (``config.py``), resolves ``backend`` once
(``ops/backends.py``) and builds one :class:`~sgrpo_kernels.ops.LossRequest`: the validated options, the
per-rollout tensors and the parallel groups. It then calls ``reference.py`` (``backend="reference"``) or an entry
point of ``ops`` with that request, which carries it unchanged to the kernels (through a custom op, which
``torch.compile`` sees as one node). Options and their defaults are ``LossConfig``'s (a test holds the keyword
defaults below equal to them).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops, reference
from .config import (
    LossConfig,
    _check_real,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_loss_inputs,
    check_loss_values,
    check_token_ids,
    config_from,
    documented,
)


def _check_constant_inputs(backend: str, **tensors) -> None:
    """The fused backends differentiate only with respect to the logits; say so instead of dropping a gradient."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{name} requires grad, but backend={backend!r} treats it as a constant; "
                             f"pass {name}.detach(), or backend='reference' to differentiate through it")


def _normalizer_tensor(normalizer, device: torch.device) -> torch.Tensor | None:
    """``None``, or the normalizer as a detached 0-dim float64 tensor on ``device`` (a number must be > 0)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a number or a 0-dim real tensor, got shape "
                             f"{tuple(normalizer.shape)} {normalizer.dtype}")
        return normalizer.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(_check_real("normalizer", normalizer, low=0.0, low_inclusive=False), dtype=torch.float64,
                        device=device)


def _check_is_weights(is_weights, batch_and_length, device) -> None:
    """``None``, or a floating ``[B]`` / ``[B, T]`` tensor on ``device`` (packed inputs: ``[N]`` only, for
    ``batch_and_length = (N,)``); its values are not read here."""
    if is_weights is None:
        return
    if not isinstance(is_weights, torch.Tensor) or not is_weights.dtype.is_floating_point:
        raise TypeError("is_weights must be a floating torch.Tensor, "
                        f"got {getattr(is_weights, 'dtype', type(is_weights).__name__)}")
    if len(batch_and_length) == 1:
        if tuple(is_weights.shape) != tuple(batch_and_length):
            raise ValueError(f"is_weights of packed inputs must have shape [N] = {tuple(batch_and_length)} (one "
                             f"per token; an answer's weight repeated over its tokens), got {tuple(is_weights.shape)}")
        return
    batch, length = batch_and_length
    if tuple(is_weights.shape) not in ((batch,), (batch, length)):
        raise ValueError(f"is_weights must have shape [B] = ({batch},) or [B, T] = ({batch}, {length}), "
                         f"got {tuple(is_weights.shape)}")
    if is_weights.device != device:
        raise ValueError(f"is_weights is on {is_weights.device} but the loss's inputs are on {device}")


def _check_per_token(name: str, value, batch_and_length, device) -> None:
    """``None``, or a floating ``[B, T]`` (packed: ``[N]``) tensor on ``device``."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if tuple(value.shape) != tuple(batch_and_length):
        form = "[B, T]" if len(batch_and_length) == 2 else "[N]"
        raise ValueError(f"{name} must have shape {form} = {tuple(batch_and_length)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the loss's inputs are on {device}")


def _checked_batch_arguments(config: LossConfig, batch_and_length, device, old_logps, is_weights, sampling_logps,
                             normalizer):
    """Check the per-batch arguments beside the loss's inputs; returns the normalizer as a tensor (or ``None``)."""
    _check_is_weights(is_weights, batch_and_length, device)
    _check_per_token("sampling_logps", sampling_logps, batch_and_length, device)
    per_answer = None if is_weights is None else is_weights.dim() < len(batch_and_length)   # [B], not [B, T], [N]
    _check_rollout_inputs(config, old_logps, sampling_logps, per_answer)
    return _normalizer_tensor(normalizer, device)


def _check_rollout_inputs(config: LossConfig, old_logps, sampling_logps, per_answer_weights: bool | None) -> None:
    """``per_answer_weights``: ``None`` without ``is_weights``, else whether they are one per answer."""
    if config.objective == "vespo":     # its weight w takes the product of the tokens' importance weights
        if per_answer_weights:
            raise ValueError("objective='vespo' folds per-token importance weights into its sentence weight w: "
                             "pass is_weights as [B, T], not [B]")
        if config.is_mode is not None and not config.is_mode.startswith("token"):
            raise ValueError(f"objective='vespo' folds per-token importance weights into its sentence weight w: "
                             f"is_mode must be 'token_truncate' or 'token_mask' (as in TRL), got {config.is_mode!r}")
    if config.is_mode is None:
        return
    if sampling_logps is None or old_logps is None:
        raise ValueError(f"is_mode={config.is_mode!r} needs sampling_logps and old_logps (its weights are "
                         "exp(old_logps - sampling_logps))")
    if per_answer_weights is not None:
        raise ValueError("pass either is_weights or is_mode, not both")


def _check_sequence_parallel(config: LossConfig, cu_seqlens, sp_group, backend: str) -> None:
    """What ``sp_group`` needs: packed inputs, a kernel backend, and no option whose statistic spans every token of
    the sequence."""
    if sp_group is None:
        return
    if backend == "reference":
        raise ValueError("sp_group: the reference backend needs the whole sequence on one rank; use a kernel "
                         "backend ('torch', 'triton', 'native' or 'auto')")
    if cu_seqlens is None:
        raise ValueError("sp_group splits a packed sequence over ranks: pass the global cu_seqlens and this rank's "
                         "slice of the packed tokens")
    if config.top_entropy_quantile < 1.0:
        raise ValueError("top_entropy_quantile < 1 is not supported with sp_group: its threshold is a quantile of "
                         "every token's entropy, which needs O(tokens) traffic between ranks, not O(sentences)")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _output_logp_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@documented
def sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, old_logps=None, ref_logps=None, *,
                       eps_low=0.2, eps_high=0.2, beta=0.0, delta=None, temperature=1.0, ratio_level="sum",
                       kl_reduction="mean", reduction="sentence_mean", clamp_log_ratio=20.0, objective="ppo_clip",
                       clip_ratio_c=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                       vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_estimator="k3",
                       kl_importance_weighting=False, entropy_coef=0.0, top_entropy_quantile=1.0,
                       off_policy_mask_threshold=None, is_mode=None, is_clip_min=None, is_clip_max=3.0,
                       normalizer=None, is_weights=None, sampling_logps=None,
                       inplace=False, backend="auto",
                       return_metrics=False, process_group=None, tp_group=None, vocab_start_index=None,
                       cu_seqlens=None, sp_group=None, return_token_scores=False):
    """Sentence-level GRPO loss from logits (``reference.sentence_grpo_loss`` states it; ``docs/design.md``).

    Args:
        logits: ``[B, T, V]`` fp32/bf16/fp16/fp64; ``logits[b, t]`` scores ``completion_ids[b, t]``
            (already shifted: no prompt positions, no trailing position). Packed (``cu_seqlens``): ``[N, V]``.
        completion_ids: ``[B, T]`` int, the sampled tokens (any value where ``segment_ids == -1``).
        segment_ids: ``[B, T]`` int, sentence index of each token in its row, ``-1`` = not scored.
            ``arange(T)`` gives token-level GRPO, all zeros output-level GRPO/GSPO.
        advantages: ``[B, S_max]`` per-sentence advantages, or ``[B]`` broadcast to every sentence.
        old_logps: ``[B, T]`` log-probs of the sampling policy, or ``None`` (on-policy: ratio 1,
            gradient still flows).
        ref_logps: ``[B, T]`` log-probs of the reference policy; required when ``beta > 0``.
        {options}
        normalizer: ``None``, or a number or 0-dim tensor (``> 0``) that replaces the reduction's denominator
            (``B'``, ``Σ n`` or 1): e.g. ``reduction="token_mean", normalizer=num_items_in_batch`` is TRL's
            ``dapo``; with a ``process_group`` it is the global count.
        is_weights: ``None``, ``[B]`` or ``[B, T]`` float weights (constant) on each token's policy loss, not on
            its KL term: the rollout engine's importance weights (TRL's vLLM correction, Liger's ``vllm_is_ratio``,
            verl's ``rollout_is_weights``).
        sampling_logps: ``None`` or ``[B, T]``: the rollout engine's log-probs, for ``off_policy_mask_threshold``
            (without them the mask compares ``old_logps``).
        inplace: kernel backends may write the gradient into ``logits`` (ignored by ``"reference"`` and under
            ``torch.compile``, where the gradient goes to a new buffer).
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"torch"`` (``sgrpo_kernels.backends``).
        return_metrics: also return a dict of detached 0-dim tensors: ``clip_fraction``,
            ``ratio_mean``, ``kl_mean`` (when ``beta > 0``), ``entropy_mean``, ``num_sentences``,
            ``num_tokens`` (of this rank's rows).
        return_token_scores: also return the per-token ``(logp, entropy)`` that the loss's own pass over the
            logits computed, detached, ``[B, T]`` each (packed: ``[N]``; float32, float64 for float64 inputs; 0 at
            unscored positions; with ``tp_group`` those of the whole vocabulary, with ``sp_group`` this rank's
            slice): what a trainer logs (entropy, log-probs) without a second pass over the logits.
        process_group: a ``torch.distributed`` group whose ranks each hold a slice of the global batch:
            the means then run over the global batch and the loss is scaled so that the mean of the rank
            losses is the global loss and gradients averaged by DDP/FSDP are its gradient.
        tp_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor parallelism):
            ``logits`` is then this rank's ``[B, T, V_local]`` slice of a vocabulary split into contiguous ranges
            in rank order (uneven shards allowed), ``completion_ids`` are global ids; every rank gets the same loss
            and metrics and the gradient of its shard. Communication: ``4·B·T`` floats and the shard sizes per call
            (``ops/vocab_parallel.py``). Composes with ``process_group`` (TP × DP). Not with ``"reference"``.
        vocab_start_index: the first global id of this rank's shard (default: the sum of the lower ranks'
            ``V_local``).
        cu_seqlens: ``None``, or packed (padding-free) inputs: ``[B + 1]`` integer offsets, ``0 = cu[0] <= ... <=
            cu[B] = N``, answer ``i`` the tokens ``cu[i]:cu[i + 1]`` (may be empty). Then the token axis is flat:
            logits ``[N, V]``, completion_ids, segment_ids (the sentence index within its answer), old_logps,
            ref_logps, sampling_logps and is_weights ``[N]``; advantages ``[B, S_max]`` or ``[B]`` as before. Loss,
            metrics and gradient equal the padded call on the same tokens; no ``[B, T_max]`` tensor is made.
        sp_group: ``None``, or a process group over which the packed tokens are split into contiguous slices
            in rank order (sequence parallelism, any split points: sentences and answers may straddle ranks). Each
            rank passes its slice of every per-token tensor and the global ``cu_seqlens``; where its slice starts
            is the sum of the lower ranks' token counts (one all-gather of an int per rank). Every rank gets the
            loss and metrics of the whole sequence and the gradient of its slice (a parameter's gradient is the
            sum of the ranks' parts). Communication: ``O(sentences)`` per call (per-sentence sums and counts).
            Refused with ``top_entropy_quantile < 1`` (its threshold spans every token's entropy). Composes with
            ``process_group`` and ``tp_group``. Not with ``"reference"``.

    Returns:
        The scalar loss (float32, or float64 for float64 inputs); with ``return_metrics`` then the metrics, with
        ``return_token_scores`` then ``(logp, entropy)``: ``loss``, ``(loss, metrics)``, ``(loss, (logp,
        entropy))`` or ``(loss, metrics, (logp, entropy))``.
    """
    _check_flag("inplace", inplace)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    request = _loss_request(config_from(locals()), locals(), logits_shape=tuple(logits.shape), dtype=logits.dtype,
                            device=logits.device, local_vocab=logits.shape[-1])
    return _returned(_loss_of_logits(logits, completion_ids, segment_ids, advantages, request, inplace), request)


def _loss_request(config: LossConfig, call: dict, *, logits_shape: tuple, dtype: torch.dtype, device,
                  local_vocab: int, logits_name: str = "logits", chunk_size=None) -> ops.LossRequest:
    """Check a loss call once and build its request: ``config`` (validated options), ``call`` the public function's
    arguments (tensors, per-rollout inputs, groups, ``backend``, the ``return_*`` flags), the shape, dtype and
    device of its logits (the fused linear path passes those of logits it never makes)."""
    for flag in ("return_metrics", "return_token_scores"):
        _check_flag(flag, call[flag])
    check_loss_inputs(logits_shape, dtype, device, call["completion_ids"], call["segment_ids"], call["advantages"],
                      call["old_logps"], call["ref_logps"], config, logits_name=logits_name,
                      cu_seqlens=call["cu_seqlens"])
    normalizer = _checked_batch_arguments(config, logits_shape[:-1], device, call["old_logps"], call["is_weights"],
                                          call["sampling_logps"], call["normalizer"])
    backend = ops.resolve_backend(call["backend"], device).name
    _check_sequence_parallel(config, call["cu_seqlens"], call["sp_group"], backend)
    if backend != "reference":
        _check_constant_inputs(backend, advantages=call["advantages"], old_logps=call["old_logps"],
                               ref_logps=call["ref_logps"])
    return ops.LossRequest(
        config=config, backend=backend, with_metrics=call["return_metrics"],
        with_token_scores=call["return_token_scores"], old_logps=call["old_logps"], ref_logps=call["ref_logps"],
        sampling_logps=call["sampling_logps"], is_weights=call["is_weights"], normalizer=normalizer,
        cu_seqlens=call["cu_seqlens"], process_group=call["process_group"], sp_group=call["sp_group"],
        chunk_size=chunk_size or 0,
        **_tensor_parallel(backend, local_vocab, device, call["tp_group"], call["vocab_start_index"],
                           call.get("tp_reduce_hidden_grad", True)))


def _tensor_parallel(backend: str, local_vocab: int, device, tp_group, vocab_start_index,
                     reduce_hidden_grad: bool) -> dict:
    """The request's tensor-parallel fields: the group and this rank's shard of the vocabulary (one all-gather of
    the shard sizes), or none."""
    _check_flag("tp_reduce_hidden_grad", reduce_hidden_grad)
    if tp_group is None:
        if vocab_start_index is not None:
            raise ValueError("vocab_start_index is the start of this rank's vocabulary shard: it needs tp_group")
        return {}
    if backend == "reference":
        raise ValueError("tp_group: the reference backend needs the whole vocabulary on each rank; use a kernel "
                         "backend ('torch', 'triton', 'native' or 'auto')")
    if vocab_start_index is not None and (isinstance(vocab_start_index, bool)
                                          or not isinstance(vocab_start_index, int)):
        raise TypeError(f"vocab_start_index must be an int or None, got {vocab_start_index!r}")
    shard = ops.vocab_shard(local_vocab, tp_group, device, vocab_start_index, reduce_hidden_grad)
    return dict(tp_group=tp_group, vocab_start=shard.start, vocab_total=shard.total,
                tp_reduce_hidden_grad=reduce_hidden_grad)


def _returned(outputs, request: ops.LossRequest):
    """The public functions' return value: ``loss``, then the metrics and the token scores that were asked for."""
    extras = ([outputs.metrics] if request.with_metrics else []) + (
        [(outputs.token_logp, outputs.token_entropy)] if request.with_token_scores else [])
    return (outputs.loss, *extras) if extras else outputs.loss


def _loss_of_logits(logits, completion_ids, segment_ids, advantages, request: ops.LossRequest, inplace: bool):
    if request.backend == "reference":
        return _reference_loss(logits, completion_ids, segment_ids, advantages, request)
    return ops.loss_on_logits(logits, completion_ids, segment_ids, advantages, request, inplace=inplace)


def _reference_loss(logits, completion_ids, segment_ids, advantages, request: ops.LossRequest):
    """The ``"reference"`` backend: ``reference.sentence_grpo_loss``, or for packed inputs its padded call; the
    token scores are ``reference.token_logprobs`` of the same logits."""
    check_loss_values(completion_ids, segment_ids, advantages, logits.shape[-1])
    options = dict(return_metrics=True, process_group=request.process_group, normalizer=request.normalizer,
                   is_weights=request.is_weights, sampling_logps=request.sampling_logps)
    tensors = (logits, completion_ids, segment_ids, advantages, request.old_logps, request.ref_logps)
    if request.cu_seqlens is None:
        loss, metrics = reference.sentence_grpo_loss(*tensors, request.config, **options)
    else:
        check_cu_seqlens_values(request.cu_seqlens, logits.shape[0])
        loss, metrics = reference.packed_sentence_grpo_loss(*tensors, request.cu_seqlens, request.config, **options)
    if not request.with_token_scores:
        return ops.LossOutputs(loss, metrics)
    with torch.no_grad():
        logp, entropy = reference.token_logprobs(logits.detach(), completion_ids.clamp(0, logits.shape[-1] - 1),
                                                 request.config.temperature, return_entropy=True)
        scored = segment_ids >= 0
        dtype = _output_logp_dtype(logits.dtype)
    return ops.LossOutputs(loss, metrics, torch.where(scored, logp, 0.0).to(dtype),
                       torch.where(scored, entropy, 0.0).to(dtype))


def _check_linear_inputs(hidden, weight, bias, chunk_size, packed: bool = False) -> None:
    """hidden ``[B, T, H]`` (``packed``: ``[N, H]``), weight ``[V, H]``, bias ``[V]`` or ``None``, chunk_size."""
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if hidden.dim() != (2 if packed else 3):
        form = "[N, H] for packed inputs (cu_seqlens given)" if packed else "[B, T, H]"
        raise ValueError(f"hidden must have shape {form}, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, H] with H={hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [V] = ({weight.shape[0]},)")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must have the dtype and device of hidden ({hidden.dtype}, {hidden.device})")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _materialised_logits(hidden, weight, bias):
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


@documented
def fused_linear_sentence_grpo_loss(hidden, weight, completion_ids, segment_ids, advantages, old_logps=None,
                                    ref_logps=None, *, bias=None, chunk_size=None, eps_low=0.2, eps_high=0.2,
                                    beta=0.0, delta=None, temperature=1.0, ratio_level="sum", kl_reduction="mean",
                                    reduction="sentence_mean", clamp_log_ratio=20.0, objective="ppo_clip",
                                    clip_ratio_c=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, vespo_k_pos=2.0,
                                    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_estimator="k3",
                                    kl_importance_weighting=False, entropy_coef=0.0, top_entropy_quantile=1.0,
                                    off_policy_mask_threshold=None, is_mode=None, is_clip_min=None, is_clip_max=3.0,
                                    normalizer=None, is_weights=None, sampling_logps=None, inplace=False,
                                    backend="auto", return_metrics=False, process_group=None, tp_group=None,
                                    vocab_start_index=None, tp_reduce_hidden_grad=True, cu_seqlens=None,
                                    sp_group=None, return_token_scores=False):
    """Sentence-level GRPO loss from the last hidden states and the LM head: ``logits = hidden @ weight.T + bias``.

    Args:
        hidden: ``[B, T, H]`` hidden states of the completion positions (shifted like ``logits``); packed
            (``cu_seqlens``): ``[N, H]``.
        weight: ``[V, H]`` output-embedding weight; bias: ``[V]`` or ``None``.
        chunk_size: tokens per chunk of logits for the fused backends (``None``: chosen from the vocabulary
            size and the free memory). Chunks hold whole sentences; a longer sentence is recomputed.
        {options}
        tp_group, vocab_start_index: ``weight`` (and ``bias``) are this rank's ``[V_local, H]`` (``[V_local]``)
            rows of an LM head sharded over the vocabulary (as :func:`sentence_grpo_loss`).
        tp_reduce_hidden_grad: with ``tp_group``, sum the gradient of ``hidden`` over the group inside (default),
            so that every rank holds the whole of it; ``False`` leaves each rank its own shard's part, for a layer
            that all-reduces it itself (Megatron's copy-to-tensor-parallel-region).
        Every other argument as :func:`sentence_grpo_loss`; ``inplace`` has no effect here (the fused
        backends always overwrite their chunk of logits with its gradient; ``"reference"`` materialises
        the full logits).

        return_token_scores: also return the per-token ``(logp, entropy)`` of the loss's own pass over each chunk
            of logits (as :func:`sentence_grpo_loss`): no second product with the LM head for a trainer's logs.

    Returns:
        As :func:`sentence_grpo_loss`; gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    config = config_from(locals())
    _check_flag("inplace", inplace)
    _check_linear_inputs(hidden, weight, bias, chunk_size, packed=cu_seqlens is not None)
    request = _loss_request(config, locals(), logits_shape=(*hidden.shape[:-1], weight.shape[0]), dtype=hidden.dtype,
                            device=hidden.device, local_vocab=weight.shape[0], logits_name="hidden",
                            chunk_size=chunk_size)
    return _returned(_loss_of_hidden(hidden, weight, bias, completion_ids, segment_ids, advantages, request), request)


def _loss_of_hidden(hidden, weight, bias, completion_ids, segment_ids, advantages, request: ops.LossRequest):
    if request.backend == "reference":
        return _reference_loss(_materialised_logits(hidden, weight, bias), completion_ids, segment_ids, advantages,
                               request)
    return ops.loss_on_hidden(hidden, weight, bias, completion_ids, segment_ids, advantages, request)


def _logprob_request(ids, temperature, return_entropy, backend, device, local_vocab: int, tp_group,
                     vocab_start_index, tp_reduce_hidden_grad=True, chunk_size=None) -> ops.LossRequest:
    """Check a log-prob call's options once (the temperature as the loss checks it) and build its request."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids must have an integer dtype, got {ids.dtype}")
    config = LossConfig(temperature=temperature)
    _check_flag("return_entropy", return_entropy)
    name = ops.resolve_backend(backend, device).name
    return ops.LossRequest(config=config, backend=name, with_entropy=return_entropy, chunk_size=chunk_size or 0,
                           **_tensor_parallel(name, local_vocab, device, tp_group, vocab_start_index,
                                              tp_reduce_hidden_grad))


def _check_packed_tokens(cu_seqlens, ids) -> None:
    """Packed log-probs: ``ids`` ``[N]`` and ``cu_seqlens`` ``[B + 1]`` offsets ending at ``N``."""
    if cu_seqlens is None:
        return
    check_cu_seqlens(cu_seqlens)
    if ids.dim() != 1:
        raise ValueError(f"ids of packed inputs (cu_seqlens given) must have shape [N], got {tuple(ids.shape)}")
    if not torch.compiler.is_compiling():
        check_cu_seqlens_values(cu_seqlens, ids.shape[0])


def _logprobs_returned(logp, entropy, return_entropy: bool):
    return (logp, entropy) if return_entropy else logp


def _reference_logprobs(logits, ids, request: ops.LossRequest):
    check_token_ids("ids", ids, logits.shape[-1])
    result = reference.token_logprobs(logits, ids, request.config.temperature, request.with_entropy)
    out_dtype = _output_logp_dtype(logits.dtype)
    if request.with_entropy:
        return result[0].to(out_dtype), result[1].to(out_dtype)
    return result.to(out_dtype), None


def token_logprobs(logits, ids, *, temperature=1.0, return_entropy=False, backend="auto", tp_group=None,
                   vocab_start_index=None, cu_seqlens=None):
    """Log-probability of each token id under ``softmax(logits / temperature)``, without autograd surprises.

    Args:
        logits: ``[..., V]`` float (typically ``[B, T, V]``); ids: ``[...]`` int in ``[0, V)``.
        tp_group, vocab_start_index: ``logits`` is this rank's ``[..., V_local]`` shard of a vocabulary split
            over ``tp_group`` and ``ids`` are global (as :func:`sentence_grpo_loss`); every rank gets the same
            log-probs and entropies and the gradient of its shard.
        cu_seqlens: ``None``, or ``[B + 1]`` offsets of packed inputs (logits ``[N, V]``, ids ``[N]``; checked,
            as :func:`sentence_grpo_loss`): each token's log-prob is its own, so packing changes nothing else.
    Returns:
        logp ``[...]`` float32 (float64 for float64 logits), and entropy ``[...]`` when ``return_entropy``.
        Differentiable with respect to ``logits``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating tensor of shape [..., V], "
                         f"got {tuple(logits.shape)} {logits.dtype}")
    request = _logprob_request(ids, temperature, return_entropy, backend, logits.device, logits.shape[-1], tp_group,
                               vocab_start_index)
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids must have shape {tuple(logits.shape[:-1])} (logits without V), got {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits is on {logits.device}")
    _check_packed_tokens(cu_seqlens, ids)
    if request.backend == "reference":
        return _logprobs_returned(*_reference_logprobs(logits, ids, request), return_entropy)
    return _logprobs_returned(*ops.logprobs_on_logits(logits, ids, request), return_entropy)


def fused_linear_token_logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, return_entropy=False,
                                chunk_size=None, backend="auto", tp_group=None, vocab_start_index=None,
                                tp_reduce_hidden_grad=True, cu_seqlens=None):
    """:func:`token_logprobs` of ``hidden @ weight.T + bias``.

    hidden ``[B, T, H]``, weight ``[V, H]``, bias ``[V]`` or ``None``, ids ``[B, T]`` -> logp ``[B, T]`` float32.
    ``tp_group``, ``vocab_start_index``, ``tp_reduce_hidden_grad``: an LM head sharded over the vocabulary, as
    :func:`fused_linear_sentence_grpo_loss`. ``cu_seqlens``: packed inputs, hidden ``[N, H]`` and ids ``[N]``
    -> logp ``[N]`` (as :func:`token_logprobs`).
    """
    _check_linear_inputs(hidden, weight, bias, chunk_size, packed=cu_seqlens is not None)
    request = _logprob_request(ids, temperature, return_entropy, backend, hidden.device, weight.shape[0], tp_group,
                               vocab_start_index, tp_reduce_hidden_grad, chunk_size)
    if tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ids must have shape {tuple(hidden.shape[:-1])} (hidden without H), got {tuple(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"ids is on {ids.device} but hidden is on {hidden.device}")
    _check_packed_tokens(cu_seqlens, ids)
    if request.backend == "reference":
        logp, entropy = _reference_logprobs(_materialised_logits(hidden, weight, bias), ids, request)
    elif cu_seqlens is not None:                 # one row of N tokens
        logp, entropy = ops.logprobs_on_hidden(hidden.unsqueeze(0), weight, bias, ids.unsqueeze(0), request)
        logp, entropy = logp.view(ids.shape), None if entropy is None else entropy.view(ids.shape)
    else:
        logp, entropy = ops.logprobs_on_hidden(hidden, weight, bias, ids, request)
    return _logprobs_returned(logp, entropy, return_entropy)


def sentence_grpo_loss_from_logps(logps, segment_ids, advantages, old_logps=None, ref_logps=None, *, entropy=None,
                                  config: LossConfig = LossConfig(), normalizer=None, is_weights=None,
                                  sampling_logps=None, backend="auto", return_metrics=False, process_group=None):
    """The loss from token log-probs, for a trainer that already has them (verl's policy losses): pass B only,
    O(tokens) work, gradients into ``logps`` (and into ``entropy`` for the entropy bonus).

    logps ``[B, T]`` float, the log-probs of the sampled tokens at ``config.temperature``; entropy ``[B, T]`` or
    ``None`` (needed only by ``entropy_coef`` and ``top_entropy_quantile``; reported as ``entropy_mean`` when
    given); the rest as :func:`sentence_grpo_loss` with its options in ``config`` (a validated ``LossConfig``).
    Returns the loss, or ``(loss, metrics)``; with the log-probs of ``logits`` it equals the loss of the logits.
    """
    _check_flag("return_metrics", return_metrics)
    if not isinstance(logps, torch.Tensor) or not logps.dtype.is_floating_point or logps.dim() != 2:
        raise ValueError(f"logps must be a floating [B, T] tensor, got {getattr(logps, 'shape', logps)!r}")
    if entropy is None and (config.entropy_coef != 0 or config.top_entropy_quantile < 1.0):
        raise ValueError("entropy_coef and top_entropy_quantile need the token entropies: pass entropy=[B, T]")
    check_loss_inputs((*logps.shape, 1), logps.dtype, logps.device, segment_ids.new_zeros(segment_ids.shape),
                      segment_ids, advantages, old_logps, ref_logps, config, logits_name="logps")
    normalizer = _checked_batch_arguments(config, logps.shape, logps.device, old_logps, is_weights, sampling_logps,
                                          normalizer)
    name = ops.resolve_backend(backend, logps.device).name
    if name == "reference":
        return reference.sentence_grpo_loss_from_logps(logps, segment_ids, advantages, old_logps, ref_logps, config,
                                                       return_metrics, process_group, normalizer, is_weights,
                                                       sampling_logps, entropy)
    _check_constant_inputs(name, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps)
    request = ops.LossRequest(config=config, backend=name, with_metrics=return_metrics or entropy is not None,
                              old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps,
                              is_weights=is_weights, normalizer=normalizer, process_group=process_group)
    outputs = ops.loss_on_logps(logps, entropy, segment_ids, advantages, request)
    if not return_metrics:
        return outputs.loss
    return outputs.loss, outputs.metrics


class SentenceGRPOLoss(nn.Module):
    """``nn.Module`` form of the loss; the constructor takes the options of :func:`sentence_grpo_loss`.

    ``forward(logits, completion_ids, segment_ids, advantages, old_logps=None, ref_logps=None, *, normalizer=None,
    is_weights=None, sampling_logps=None, cu_seqlens=None)`` or ``forward(hidden=..., weight=..., bias=None,
    completion_ids=..., ...)`` for the fused linear path (the per-batch tensors, packed ones' ``cu_seqlens``
    included, are arguments of ``forward``). ``tp_group``, ``vocab_start_index``, ``tp_reduce_hidden_grad``: a
    vocabulary sharded over a tensor-parallel group; ``sp_group``: packed tokens split over a sequence-parallel
    group (as :func:`sentence_grpo_loss`).
    """

    def __init__(self, *, eps_low=0.2, eps_high=0.2, beta=0.0, delta=None, temperature=1.0, ratio_level="sum",
                 kl_reduction="mean", reduction="sentence_mean", clamp_log_ratio=20.0, objective="ppo_clip",
                 clip_ratio_c=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                 vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_estimator="k3",
                 kl_importance_weighting=False, entropy_coef=0.0, top_entropy_quantile=1.0,
                 off_policy_mask_threshold=None, is_mode=None, is_clip_min=None, is_clip_max=3.0, inplace=False,
                 backend="auto", return_metrics=False, chunk_size=None, process_group=None, tp_group=None,
                 vocab_start_index=None, tp_reduce_hidden_grad=True, sp_group=None, return_token_scores=False):
        super().__init__()
        # Validate now so a bad option fails where the module is built, not at the first step.
        self.config = config_from(locals())
        ops.check_backend_name(backend)
        _check_flag("inplace", inplace)
        _check_flag("return_metrics", return_metrics)
        _check_flag("return_token_scores", return_token_scores)
        self.inplace, self.backend, self.return_metrics = inplace, backend, return_metrics
        self.return_token_scores = return_token_scores
        _check_flag("tp_reduce_hidden_grad", tp_reduce_hidden_grad)
        self.chunk_size, self.process_group, self.sp_group = chunk_size, process_group, sp_group
        self.tensor_parallel = dict(tp_group=tp_group, vocab_start_index=vocab_start_index)
        self.tp_reduce_hidden_grad = tp_reduce_hidden_grad

    def forward(self, logits=None, completion_ids=None, segment_ids=None, advantages=None, old_logps=None,
                ref_logps=None, *, hidden=None, weight=None, bias=None, normalizer=None, is_weights=None,
                sampling_logps=None, cu_seqlens=None):
        if (logits is None) == (hidden is None and weight is None):
            raise ValueError("pass either logits or hidden and weight, not both and not neither")
        call = dict(completion_ids=completion_ids, segment_ids=segment_ids, advantages=advantages,
                    old_logps=old_logps, ref_logps=ref_logps, normalizer=normalizer, is_weights=is_weights,
                    sampling_logps=sampling_logps, cu_seqlens=cu_seqlens, sp_group=self.sp_group,
                    process_group=self.process_group, backend=self.backend, return_metrics=self.return_metrics,
                    return_token_scores=self.return_token_scores, tp_reduce_hidden_grad=self.tp_reduce_hidden_grad,
                    **self.tensor_parallel)
        if logits is not None:
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
            request = _loss_request(self.config, call, logits_shape=tuple(logits.shape), dtype=logits.dtype,
                                    device=logits.device, local_vocab=logits.shape[-1])
            outputs = _loss_of_logits(logits, completion_ids, segment_ids, advantages, request, self.inplace)
            return _returned(outputs, request)
        if hidden is None or weight is None:
            raise ValueError("the fused linear path needs both hidden and weight")
        _check_linear_inputs(hidden, weight, bias, self.chunk_size, packed=cu_seqlens is not None)
        request = _loss_request(self.config, call, logits_shape=(*hidden.shape[:-1], weight.shape[0]),
                                dtype=hidden.dtype, device=hidden.device, local_vocab=weight.shape[0],
                                logits_name="hidden", chunk_size=self.chunk_size)
        return _returned(_loss_of_hidden(hidden, weight, bias, completion_ids, segment_ids, advantages, request),
                         request)

    def extra_repr(self) -> str:
        options = dict(vars(self.config), inplace=self.inplace, backend=self.backend,
                       return_metrics=self.return_metrics, chunk_size=self.chunk_size)
        return ", ".join(f"{key}={value!r}" for key, value in options.items())
