"""Sentence-level GRPO inside verl: a policy loss and an advantage estimator registered as ``"sentence_grpo"``.

    from sgrpo_kernels.integrations import verl as sgrpo_verl
    sgrpo_verl.register(loss="vanilla", level="sentence", segmenter=Segmenter(tokenizer))

and in the verl config ``actor_rollout_ref.actor.policy_loss.loss_mode=sentence_grpo`` and
``algorithm.adv_estimator=sentence_grpo``. ``register()`` must run in every process that computes advantages or
losses (the driver and the actor workers: verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` in each
of them; ``examples/verl/sgrpo_verl_plugin.py`` is such a module).

How sentences reach verl's registries, whose functions never see the batch (verl 0.9.1 calls a policy loss with
``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights`` and an estimator
with ``token_level_rewards, response_mask, index, config``): ``register()`` wraps verl's two callers,
``ray_trainer.compute_advantage`` and ``losses.ppo_loss``, so that for the duration of each call the batch is
visible to our functions (a context variable; the wrappers change nothing else and are removed by the function
``register()`` returns, or by :func:`registered` on exit). The sentences are one tensor field, ``sentence_ids``
``[B, response_length]`` (``-1`` on unscored tokens), that the advantage wrapper adds to ``data.batch`` from
``responses`` with the ``segmenter`` when it is not there yet; verl then carries it like any batch field to the
actor update. Sentence rewards are verl's dense ``token_level_rewards``: each sentence's reward on its tokens
(usually its last one), summed per sentence.

With ``use_fused_kernels`` and ``fused_kernel_options.impl_backend=sgrpo`` verl's model forward computes the
log-probs and entropies with :func:`~sgrpo_kernels.fused_linear_token_logprobs` (:func:`use_fused_forward`).
With ``use_remove_padding=True`` and ``ulysses_sequence_parallel_size > 1`` that forward gets one packed row (a
rank's slice of it under Ulysses) and the ``shift_labels`` verl rolled over the whole packed sequence; verl gathers
the ranks' log-probs and pads them per answer before the policy loss, so both work unchanged there
(``tests/test_verl.py`` drives verl's own remove-padding actor forward on two gloo ranks).

``loss`` names the verl policy loss that ``level="token"`` (``"output"`` for ``gspo`` and ``geo_mean``)
reproduces: ``"vanilla"`` (PPO clip with verl's dual clip ``clip_ratio_c``), ``"gspo"`` (the length-normalised
ratio of each sentence), ``"cispo"``, ``"sapo"``, ``"geo_mean"``. Aggregation follows ``loss_agg_mode`` and
``config.global_batch_info`` as verl's ``agg_loss`` does (so data-parallel gradients are exact); where verl's own
loss ignores them (``sapo`` always takes ``seq-mean-token-mean``, ``geo_mean`` the plain mean over the
micro-batch's answers) we do the same. At the sentence level ``token-*`` modes weigh a sentence by its tokens,
``seq-mean-token-sum*`` sum them per answer and ``seq-mean-token-mean`` averages an answer's sentences.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass, field

import torch

from ..advantages import group_sentence_advantages
from ..config import LossConfig
from ..loss import sentence_grpo_loss_from_logps

NAME = "sentence_grpo"
SENTENCE_IDS = "sentence_ids"
LEVELS = ("sentence", "token", "output")
# verl loss -> (our objective, ratio_level)
LOSSES = {"vanilla": ("ppo_clip", "sum"), "gspo": ("ppo_clip", "mean"), "cispo": ("cispo", "sum"),
          "sapo": ("sapo", "sum"), "geo_mean": ("geo_mean", "mean")}
# verl loss_agg_mode -> our reduction
AGGREGATIONS = {"token-mean": "token_mean", "token-sum": "token_mean", "seq-mean-token-sum": "answer_mean_token_sum",
                "seq-mean-token-sum-norm": "answer_mean_token_sum", "seq-mean-token-mean": "sentence_mean"}

_batch = contextvars.ContextVar("sgrpo_verl_batch", default=None)


@dataclass
class Settings:
    """What ``register()`` was given; read by the registered functions."""

    loss: str = "vanilla"
    level: str = "sentence"
    segmenter: object = None
    advantage_options: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)


_settings = Settings()


def register(*, loss: str = "vanilla", level: str = "sentence", segmenter=None, weighting: str = "output",
             mode: str = "sentence", **loss_options):
    """Register the policy loss and the advantage estimator ``"sentence_grpo"`` with verl and wrap its two callers.

    Args:
        loss: the verl loss this one generalises (``LOSSES``).
        level: ``"sentence"`` (needs ``sentence_ids`` in the batch, or a ``segmenter``), ``"token"`` or
            ``"output"`` (one sentence per answer).
        segmenter: a :class:`~sgrpo_kernels.Segmenter` that fills ``sentence_ids`` from ``responses``.
        weighting, mode: of :func:`~sgrpo_kernels.group_sentence_advantages`.
        loss_options: further :class:`~sgrpo_kernels.config.LossConfig` options (e.g. ``beta`` stays verl's: use
            its ``use_kl_loss``), fixed for the run.

    Returns:
        A function that removes the wrappers (the registry entries stay: they are inert unless selected).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    for name in ("objective", "ratio_level", "eps_low", "eps_high", "clip_ratio_c", "reduction", "normalizer"):
        if name in loss_options:
            raise ValueError(f"{name} comes from verl's config and loss_agg_mode, not from register()")
    global _settings
    previous, _settings = _settings, Settings(loss, level, segmenter, dict(weighting=weighting, mode=mode),
                                              loss_options)
    try:
        LossConfig(**_loss_config_options(None, "token-mean"))     # refuse bad options now, not at the first step
    except (TypeError, ValueError):
        _settings = previous
        raise

    from verl.models.transformers import monkey_patch
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.workers.utils import losses

    core_algos.POLICY_LOSS_REGISTRY[NAME] = policy_loss
    core_algos.ADV_ESTIMATOR_REGISTRY[NAME] = advantage_estimator
    patches = [(ray_trainer, "compute_advantage"), (losses, "ppo_loss")]
    if "verl.workers.engine_workers" in sys.modules:       # it bound ppo_loss at import
        patches.append((sys.modules["verl.workers.engine_workers"], "ppo_loss"))
    originals = [(module, name, getattr(module, name)) for module, name in patches]
    for module, name, original in originals:
        if not getattr(original, "_sgrpo_wrapper", False):
            setattr(module, name, _with_batch(original, batch_argument=2 if name == "ppo_loss" else 0))

    fused_original = monkey_patch.patch_forward_with_backends
    if not getattr(fused_original, "_sgrpo_wrapper", False):
        monkey_patch.patch_forward_with_backends = _with_fused_backend(fused_original)

    def unregister():
        for module, name, original in originals:
            setattr(module, name, original)
        monkey_patch.patch_forward_with_backends = fused_original
    return unregister


@contextlib.contextmanager
def registered(**options):
    """``register(**options)`` for the duration of a ``with`` block."""
    unregister = register(**options)
    try:
        yield
    finally:
        unregister()


def _with_batch(function, batch_argument: int):
    """``function`` with its batch argument (positional index or ``data=``) visible to ours while it runs."""
    def wrapper(*args, **kwargs):
        data = kwargs.get("data", args[batch_argument] if len(args) > batch_argument else None)
        if batch_argument == 0:                           # compute_advantage(data: DataProto, ...)
            _add_sentence_ids(data)
        token = _batch.set(data)
        try:
            return function(*args, **kwargs)
        finally:
            _batch.reset(token)
    wrapper._sgrpo_wrapper = True
    wrapper.__wrapped__ = function
    return wrapper


FUSED_BACKEND = "sgrpo"


def _with_fused_backend(patch_forward_with_backends):
    """verl's ``patch_forward_with_backends`` that also accepts ``fused_kernels_backend="sgrpo"``."""
    def wrapper(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == FUSED_BACKEND:
            return use_fused_forward(model)
        return patch_forward_with_backends(model, use_fused_kernels, fused_kernels_backend)
    wrapper._sgrpo_wrapper = True
    return wrapper


def use_fused_forward(model) -> None:
    """Give a text-only Hugging Face causal LM (its class, as verl does) verl's ``use_fused_kernels`` forward
    with this package's :func:`~sgrpo_kernels.fused_linear_token_logprobs`: the output's ``log_probs`` and
    ``entropy`` (``[B, T]`` fp32) come from the final hidden states and the LM head a chunk at a time, never the
    ``[B, T, V]`` logits. What verl's config ``actor_rollout_ref.model.use_fused_kernels=True`` with
    ``+actor_rollout_ref.model.fused_kernel_options.impl_backend=sgrpo`` selects once :func:`register` has run."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    from ..loss import fused_linear_token_logprobs

    if getattr(model.config, "model_type", "") in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v",
                                                     "qwen3_5", "qwen3_5_moe"):
        raise ValueError(f"the sgrpo fused forward covers text-only models, not {model.config.model_type}")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None,
                **_):
        outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, past_key_values=past_key_values,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache,
                                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                     cache_position=cache_position)
        if shift_labels is not None:            # verl's own rule for the next-token labels
            targets = shift_labels
        elif labels is not None or input_ids is not None:
            targets = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
        else:
            raise RuntimeError("the fused forward needs labels, shift_labels or input_ids")
        head = self.get_output_embeddings()
        log_probs, entropy = fused_linear_token_logprobs(outputs[0], head.weight, targets,
                                                         bias=getattr(head, "bias", None), temperature=temperature,
                                                         return_entropy=True)
        return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    model._verl_fused_kernels_backend = FUSED_BACKEND
    model.__class__.forward = forward


def _fields(data):
    """The tensor fields of a verl ``DataProto`` (``.batch``) or ``TensorDict``."""
    return getattr(data, "batch", data)


def _add_sentence_ids(data) -> None:
    fields = _fields(data)
    if data is None or _settings.level != "sentence" or SENTENCE_IDS in fields.keys():
        return
    if _settings.segmenter is None:
        raise ValueError(f"level='sentence' needs a '{SENTENCE_IDS}' field in the batch or register(segmenter=...)")
    mask = fields["response_mask"].bool() if "response_mask" in fields.keys() else None
    fields[SENTENCE_IDS] = _settings.segmenter(fields["responses"], mask).segment_ids.to(fields["responses"].device)


def sentence_ids(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` sentence index of every scored token (``-1`` elsewhere) for the registered level, from the
    batch being processed for ``level="sentence"``."""
    mask = response_mask.bool()
    if _settings.level == "token":
        ids = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    elif _settings.level == "output":
        ids = torch.zeros_like(mask, dtype=torch.long)
    else:
        data = _batch.get()
        if data is None or SENTENCE_IDS not in _fields(data).keys():
            raise ValueError(f"level='sentence': the batch has no '{SENTENCE_IDS}' field; call "
                             "sgrpo_kernels.integrations.verl.register() in this process before verl runs")
        ids = _fields(data)[SENTENCE_IDS]
        if getattr(ids, "is_nested", False):
            ids = ids.to_padded_tensor(-1)
        ids = ids[:, :mask.shape[1]].to(mask.device).long()
        if ids.shape != mask.shape:
            raise ValueError(f"'{SENTENCE_IDS}' has shape {tuple(ids.shape)}, the responses {tuple(mask.shape)}")
    return torch.where(mask, ids, -1)


def _sentence_values(token_values: torch.Tensor, ids: torch.Tensor, num_slots: int, reduce: str) -> torch.Tensor:
    """``[B, S]`` per-sentence sum or mean of ``[B, R]`` token values over the tokens with ``ids == s``."""
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    scored = ids >= 0
    flat = rows[scored] * num_slots + ids[scored]
    total = torch.zeros(ids.shape[0] * num_slots, dtype=token_values.dtype, device=ids.device)
    total = total.index_add(0, flat, token_values[scored])
    if reduce == "mean":
        count = torch.zeros_like(total).index_add(0, flat, torch.ones_like(token_values[scored]))
        total = total / count.clamp(min=1)
    return total.view(ids.shape[0], num_slots)


def _num_slots(ids: torch.Tensor) -> int:
    return int(ids.max()) + 1 if ids.numel() and int(ids.max()) >= 0 else 1


def _loss_config_options(config, loss_agg_mode: str) -> dict:
    objective, ratio_level = LOSSES[_settings.loss]
    get = (lambda name, default: default) if config is None else config.get
    clip = get("clip_ratio", 0.2)
    low = get("clip_ratio_low", None)
    high = get("clip_ratio_high", None)
    low = clip if low is None else low
    high = clip if high is None else high
    options = dict(objective=objective, ratio_level=ratio_level, eps_low=low, eps_high=high,
                   reduction=AGGREGATIONS[loss_agg_mode], clamp_log_ratio=20.0)
    if _settings.loss == "vanilla":
        options["clip_ratio_c"] = get("clip_ratio_c", 3.0)
    if _settings.loss == "cispo":            # verl's CISPO weight is clamp(ρ, ·, 1 + ε_high)
        options["eps_high"] = 1.0 + high
    if _settings.loss == "sapo":
        options.update(sapo_tau_pos=get("tau_pos", 1.0), sapo_tau_neg=get("tau_neg", 1.05))
    return options | _settings.loss_options


def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """verl's policy-loss signature: all ``[B, R]``; returns ``(loss, metrics)`` (module docstring)."""
    if _settings.loss == "sapo":
        loss_agg_mode = "seq-mean-token-mean"
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode must be one of {tuple(AGGREGATIONS)}, got {loss_agg_mode!r}")
    info = dict(config.get("global_batch_info", None) or {}) if config is not None else {}
    dp_size = int(info.get("dp_size", 1) or 1)
    ids = sentence_ids(response_mask)
    num_slots = _num_slots(ids)
    work = torch.promote_types(log_prob.dtype, torch.float32)
    sentence_advantages = _sentence_values(advantages.to(work), ids, num_slots, "mean")
    options = _loss_config_options(config, loss_agg_mode)
    normalizer = None
    if _settings.loss == "geo_mean":         # verl: torch.mean over the micro-batch's answers, nothing else
        options["reduction"], normalizer, dp_size = "sentence_mean", float(ids.shape[0]), 1
    elif loss_agg_mode == "token-mean":
        normalizer = info.get("batch_num_tokens")
        if normalizer is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    elif loss_agg_mode == "token-sum":
        normalizer = 1.0
    else:
        normalizer = info.get("global_batch_size")
        if normalizer is None and dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
    normalizer = None if normalizer is None else float(normalizer)
    loss, metrics = sentence_grpo_loss_from_logps(
        log_prob, ids, sentence_advantages.detach(), old_log_prob.detach().to(work), config=LossConfig(**options),
        return_metrics=True, normalizer=normalizer,
        is_weights=None if rollout_is_weights is None else rollout_is_weights.detach())
    if loss_agg_mode == "seq-mean-token-sum-norm" and _settings.loss != "geo_mean":
        scale = info.get("loss_scale_factor")
        loss = loss / (response_mask.shape[-1] if scale is None else scale)
    return loss * dp_size, _verl_metrics(metrics, log_prob, old_log_prob, response_mask)


def _verl_metrics(metrics: dict, log_prob, old_log_prob, response_mask) -> dict:
    mask = response_mask.bool()
    ppo_kl = (old_log_prob - log_prob).detach()[mask].mean() if mask.any() else torch.zeros(())
    out = {"actor/pg_clipfrac": float(metrics["clip_fraction"]), "actor/ppo_kl": float(ppo_kl),
           "actor/pg_clipfrac_lower": 0.0}
    out |= {f"actor/sgrpo_{name}": float(value) for name, value in metrics.items()}
    return out


def advantage_estimator(token_level_rewards, response_mask, index=None, config=None, **_):
    """verl's estimator signature: ``[B, R]`` rewards (each sentence's reward on its tokens), ``[B, R]`` mask,
    ``index`` the group id (uid) of each answer; returns ``(advantages, returns)``, both ``[B, R]``, each token
    carrying its sentence's group-normalised advantage (:func:`~sgrpo_kernels.group_sentence_advantages`).

    ``config.norm_adv_by_std_in_grpo`` (default true) divides by the Bessel-corrected group standard deviation
    plus ``1e-6``, as verl's ``grpo`` does (it equals verl's ``grpo`` at one sentence per answer); groups may come
    in any order and sizes; a group of one answer gets advantage 0 (verl's ``grpo`` gives it its raw reward).
    """
    if index is None:
        raise ValueError("sentence_grpo needs verl's index (uid) of each answer to form its groups")
    mask = response_mask.bool()
    ids = sentence_ids(mask)
    num_slots = _num_slots(ids)
    work = torch.promote_types(token_level_rewards.dtype, torch.float32)
    rewards = _sentence_values(token_level_rewards.to(work), ids, num_slots, "sum")
    counts = torch.where(ids >= 0, ids + 1, 0).amax(1) if ids.numel() else torch.zeros(0, dtype=torch.long)
    by_std = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    options = dict(_settings.advantage_options, scale="unbiased_std" if by_std else "none", eps=1e-6)
    sentence_advantages = torch.zeros_like(rewards)
    groups: dict = {}
    for row, uid in enumerate(list(index)):
        groups.setdefault(uid, []).append(row)
    by_size: dict = {}
    for rows in groups.values():
        by_size.setdefault(len(rows), []).extend(rows)
    for size, rows in by_size.items():                # consecutive blocks of equal-size groups
        if size == 1:
            continue
        order = torch.tensor(rows, device=rewards.device)
        sentence_advantages[order] = group_sentence_advantages(rewards[order], counts[order], size, **options)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    token_advantages = torch.where(ids >= 0, sentence_advantages[rows, ids.clamp(min=0)], 0.0)
    token_advantages = token_advantages.to(token_level_rewards.dtype)
    return token_advantages, token_advantages


def sentence_token_rewards(sentence_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """verl's dense ``token_level_rewards`` from sentence rewards: ``rewards[b, s]`` (``[B, S]``) on the last token
    of sentence ``s`` of answer ``b`` (``sentence_ids`` ``[B, R]``, ``-1`` unscored); ``[B, R]`` float32, zero
    elsewhere. What a reward manager returns for the ``sentence_grpo`` estimator."""
    scored = sentence_ids >= 0
    positions = torch.arange(sentence_ids.shape[1], device=sentence_ids.device).expand_as(sentence_ids)
    num_slots = rewards.shape[1]
    last = torch.full((sentence_ids.shape[0] * num_slots,), -1, dtype=torch.long, device=sentence_ids.device)
    rows = torch.arange(sentence_ids.shape[0], device=sentence_ids.device).unsqueeze(1).expand_as(sentence_ids)
    flat = rows[scored] * num_slots + sentence_ids[scored]
    last = last.scatter_reduce(0, flat, positions[scored], reduce="amax")
    out = torch.zeros(sentence_ids.shape, dtype=torch.float32, device=sentence_ids.device)
    present = last >= 0
    slot = torch.arange(last.numel(), device=last.device)[present]
    out[slot // num_slots, last[present]] = rewards.reshape(-1)[present].float()
    return out


def sentence_reward_tensor(data, segmenter, sentence_reward) -> torch.Tensor:
    """A reward manager's work for ``sentence_grpo``: split each response of a verl ``DataProto`` into sentences,
    score them, and return the ``[B, R]`` float32 ``token_level_rewards`` (each sentence's reward on its last
    token). Also stores ``sentence_ids`` in ``data.batch`` so that the loss sees the same sentences.

    ``sentence_reward(questions, answers, references) -> [B, S_max]`` is the contract of
    :class:`~sgrpo_kernels.rewards.CompositeReward`: questions the decoded prompts, answers the sentence texts,
    references ``non_tensor_batch["reward_model"][i]["ground_truth"]`` when present.
    """
    fields = data.batch
    prompt_length = fields["prompts"].shape[-1]
    mask = fields["attention_mask"][:, prompt_length:].bool()
    segmentation = segmenter(fields["responses"], mask)
    tokenizer = segmenter.tokenizer
    questions = [tokenizer.decode(prompt[keep.bool()], skip_special_tokens=True)
                 for prompt, keep in zip(fields["prompts"], fields["attention_mask"][:, :prompt_length])]
    models = data.non_tensor_batch.get("reward_model")
    references = None if models is None else [model.get("ground_truth") for model in models]
    rewards = sentence_reward(questions, segmentation.texts, references)
    fields[SENTENCE_IDS] = segmentation.segment_ids.to(fields["responses"].device)
    return sentence_token_rewards(fields[SENTENCE_IDS], torch.as_tensor(rewards).to(fields["responses"].device))
