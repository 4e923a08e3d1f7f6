"""The driver: runs a backend's passes (``ops/passes.py``) on logits, with the autograd wiring.

Pass A (log-probs, logsumexp, entropy from one read of the logits), pass B (per-sentence sums, terms and the
per-token coefficient ``c_t = ∂loss/∂logp_t``) and pass C (``c_t / T · (onehot − softmax)``). Every backend
implements the same passes; this module runs them on logits, ``ops/fused_linear.py`` on chunks of
``hidden @ weight.T``. What spans processes (the data-parallel denominators) is done here, through
``sgrpo_kernels.distributed``, never inside a backend.
"""

from __future__ import annotations

import torch

from .. import distributed
from .layout import SentenceArrays, SentenceSums, sentence_layout, sentence_metrics
from .passes import Passes, flat_token_weights, new_output


class EagerGradient(torch.autograd.Function):
    """Attach to some inputs gradients already computed in the forward pass (used for ``inplace=True``, whose
    gradient lives in the overwritten logits; the functional paths get theirs from ``ops/custom_ops.py``).

    ``EagerGradient.apply(value, gradients, *inputs)`` returns ``value``; ``backward`` hands ``gradients[k]``
    to ``inputs[k]``, scaled in place by ``grad_output`` without a host sync (``custom_ops.scale_gradient_``).
    The gradients are handed over once: a second backward through the same graph (``retain_graph=True``)
    raises instead of returning stale buffers.
    """

    @staticmethod
    def forward(ctx, value, gradients, *inputs):
        ctx.gradients = list(gradients)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        from .custom_ops import scale_gradients_

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


def entropy_bonus_coefficient(layout, config, process_group) -> torch.Tensor:
    """``∂loss/∂H_t`` of the entropy bonus for every scored token: ``−entropy_coef · ranks / Σ n`` (0-dim),
    ``Σ n`` the scored tokens of every rank (the convention of the data-parallel reductions)."""
    options = data_parallel_layout(process_group)
    tokens = options.get("total", lambda local: local)(layout.count.sum()).clamp(min=1)
    return -config.entropy_coef * options.get("ranks", 1) / tokens.to(layout.weight.dtype)


def run_sentence_grpo_loss(passes: Passes, logits, completion_ids, segment_ids, advantages, old_logps, ref_logps,
                           config, num_slots: int, *, gradient_out: torch.Tensor | None, with_metrics: bool,
                           process_group=None, normalizer: torch.Tensor | None = None,
                           is_weights: torch.Tensor | None = None):
    """The loss (``reference.sentence_grpo_loss``) with passes A, B and, when ``gradient_out`` is given, C.

    Inputs as ``reference.sentence_grpo_loss`` (already validated); ``num_slots`` is ``S_max``. The gradient of
    the loss with respect to ``logits`` is written into ``gradient_out`` (``[B, T, V]``, may be ``logits`` itself):
    it is finished here, in the forward pass, because every ``c_t`` depends only on its own sentence.
    Returns ``(loss, metrics or None)``; runs without autograd.
    """
    with torch.no_grad():
        scores = passes.token_scores(logits, completion_ids, config.temperature, segment_ids=segment_ids,
                                     with_entropy=with_metrics or config.entropy_coef != 0)
        layout = sentence_layout(segment_ids, num_slots, config.reduction, scores.logp.dtype, normalizer=normalizer,
                                 **data_parallel_layout(process_group))
        token_weights = flat_token_weights(is_weights, *segment_ids.shape)
        sums = SentenceSums.zeros(layout, config, with_token_weights=token_weights is not None)
        passes.sentence_sums(scores.logp, old_logps, ref_logps, segment_ids, num_slots, sums, config,
                             token_weights=token_weights)
        terms = passes.sentence_terms(layout, sums, advantages, config)
        loss = terms.weighted_loss.sum()
        scored = segment_ids.reshape(-1) >= 0
        entropy_coef = None
        if config.entropy_coef != 0:
            bonus = entropy_bonus_coefficient(layout, config, process_group)
            loss = loss + bonus * torch.where(scored, scores.entropy, 0.0).sum()
            entropy_coef = torch.where(scored, bonus, 0.0)
        if gradient_out is not None:
            token_coef = passes.token_coefficients(scores.logp, ref_logps, segment_ids, num_slots, terms, config,
                                                   token_weights=token_weights)
            passes.logits_gradient(logits, completion_ids, token_coef, scores.lse, config.temperature, gradient_out,
                                   entropy_coef=entropy_coef, entropy=scores.entropy if entropy_coef is not None
                                   else None)
        if not with_metrics:
            return loss, None
        arrays = SentenceArrays(count=layout.count, ratio=terms.ratio, kl_sum=sums.kl)
        return loss, sentence_metrics(arrays, advantages, segment_ids.reshape(-1) >= 0, scores.entropy, config)


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


def sentence_grpo_loss_inplace(passes: Passes, logits, completion_ids, segment_ids, advantages, old_logps,
                               ref_logps, config, num_slots: int, *, with_metrics: bool, process_group=None,
                               normalizer: torch.Tensor | None = None, is_weights: torch.Tensor | None = None):
    """:func:`run_sentence_grpo_loss` writing the gradient over ``logits`` (eager mode only: a custom op may not
    mutate an input it differentiates); returns ``(loss wired to autograd, metrics or None)``."""
    loss, metrics = run_sentence_grpo_loss(passes, logits.detach(), completion_ids, segment_ids, advantages,
                                           old_logps, ref_logps, config, num_slots, gradient_out=logits.detach(),
                                           with_metrics=with_metrics, process_group=process_group,
                                           normalizer=normalizer, is_weights=is_weights)
    torch.autograd.graph.increment_version(logits)   # autograd must refuse any later use of the overwritten logits
    return EagerGradient.apply(loss, (logits.detach(),), logits), metrics
