"""The driver: runs a backend's passes (``ops/passes.py``) on logits, with the autograd wiring.

Pass A (log-probs, logsumexp, entropy from one read of the logits), pass B (per-sentence sums, terms and the
per-token coefficient ``c_t = ∂loss/∂logp_t``) and pass C (``c_t / T · (onehot − softmax)``). Every backend
implements the same passes; this module runs them on logits, ``ops/fused_linear.py`` on chunks of
``hidden @ weight.T``. What spans processes (the data-parallel denominators) is done here, through
``sgrpo_kernels.distributed``, never inside a backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import distributed
from . import sentence_math
from .layout import SentenceArrays, SentenceSums, sentence_layout, sentence_metrics
from .library import scale_gradients_
from .passes import Passes, TokenScores, flat_token_weights, new_output
from .rows import RowInputs


class EagerGradient(torch.autograd.Function):
    """Attach to some inputs gradients already computed in the forward pass (used for ``inplace=True``, whose
    gradient lives in the overwritten logits; the functional paths get theirs from ``ops/custom_ops.py``).

    ``EagerGradient.apply(value, gradients, *inputs)`` returns ``value``; ``backward`` hands ``gradients[k]``
    to ``inputs[k]``, scaled in place by ``grad_output`` without a host sync (``library.scale_gradients_``).
    The gradients are handed over once: a second backward through the same graph (``retain_graph=True``)
    raises instead of returning stale buffers.
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
        scale_gradients_([gradient for gradient in gradients if gradient is not None], grad_output)
        return (None, None, *gradients)


def data_parallel_layout(process_group) -> dict:
    """The keywords of ``layout.sentence_layout`` that make its denominators span ``process_group``'s ranks."""
    if process_group is None:
        return {}
    return dict(total=lambda local: distributed.global_sum(local, process_group),
                ranks=distributed.world_size(process_group))


def sequence_total(packing):
    """Sums over the ranks that share a packed sequence (``Packing.total``), or the identity."""
    return (lambda local: local) if packing is None or not packing.split else packing.total


def packing_layout(packing) -> dict:
    """The keywords of ``layout.sentence_layout`` for a packed row (``ops/packed.py``), none for padded rows."""
    return {} if packing is None else packing.layout_options()


def entropy_bonus_coefficients(bonus_tokens: torch.Tensor, config, dtype, process_group,
                               packing=None) -> torch.Tensor:
    """``∂loss/∂H_t`` of the entropy bonus, flat ``[B*T]``: ``−entropy_coef · ranks / N`` on the ``bonus_tokens``
    (bool, flat: the scored tokens, entropy-masked), 0 elsewhere; ``N`` counts them on every rank."""
    options = data_parallel_layout(process_group)
    local_tokens = sequence_total(packing)(bonus_tokens.sum())
    tokens = options.get("total", lambda local: local)(local_tokens).clamp(min=1)
    return torch.where(bonus_tokens, -config.entropy_coef * options.get("ranks", 1) / tokens.to(dtype), 0.0)


def clip_inputs(config, old_logps, advantages) -> tuple[dict, dict]:
    """The keywords of ``token_coefficients`` and ``sentence_sums`` that only ``geo_mean``'s per-token clip reads."""
    if config.objective != "geo_mean":
        return {}, {}
    return dict(old_logps=old_logps, advantages=advantages), dict(advantages=advantages)


def masks_needed(config) -> bool:
    """Whether the policy's token weights depend on the current log-probs or entropies (the masks)."""
    return config.top_entropy_quantile < 1.0 or config.off_policy_mask_threshold is not None


def policy_token_weights(config, scores, segment_ids, num_slots: int, advantages, old_logps, sampling_logps,
                         is_weights, process_group, packing=None):
    """Flat ``[B*T]`` weights ``q_t`` of the policy loss (``None``: all 1), the flat bool tokens of the entropy
    bonus, and ``vespo``'s per-sentence sums of log importance weights (fp64 ``[B*S_max]``, else ``None``), from
    ``sentence_math.policy_token_weights`` on the scored tokens (``scores``: pass A of every token; read only
    where a mask needs it). ``packing``: the answers of a packed row (``ops/packed.py``), else each row is one."""
    batch, length = segment_ids.shape
    segments = segment_ids.reshape(-1)
    scored = segments >= 0
    folds_weights = config.objective == "vespo" and (is_weights is not None or config.is_mode is not None)
    if not masks_needed(config) and config.is_mode is None and not folds_weights:
        return flat_token_weights(is_weights, batch, length), scored, None   # the bonus covers every token
    positions = torch.nonzero(scored).squeeze(1)
    slots = (positions // max(length, 1)) * num_slots + segments[positions].long()
    slot_advantages = (advantages.reshape(-1) if advantages.dim() == 2
                       else advantages.repeat_interleave(num_slots)).to(scores.logp.dtype)
    flat_weights = flat_token_weights(is_weights, batch, length)
    pick = lambda tensor: None if tensor is None else tensor.reshape(-1)[positions].to(scores.logp.dtype)  # noqa: E731
    answers = dict(answer_of_token=positions // max(length, 1), answers=batch) if packing is None else dict(
        answer_of_token=packing.slot_answers[slots], answers=packing.answers,
        sequence_total=packing.total if packing.split else None)
    entropy_mask, weight, log_is = sentence_math.policy_token_weights(
        config, scores.logp[positions], lambda: scores.entropy[positions], pick(sampling_logps), pick(old_logps),
        slot_advantages[slots], slots, batch * num_slots, pick(flat_weights), process_group, **answers)
    bonus_tokens = scored.clone()
    if entropy_mask is not None:
        bonus_tokens[positions] = entropy_mask
    sentence_log_is = None
    if log_is is not None:
        sentence_log_is = torch.zeros(batch * num_slots, dtype=torch.float64, device=segment_ids.device)
        sentence_log_is.index_add_(0, slots, log_is.double())
        sentence_log_is = sequence_total(packing)(sentence_log_is)
    if weight is None:
        return None, bonus_tokens, sentence_log_is
    token_weights = torch.zeros(batch * length, dtype=scores.logp.dtype, device=segment_ids.device)
    token_weights[positions] = weight
    return token_weights, bonus_tokens, sentence_log_is


def total_sentence_sums(sums: SentenceSums, packing) -> None:
    """Sum pass B's per-slot sums over the ranks that share a packed sequence, in place (``log_is`` is summed
    where it is made)."""
    if packing is None or not packing.split:
        return
    for name in ("log_ratio", "kl", "logp", "weight", "clipped_log_ratio", "clipped_tokens"):
        local = getattr(sums, name)
        if local is not None:
            local.copy_(packing.total(local))


class LossOutputs(NamedTuple):
    """A loss run's results: the scalar ``loss``, ``metrics`` (a dict of 0-dim tensors, or ``None``) and, when the
    request asked for them, pass A's ``token_logp`` and ``token_entropy`` (flat, one per row position, 0 where not
    scored; detached), else ``None``."""

    loss: torch.Tensor
    metrics: dict | None
    token_logp: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None


def needs_entropy(request) -> bool:
    """Whether pass A must compute the entropies: for a metric, the returned token scores, the bonus or the mask."""
    config = request.config
    return (request.with_metrics or request.with_token_scores or config.entropy_coef != 0
            or config.top_entropy_quantile < 1.0)


def returned_scores(scores: TokenScores, scored: torch.Tensor, request) -> tuple:
    """``(token_logp, token_entropy)`` of the scored tokens (0 elsewhere), or ``(None, None)`` unless asked."""
    if not request.with_token_scores:
        return None, None
    return (torch.where(scored, scores.logp, 0.0),
            torch.where(scored, scores.entropy, 0.0) if scores.entropy is not None else None)


def _finish(passes: Passes, scores: TokenScores, rows: RowInputs, request, layout) -> tuple:
    """Pass B on the scores of every token: the policy's token weights, the per-sentence sums and terms, the loss
    with its entropy bonus. Returns ``(loss, terms, sums, token weights or None, the bonus's per-token
    coefficients or None)``."""
    config, packing = request.config, rows.packing
    token_weights, bonus_tokens, log_is = policy_token_weights(
        config, scores, rows.segment_ids, rows.num_slots, rows.advantages, rows.old_logps, rows.sampling_logps,
        rows.is_weights, request.process_group, packing)
    sums = SentenceSums.zeros(layout, config, with_token_weights=token_weights is not None, log_is=log_is)
    _, sums_inputs = clip_inputs(config, rows.old_logps, rows.advantages)
    passes.sentence_sums(scores.logp, rows.old_logps, rows.ref_logps, rows.segment_ids, rows.num_slots, sums, config,
                         token_weights=token_weights, **sums_inputs)
    total_sentence_sums(sums, packing)
    terms = passes.sentence_terms(layout, sums, rows.advantages, config)
    loss = terms.weighted_loss.sum()
    entropy_coef = None
    if config.entropy_coef != 0:
        entropy_coef = entropy_bonus_coefficients(bonus_tokens, config, scores.logp.dtype, request.process_group,
                                                  packing)
        loss = loss + sequence_total(packing)(torch.where(bonus_tokens, entropy_coef * scores.entropy, 0.0).sum())
    return loss, terms, sums, token_weights, entropy_coef


def _metrics(terms, sums, layout, rows: RowInputs, scores: TokenScores, request) -> dict | None:
    if not request.with_metrics:
        return None
    arrays = SentenceArrays(count=layout.count, ratio=terms.ratio, kl_sum=sums.kl, clipped_tokens=sums.clipped_tokens)
    return sentence_metrics(arrays, rows.advantages, rows.segment_ids.reshape(-1) >= 0, scores.entropy,
                            request.config, sequence_total(rows.packing))


def request_layout(rows: RowInputs, request, dtype: torch.dtype):
    """The sentence layout of ``rows`` with the request's reduction, normaliser and data-parallel group."""
    return sentence_layout(rows.segment_ids, rows.num_slots, request.config.reduction, dtype,
                           normalizer=request.normalizer, **data_parallel_layout(request.process_group),
                           **packing_layout(rows.packing))


def run_sentence_grpo_loss(passes: Passes, logits, rows: RowInputs, request, *,
                           gradient_out: torch.Tensor | None) -> LossOutputs:
    """The loss (``docs/design.md``, "The loss") with passes A, B and, when ``gradient_out`` is given, C.

    logits ``[B, T, V]`` (a packed batch: its one row ``[1, N, V]``), ``rows`` their inputs (already validated),
    ``request`` the call's options, per-rollout tensors and groups. The gradient of the loss with respect to
    ``logits`` is written into ``gradient_out`` (``[B, T, V]``, may be ``logits`` itself): it is finished here, in
    the forward pass, because every ``c_t`` depends only on its own sentence. Runs without autograd.
    """
    config = request.config
    with torch.no_grad():
        scores = passes.token_scores(logits, rows.completion_ids, config.temperature, segment_ids=rows.segment_ids,
                                     with_entropy=needs_entropy(request))
        layout = request_layout(rows, request, scores.logp.dtype)
        loss, terms, sums, token_weights, entropy_coef = _finish(passes, scores, rows, request, layout)
        if gradient_out is not None:
            coef_inputs, _ = clip_inputs(config, rows.old_logps, rows.advantages)
            token_coef = passes.token_coefficients(scores.logp, rows.ref_logps, rows.segment_ids, rows.num_slots,
                                                   terms, config, token_weights=token_weights, **coef_inputs)
            passes.logits_gradient(logits, rows.completion_ids, token_coef, scores.lse, config.temperature,
                                   gradient_out, entropy_coef=entropy_coef,
                                   entropy=scores.entropy if entropy_coef is not None else None)
        scored = rows.segment_ids.reshape(-1) >= 0
        return LossOutputs(loss, _metrics(terms, sums, layout, rows, scores, request),
                           *returned_scores(scores, scored, request))


def run_loss_on_logps(passes: Passes, logps, entropy, rows: RowInputs, request) -> tuple:
    """The loss from given token log-probs ``[B, T]`` (and entropies ``[B, T]`` or ``None``: needed only by the
    entropy bonus and mask, reported as ``entropy_mean`` when given): pass B alone. Returns
    ``(LossOutputs, ∂loss/∂logp flat [B*T], ∂loss/∂H flat [B*T] or None)``; runs without autograd."""
    config = request.config
    with torch.no_grad():
        dtype = torch.promote_types(logps.dtype, torch.float32)
        flat_entropy = None if entropy is None else entropy.reshape(-1).to(dtype)
        scores = TokenScores(logps.reshape(-1).to(dtype), None, flat_entropy)
        layout = request_layout(rows, request, dtype)
        loss, terms, sums, token_weights, entropy_coef = _finish(passes, scores, rows, request, layout)
        coef_inputs, _ = clip_inputs(config, rows.old_logps, rows.advantages)
        token_coef = passes.token_coefficients(scores.logp, rows.ref_logps, rows.segment_ids, rows.num_slots, terms,
                                               config, token_weights=token_weights, **coef_inputs)
        return LossOutputs(loss, _metrics(terms, sums, layout, rows, scores, request)), token_coef, entropy_coef


def token_logprobs_backward(passes: Passes, logits, ids, grad_logp, grad_entropy, lse, entropy,
                            temperature: float) -> torch.Tensor:
    """``∂/∂logits`` of ``Σ grad_logp · logp (+ grad_entropy · H)`` by pass C: logits ``[B, T, V]``, the rest
    flat ``[B*T]`` (``grad_logp``/``grad_entropy`` may be ``None``: no gradient arrived for that output)."""
    rows = lse.numel()
    logp_coef = (torch.zeros(rows, dtype=lse.dtype, device=lse.device) if grad_logp is None
                 else grad_logp.reshape(rows).to(lse.dtype))
    entropy_coef = None if grad_entropy is None else grad_entropy.reshape(rows).to(lse.dtype)
    gradient = new_output(logits.shape, logits.dtype, logits.device)
    return passes.logits_gradient(logits, ids, logp_coef, lse, temperature, gradient, entropy_coef=entropy_coef,
                                  entropy=entropy)


def sentence_grpo_loss_inplace(passes: Passes, logits, rows: RowInputs, request) -> LossOutputs:
    """:func:`run_sentence_grpo_loss` writing the gradient over ``logits`` (eager mode only: a custom op may not
    mutate an input it differentiates); the loss is wired to autograd. With a packed request the logits are packed
    ``[N, V]`` and ``rows`` their one row."""
    grid = logits.detach() if rows.packing is None else logits.detach().unsqueeze(0)
    outputs = run_sentence_grpo_loss(passes, grid, rows, request, gradient_out=grid)
    torch.autograd.graph.increment_version(logits)   # autograd must refuse any later use of the overwritten logits
    return outputs._replace(loss=EagerGradient.apply(outputs.loss, (logits.detach(),), logits))
