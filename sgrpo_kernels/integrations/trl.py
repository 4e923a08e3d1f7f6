"""Sentence-level GRPO inside Hugging Face TRL: a ``GRPOTrainer`` subclass with the fused hidden-state loss.

    trainer = SentenceGRPOTrainer(model, args=GRPOConfig(...), train_dataset=dataset, processing_class=tokenizer,
                                  sentence_reward=CompositeReward({...}, {...}))      # level="sentence"
    trainer.train()

What changes against TRL's ``GRPOTrainer``:

- each completion is split into sentences by a :class:`~sgrpo_kernels.Segmenter`; ``sentence_reward`` (one
  score per sentence) replaces the per-answer reward functions, and the advantages are group-normalised per
  sentence (``group_sentence_advantages``, across processes when the groups are); TRL still logs the mean
  sentence reward of each answer as its reward;
- the loss is :func:`~sgrpo_kernels.fused_linear_sentence_grpo_loss` on the final hidden states and the LM head,
  never the full logits.

With ``level="token"`` or ``"output"`` and TRL's own ``reward_funcs``, the loss reproduces TRL's numbers for
``importance_sampling_level="token"`` or ``"sequence"`` and ``loss_type`` in ``grpo`` (our
``reduction="sentence_mean"``), ``bnpo`` (``"token_mean"``), ``dr_grpo``, ``dapo`` and ``cispo`` (token sums over
TRL's own normalisers), ``sapo``, ``luspo`` and ``vespo``, with or without ``use_bias_correction_kl`` (our
``kl_importance_weighting``), the entropy bonus, the entropy mask and the off-policy mask; vLLM's
importance-sampling correction is applied as TRL computes it (``importance_sampling_ratio`` as ``is_weights``). Each
loss type's normaliser is passed to the loss as its ``normalizer``. Two of TRL's quantities are per sequence at
every ``importance_sampling_level``. The off-policy mask (DeepSeek-V3.2's) is the loss's own per sentence, TRL's at
``level="output"``; at ``level="token"`` the trainer computes TRL's sequence mask itself (TRL's
``get_off_policy_mask``) and passes it in ``is_weights``, which weigh the policy term and not the KL term, as TRL's
mask. ``vespo`` weighs each sentence with the gamma weight of its summed token log-ratios (TRL: each sequence, so
``level="output"`` reproduces it), with vLLM's token ratios folded into its weight as TRL does; at ``level="token"``
the loss's segments are then whole answers, as at ``"output"`` (its ``sentence/*`` metrics count answers), and with
``use_bias_correction_kl`` TRL's KL term weighted by each token's own ratio is a second call of the loss over
one-token segments with zero advantages (one more pass over the LM head, with gradients).

As a drop-in it logs what TRL's ``_compute_loss`` logs, into the same train/eval metric dicts (averaged over the
logging steps by TRL's ``log``, gathered across processes as TRL gathers them): ``entropy``, ``kl`` (``beta > 0``),
``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``,
``luspo``), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, and with an entropy bonus ``policy_loss`` and
``entropy_coef``; besides them its own ``sentence/*`` keys (the loss's metrics). The clip ratios are taken at the
level that is trained: at ``level="token"`` and ``"output"`` they equal TRL's for ``importance_sampling_level``
``"token"`` and ``"sequence"`` (each token, resp. each answer, weighs one); at ``level="sentence"`` TRL's token
formulas are applied to each token's sentence (a sentence is clipped or not as a whole and weighs its token
count; ``low_min``/``high_max`` take each answer's share of clipped tokens). TRL's adaptive entropy controller
(``use_adaptive_entropy``, Skywork-OR1) runs at every level with TRL's state, update rule and checkpointing.
These metrics and the controller read each token's log-prob and entropy from the loss itself
(``return_token_scores=True``: what its own pass over the LM head computed), so they cost no second pass; only TRL's
off-policy sequence mask at ``level="token"``, which weighs the loss's tokens by the current log-probs before the loss
runs, takes them from one more no-grad pass (chunked, like the loss: no ``[tokens, vocab]`` logits).
``trl_metrics=False`` leaves out TRL's keys. Needs ``trl >= 1.0``.
"""

from __future__ import annotations

import math

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from .. import levels
from ..advantages import group_sentence_advantages
from ..config import LossConfig
from ..distributed import world_size
from ..loss import fused_linear_sentence_grpo_loss, fused_linear_token_logprobs
from ..segmentation import Segmenter
from .hf import output_projection

# TRL loss_type -> (our objective, our reduction); the token sums are then renormalised as TRL does (_normalise)
LOSS_TYPES = {"grpo": ("ppo_clip", "sentence_mean"), "bnpo": ("ppo_clip", "token_mean"),
              "dr_grpo": ("ppo_clip", "token_mean"), "dapo": ("ppo_clip", "token_mean"),
              "cispo": ("cispo", "token_mean"), "sapo": ("sapo", "sentence_mean"),
              "luspo": ("ppo_clip", "answer_mean_token_sum"), "vespo": ("vespo", "token_mean")}
CLAMP_LOG_RATIO = LossConfig().clamp_log_ratio      # the loss's clamp of a unit's log-ratio, as in the metrics

# TRL's own message (GRPOTrainer.__init__, trl 1.16) when it is given neither reward_funcs nor an environment
NO_REWARD_SOURCE = ("No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose environment "
                    "defines a `get_reward` method.")


def _check_supported(args) -> None:
    """Refuse TRL options whose loss the fused loss does not compute, rather than silently ignoring them."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"SentenceGRPOTrainer supports loss_type in {tuple(LOSS_TYPES)}, got {args.loss_type!r}")


def _process_group():
    """The default group when several processes train together, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = torch.distributed.group.WORLD
        return group if world_size(group) > 1 else None
    return None


def _question_text(prompt) -> str:
    """A plain-text prompt, or the last user message of a conversational one."""
    if isinstance(prompt, str):
        return prompt
    users = [message["content"] for message in prompt if message.get("role") == "user"]
    return users[-1] if users else str(prompt)


class SentenceGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with sentence-level rewards, advantages and ratios, and the fused linear loss.

    Args (besides ``GRPOTrainer``'s):
        sentence_reward: a ``CompositeReward`` (or any ``(questions, answers, references) -> list[list[float]]``)
            scoring each sentence; required for ``level="sentence"``, optional otherwise.
        level: ``"sentence"``, ``"token"`` (each token its own segment) or ``"output"`` (one segment per answer);
            see :mod:`sgrpo_kernels.levels`.
        segmenter: how completions become sentences (default: ``Segmenter(processing_class, "sentence")``).
        ratio_level: ``"mean"`` (default, :data:`~sgrpo_kernels.levels.DEFAULT_SENTENCE_RATIO_LEVEL`) or ``"sum"``
            of a sentence's token log-ratios (``level="sentence"`` only; token level uses ``"sum"`` and output
            level ``"mean"``, as TRL's token and sequence importance sampling).
        reference_column: the dataset column handed to ``sentence_reward`` as the reference answer.
        chunk_size: tokens per chunk of logits in the fused loss (``None``: chosen from free memory).
        trl_metrics: log TRL's loss metrics (``entropy``, ``kl``, ``clip_ratio/*``, ...; see the module's
            docstring), read from the loss's own pass over the LM head; ``False`` logs only the ``sentence/*`` keys
            (and ``entropy_coef``).

    TRL's errors are raised where TRL raises them, with TRL's text (no reward source: before the model loads).
    """

    def __init__(self, model, reward_funcs=None, args=None, *, sentence_reward=None, level: str = "sentence",
                 segmenter: Segmenter | None = None, ratio_level: str = levels.DEFAULT_SENTENCE_RATIO_LEVEL,
                 reference_column: str = "answer", chunk_size: int | None = None, trl_metrics: bool = True,
                 **kwargs):
        levels.check_level(level, ratio_level)
        if not isinstance(trl_metrics, bool):
            raise TypeError(f"trl_metrics must be a bool, got {type(trl_metrics).__name__}")
        if (reward_funcs is None or isinstance(reward_funcs, list) and not reward_funcs) and sentence_reward is None \
                and kwargs.get("environment_factory") is None:
            # TRL's check (TRL decides itself whether an environment_factory's environments reward)
            hint = "" if level != "sentence" else " (level='sentence' needs a sentence_reward: one score per sentence)"
            raise ValueError(NO_REWARD_SOURCE + hint)
        if level == "sentence" and sentence_reward is None:
            raise ValueError("level='sentence' needs a sentence_reward (one score per sentence)")
        if sentence_reward is not None and reward_funcs not in (None, []):
            raise ValueError("pass reward_funcs or sentence_reward, not both: with a sentence_reward the answer's "
                             "reward is the mean of its sentence rewards, so reward_funcs would be ignored; add an "
                             "answer-level score to the CompositeReward as one more term instead")
        self.sentence_reward, self.level, self.ratio_level = sentence_reward, level, ratio_level
        self.trl_metrics = trl_metrics
        self.reference_column, self.chunk_size = reference_column, chunk_size
        self._scored, self._head_checked = None, False
        if sentence_reward is not None:
            reward_funcs = [self._mean_sentence_reward]
        if args is not None:            # before TRL loads anything; TRL's default GRPOConfig is supported
            _check_supported(args)
        super().__init__(model, reward_funcs, args, **kwargs)
        self.segmenter = segmenter or Segmenter(self.processing_class, "sentence")
        self.loss_segmenter = levels.loss_segmenter(self.processing_class, level)

    # -- rewards ------------------------------------------------------------------------------------------------
    def _mean_sentence_reward(self, prompts, completions, completion_ids, **columns):
        """TRL calls this as a reward function: score every sentence, keep the scores, return each answer's mean."""
        ids, mask = self._pad(completion_ids)
        segmentation = self.segmenter(ids, mask)
        references = columns.get(self.reference_column)
        rewards = self.sentence_reward([_question_text(prompt) for prompt in prompts], segmentation.texts, references)
        if not isinstance(rewards, torch.Tensor):       # a plain callable: pad its lists
            rows = max((len(row) for row in rewards), default=0)
            rewards = torch.tensor([list(row) + [0.0] * (rows - len(row)) for row in rewards], dtype=torch.float32)
        self._scored = (segmentation, rewards)
        return levels.mean_sentence_reward(rewards, segmentation.num_sentences).tolist()
    _mean_sentence_reward.__name__ = "sentence_reward_mean"

    def _pad(self, completion_ids: list) -> tuple[torch.Tensor, torch.Tensor]:
        width = max((len(row) for row in completion_ids), default=0)
        pad = self.processing_class.pad_token_id or 0
        ids = torch.full((len(completion_ids), width), pad, dtype=torch.long)
        mask = torch.zeros(len(completion_ids), width, dtype=torch.long)
        for row, tokens in enumerate(completion_ids):
            ids[row, :len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return ids, mask

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        completion_ids, mask = output["completion_ids"], output["completion_mask"]
        scored = mask if output.get("tool_mask") is None else mask * output["tool_mask"]     # TRL's loss mask
        device = completion_ids.device
        if levels.advantages_per_sentence(self.level):
            segmentation, rewards = self._scored
            self._scored = None
            advantages = group_sentence_advantages(rewards.to(device), segmentation.num_sentences.to(device),
                                                   self.num_generations, process_group=_process_group())
            segment_ids = torch.full_like(completion_ids, -1)
            width = min(segmentation.segment_ids.shape[1], completion_ids.shape[1])
            segment_ids[:, :width] = segmentation.segment_ids[:, :width].to(device)
            output["advantages"] = advantages
        else:
            segment_ids = self.loss_segmenter(completion_ids.cpu(), mask.cpu()).segment_ids.to(device)
        output["segment_ids"] = torch.where(scored.bool(), segment_ids, -1)
        return output

    # -- loss -------------------------------------------------------------------------------------------------
    def _completion_hidden(self, model, inputs):
        """Final hidden states of the completion positions, through the (possibly wrapped) model's forward so
        that DDP/FSDP see it; only one position of logits is computed."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)
        last = outputs.hidden_states[-1]
        if not self._head_checked:      # the last hidden state must be what the LM head reads, for this model
            weight, bias = output_projection(self.accelerator.unwrap_model(model))
            with torch.no_grad():
                expected = (last[:, -1] @ weight.T + (0 if bias is None else bias)).float()
                logits = outputs.logits[:, -1].float()
                # a wrong hidden state (e.g. before the final norm) is off by O(1); bf16 rounding by ~1%
                low_precision = (outputs.logits.dtype in (torch.bfloat16, torch.float16)    # accelerate's autocast
                                 or self.accelerator.mixed_precision in ("bf16", "fp16"))   # returns fp32 logits
                tolerance = 3e-2 if low_precision else 1e-3
                if (expected - logits).abs().max() > tolerance * (1 + logits.abs().max()):
                    raise NotImplementedError(f"{type(model).__name__}: hidden_states[-1] is not the input of its "
                                              "LM head, so the fused linear loss cannot be used with it")
            self._head_checked = True
        length = inputs["completion_ids"].shape[1]
        return last[:, -length - 1:-1]

    def _compute_loss(self, model, inputs):
        hidden = self._completion_hidden(model, inputs)
        weight, bias = output_projection(self.accelerator.unwrap_model(model))
        segment_ids, ratio_level = self._loss_segments(inputs)
        objective, reduction = LOSS_TYPES[self.loss_type]
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        adaptive = getattr(self, "use_adaptive_entropy", False)
        scores = None
        if self._masks_sequences_by_weight():
            # TRL's off-policy sequence mask at level="token" weighs the loss's tokens by the current log-probs, so
            # it needs them before the loss: the one configuration with a second, no-grad pass over the LM head
            # (chunked, never [N, V] at once)
            with torch.no_grad():
                scores = fused_linear_token_logprobs(
                    hidden.detach(), weight.detach(), inputs["completion_ids"],
                    bias=None if bias is None else bias.detach(), temperature=self.temperature, return_entropy=True,
                    chunk_size=self.chunk_size)
        # TRL's metrics and its entropy controller read each token's log-prob and entropy: the loss hands back the
        # ones its own pass over the LM head computed (detached, 0 at unscored positions), no second pass
        token_scores = scores is None and (self.trl_metrics or (adaptive and mode == "train"))
        entropy_coef = self._applied_entropy_coef()
        normalizer = self._normalizer(inputs, mode, accumulation)
        kl_weighting = self.beta != 0.0 and getattr(self.args, "use_bias_correction_kl", False)
        kl_apart = kl_weighting and self._vespo_over_answers()
        beta = 0.0 if kl_apart else self.beta
        threshold = getattr(self.args, "off_policy_mask_threshold", None)
        loss = fused_linear_sentence_grpo_loss(
            hidden, weight, inputs["completion_ids"], segment_ids, inputs["advantages"].detach(),
            inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps") if beta != 0.0 else None,
            bias=bias, eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=beta,
            delta=self.args.delta, temperature=self.temperature, ratio_level=ratio_level, reduction=reduction,
            objective=objective, sapo_tau_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_tau_neg=getattr(self.args, "sapo_temperature_neg", 1.05), **self._vespo_options(),
            kl_importance_weighting=kl_weighting and not kl_apart,
            is_weights=self._policy_weights(inputs, None if scores is None else scores[0]),
            sampling_logps=inputs.get("sampling_per_token_logps"),
            top_entropy_quantile=getattr(self.args, "top_entropy_quantile", 1.0),
            off_policy_mask_threshold=None if self._masks_sequences_by_weight() else threshold,
            # TRL scales its entropy bonus by the accumulation steps only, never by the loss type's normaliser
            entropy_coef=entropy_coef / accumulation,
            normalizer=normalizer, chunk_size=self.chunk_size, return_metrics=True, return_token_scores=token_scores)
        if token_scores:
            loss, metrics, scores = loss
        else:
            loss, metrics = loss
        if kl_apart:
            kl_loss, kl_metrics = self._token_ratio_kl(hidden, weight, bias, inputs, normalizer)
            loss, metrics["kl_mean"] = loss + kl_loss, kl_metrics["kl_mean"]
        if self._entropy_bonus_on():
            self._entropy_step(loss.detach(), scores, inputs, mode, entropy_coef, accumulation)
        if self.trl_metrics:
            self._log_trl_metrics(inputs, *scores, mode)
        for name in ("clip_fraction", "ratio_mean", "kl_mean", "entropy_mean"):
            if name in metrics:
                self._metrics[mode][f"sentence/{name}"].append(
                    self.accelerator.gather(metrics[name].float().reshape(1)).mean().item())
        return loss

    # -- the loss's segments and weights at the token level --------------------------------------------------------
    def _vespo_over_answers(self) -> bool:
        """Whether ``vespo`` runs at ``level="token"``: TRL's gamma weight is per sequence at every
        ``importance_sampling_level`` (the token ratio enters only its bias-corrected KL term), so the loss's
        segments are then whole answers, as at ``level="output"``."""
        return self.level == "token" and self.loss_type == "vespo"

    def _masks_sequences_by_weight(self) -> bool:
        """Whether TRL's off-policy sequence mask goes to the loss as ``is_weights``: at ``level="token"`` (but for
        ``vespo``) the loss's segments are tokens, and its own mask, per segment, would drop single tokens."""
        return (getattr(self.args, "off_policy_mask_threshold", None) is not None and self.level == "token"
                and not self._vespo_over_answers())

    def _loss_segments(self, inputs) -> tuple[torch.Tensor, str]:
        """The loss's ``segment_ids [B, T]`` (int, ``-1`` unscored) and ``ratio_level``: the trained level's, but
        one segment per scored answer for :meth:`_vespo_over_answers` (``inputs["segment_ids"]`` stays per token
        for TRL's token-level metrics)."""
        segment_ids = inputs["segment_ids"]
        if self._vespo_over_answers():
            return torch.where(segment_ids >= 0, 0, -1), levels.loss_ratio_level("output")
        return segment_ids, levels.loss_ratio_level(self.level, self.ratio_level)

    def _policy_weights(self, inputs, logps: torch.Tensor | None) -> torch.Tensor | None:
        """The loss's ``is_weights`` (constant; ``[B]`` or ``[B, T]`` float, or ``None``): TRL's vLLM ratio
        (:meth:`_rollout_weights`) times, with :meth:`_masks_sequences_by_weight`, TRL's off-policy sequence mask
        (its own ``get_off_policy_mask``: 0 on the tokens of a negative-advantage answer whose mean
        ``log π_sampling − log π`` exceeds the threshold) from this policy's ``logps [B, T]`` (no grad). Like
        TRL's mask, the weights leave the KL term alone."""
        weights = self._rollout_weights(inputs)
        if not self._masks_sequences_by_weight():
            return weights
        behaviour = inputs.get("sampling_per_token_logps")
        if behaviour is None:
            behaviour = logps if inputs.get("old_per_token_logps") is None else inputs["old_per_token_logps"]
        scored = (inputs["segment_ids"] >= 0).to(logps.dtype)
        keep = GRPOTrainer.get_off_policy_mask(inputs["advantages"][:, None], logps, behaviour, scored,
                                               self.args.off_policy_mask_threshold).squeeze(1)      # [B]
        if weights is None:
            return keep
        return weights * (keep if weights.dim() == 1 else keep[:, None])

    def _token_ratio_kl(self, hidden, weight, bias, inputs, normalizer):
        """TRL's bias-corrected KL term at ``importance_sampling_level="token"`` (each token's k3 times its own
        ratio, summed and divided by ``normalizer``) for :meth:`_vespo_over_answers`, whose loss weighs whole
        answers: the loss over one-token segments with zero advantages, which have no policy term. One more pass
        over the LM head, with gradients. Returns ``(loss, metrics)`` as the fused loss does."""
        return fused_linear_sentence_grpo_loss(
            hidden, weight, inputs["completion_ids"], inputs["segment_ids"], torch.zeros_like(inputs["advantages"]),
            inputs.get("old_per_token_logps"), inputs["ref_per_token_logps"], bias=bias, beta=self.beta,
            temperature=self.temperature, ratio_level="sum", reduction="token_mean", kl_importance_weighting=True,
            normalizer=normalizer, chunk_size=self.chunk_size, return_metrics=True)

    # -- entropy bonus and TRL's adaptive controller ------------------------------------------------------------
    def _entropy_bonus_on(self) -> bool:
        """TRL's ``_entropy_bonus_enabled``: a nonzero coefficient, or the adaptive controller (which may have
        brought it to ``entropy_coef_min`` and must be able to raise it again)."""
        return getattr(self, "entropy_coef", 0.0) != 0.0 or getattr(self, "use_adaptive_entropy", False)

    def _applied_entropy_coef(self) -> float:
        """The coefficient of this micro-batch's entropy bonus, as TRL applies it: the controller's coefficient
        from the end of the previous optimizer step, and only while the entropy measured then was at or below
        ``entropy_target`` (none in the first window: TRL starts from an infinite entropy)."""
        coef = getattr(self, "entropy_coef", 0.0)
        if getattr(self, "use_adaptive_entropy", False):
            return coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return coef

    def _bonus_mask(self, inputs, entropies: torch.Tensor) -> torch.Tensor:
        """The tokens the entropy bonus acts on (TRL's ``effective_mask``): the scored tokens, restricted to the
        top-entropy ones (TRL's own quantile, over every process) with ``top_entropy_quantile < 1``."""
        mask = (inputs["segment_ids"] >= 0).float()
        quantile = getattr(self.args, "top_entropy_quantile", 1.0)
        if quantile < 1.0:
            mask = mask * self.get_high_entropy_mask(entropies, mask, 1 - quantile)
        return mask

    def _entropy_step(self, loss, scores, inputs, mode: str, applied: float, accumulation: int) -> None:
        """TRL's bookkeeping of the entropy bonus: log ``policy_loss`` (the loss without the bonus, before the
        accumulation scaling, as TRL reports it), run the adaptive controller at each optimizer-step boundary
        (train only) and log ``entropy_coef`` there."""
        entropies = None if scores is None else scores[1]
        mask = None if entropies is None else self._bonus_mask(inputs, entropies)
        if self.trl_metrics:
            bonus = applied / accumulation * (entropies * mask).sum() / mask.sum().clamp(min=1.0)
            policy_loss = loss + bonus
            if self.loss_type not in ("dapo", "cispo", "vespo"):
                policy_loss = policy_loss * accumulation    # TRL logs these before dividing by the accumulation
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if getattr(self, "use_adaptive_entropy", False) and mode == "train":
            stats = torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None else \
                self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:      # the window's entropy, over every process: the next coef
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                            self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                            self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    # -- TRL's metrics at the trained level ---------------------------------------------------------------------
    def _per_unit(self, values: torch.Tensor, segment_ids: torch.Tensor, mean: bool,
                  answers: bool | None = None) -> torch.Tensor:
        """The sum (or mean) of ``values [B, T]`` over each unit whose ratio the loss takes: ``[B, 1]`` with
        ``answers`` (default: at the output level; one per answer, TRL's sequence-level shape), else ``[B, T]``
        with each token holding its sentence's (at the token level, its own value)."""
        scored = segment_ids >= 0
        values = torch.where(scored, values, 0.0)
        if answers is None:
            answers = self.level == "output"
        if answers:
            total = values.sum(-1, keepdim=True)
            return total / scored.sum(-1, keepdim=True).clamp(min=1) if mean else total
        rows, slots = segment_ids.shape[0], int(segment_ids.max().clamp(min=0).item()) + 1
        index = (torch.where(scored, segment_ids, 0)
                 + slots * torch.arange(rows, device=values.device)[:, None]).reshape(-1)
        sums = values.new_zeros(rows * slots).index_add_(0, index, values.reshape(-1))
        if mean:
            counts = values.new_zeros(rows * slots).index_add_(0, index, scored.reshape(-1).to(values.dtype))
            sums = sums / counts.clamp(min=1)
        return sums[index].view_as(values)

    def _unit_advantages(self, advantages: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """Each unit's advantage in the shape of :meth:`_per_unit`'s results."""
        if advantages.dim() == 1:
            return advantages[:, None]
        return advantages.gather(1, segment_ids.clamp(min=0))      # [B, S_max] (sentence level) -> [B, T]

    def _log_trl_metrics(self, inputs, logps: torch.Tensor, entropies: torch.Tensor, mode: str) -> None:
        """TRL's ``_compute_loss`` metrics (``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``,
        ``vespo/phi_seq_mean``) with TRL's formulas, applied to the units the loss trains.

        TRL's token-level formulas (a mean over tokens, summed and counted over every process) where a unit is a
        token or a sentence: a sentence's clip indicator (or gamma weight) is given to each of its tokens, so a
        sentence weighs its token count and ``clip_ratio/low_min``/``high_max`` take each answer's share of
        clipped tokens; at ``level="output"`` TRL's sequence-level formulas (each answer weighs one). ``kl`` and
        ``entropy`` are always means over tokens. Equal to TRL's at ``level="token"``/``"output"`` against
        ``importance_sampling_level="token"``/``"sequence"``.
        """
        segment_ids = inputs["segment_ids"]
        mask = (segment_ids >= 0).to(logps.dtype)
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps if old is None else old)
        ratio_mean = levels.loss_ratio_level(self.level, self.ratio_level) == "mean"
        coef = torch.exp(self._per_unit(log_ratio, segment_ids, ratio_mean).clamp(-CLAMP_LOG_RATIO, CLAMP_LOG_RATIO))
        advantages = self._unit_advantages(inputs["advantages"], segment_ids)

        def global_masked_mean(x):          # TRL's: a unit per answer counts every answer, else the scored tokens
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):             # TRL's: each answer's value (NaN for an answer without tokens)
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            if getattr(self.args, "use_bias_correction_kl", False):
                per_token_kl = per_token_kl * coef
            metrics["kl"].append(global_masked_mean(per_token_kl))
        metrics["entropy"].append(global_masked_mean(entropies))
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((coef < 1 - self.epsilon_low) & (advantages < 0)).to(logps.dtype)
            high = ((coef > 1 + self.epsilon_high) & (advantages > 0)).to(logps.dtype)
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((coef > self.epsilon_high) & (advantages > 0)).to(logps.dtype)
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped))
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(self._gamma_weights(inputs, log_ratio,
                                                                                        advantages)))

    def _gamma_weights(self, inputs, log_ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """VESPO's gamma weight per unit, as TRL's ``get_gamma_weights`` computes it per sequence: ``log w`` the
        sum of the token log-ratios (each clamped to ±20) and of the rollout log-weights, clamped to
        ``[log 1e-8, 20]``. A unit is a sentence at the sentence level, else an answer (``[B, 1]``, TRL's)."""
        segment_ids, answers = inputs["segment_ids"], self.level != "sentence"
        log_w = self._per_unit(log_ratio.clamp(-20.0, 20.0), segment_ids, mean=False, answers=answers)
        rollout = inputs.get("importance_sampling_ratio")
        if rollout is not None:
            log_w = log_w + self._per_unit(torch.log(rollout).clamp(math.log(1e-8), 20.0).expand_as(log_ratio),
                                           segment_ids, mean=False, answers=answers)
        log_w = log_w.clamp(math.log(1e-8), 20.0)
        options = self._vespo_options()
        nonnegative = advantages >= 0
        k = torch.where(nonnegative, options["vespo_k_pos"], options["vespo_k_neg"])
        lam = torch.where(nonnegative, options["vespo_lambda_pos"], options["vespo_lambda_neg"])
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def _vespo_options(self) -> dict:
        """TRL's gamma-weight parameters (its λ are floored at 1e-4, as TRL does)."""
        if self.loss_type != "vespo":
            return {}
        return dict(vespo_k_pos=self.args.vespo_k_pos, vespo_k_neg=self.args.vespo_k_neg,
                    vespo_lambda_pos=max(self.args.vespo_lambda_pos, 1e-4),
                    vespo_lambda_neg=max(self.args.vespo_lambda_neg, 1e-4))

    def _rollout_weights(self, inputs) -> torch.Tensor | None:
        """TRL's vLLM importance-sampling ratio (its ``vllm_importance_sampling_mode``, computed by TRL from the
        rollout engine's log-probs): ``[B, T]`` for token modes, ``[B]`` for sequence modes; ``None`` without it."""
        if not (getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False)):
            return None
        ratio = inputs["importance_sampling_ratio"].detach()
        return ratio.squeeze(1) if ratio.dim() == 2 and ratio.shape[1] == 1 else ratio

    def _normalizer(self, inputs, mode: str, accumulation: int):
        """The denominator TRL divides each loss type's summed loss by (our reductions' ``normalizer``)."""
        rows = inputs["segment_ids"].shape[0]
        if self.loss_type in ("grpo", "sapo", "luspo"):    # the mean over the B answers, per accumulation step
            return rows * accumulation
        if self.loss_type == "bnpo":                       # the micro-batch's tokens
            return (inputs["segment_ids"] >= 0).sum().clamp(min=1) * accumulation
        if self.loss_type == "dr_grpo":
            return rows * self.max_completion_length * accumulation
        # dapo, cispo, vespo: the whole generation batch's token count, as TRL computes it
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * accumulation / self.args.steps_per_generation
        return normaliser
