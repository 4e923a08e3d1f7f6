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
TRL's own normalisers), ``sapo`` and ``luspo``, with or without ``use_bias_correction_kl`` (our
``kl_importance_weighting``), the entropy bonus, the entropy mask and the off-policy mask (per sentence: TRL's at
``level="output"``); vLLM's importance-sampling correction is applied as TRL computes it
(``importance_sampling_ratio`` as ``is_weights``). Each loss type's normaliser is passed to the loss as its
``normalizer``. ``vespo`` weighs each sentence (TRL: each sequence, so ``level="output"`` reproduces it; it has
no token form and is refused at ``level="token"``), with vLLM's token ratios folded into its weight as TRL does.
TRL's adaptive entropy controller is refused with an error. Needs ``trl >= 1.0``.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from .. import levels
from ..advantages import group_sentence_advantages
from ..distributed import world_size
from ..loss import fused_linear_sentence_grpo_loss
from ..segmentation import Segmenter
from .hf import output_projection

# TRL loss_type -> (our objective, our reduction); the token sums are then renormalised as TRL does (_normalise)
LOSS_TYPES = {"grpo": ("ppo_clip", "sentence_mean"), "bnpo": ("ppo_clip", "token_mean"),
              "dr_grpo": ("ppo_clip", "token_mean"), "dapo": ("ppo_clip", "token_mean"),
              "cispo": ("cispo", "token_mean"), "sapo": ("sapo", "sentence_mean"),
              "luspo": ("ppo_clip", "answer_mean_token_sum"), "vespo": ("vespo", "token_mean")}


def _check_supported(args) -> None:
    """Refuse TRL options whose loss the fused loss does not compute, rather than silently ignoring them."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"SentenceGRPOTrainer supports loss_type in {tuple(LOSS_TYPES)}, got {args.loss_type!r}")
    option = lambda name, default: getattr(args, name, default)    # noqa: E731 (older TRL lacks some options)
    refused = []
    if option("use_adaptive_entropy", False):
        refused.append("use_adaptive_entropy (TRL's adaptive entropy controller)")
    if refused:
        raise ValueError("SentenceGRPOTrainer does not implement: " + "; ".join(refused))


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
    """

    def __init__(self, model, reward_funcs=None, args=None, *, sentence_reward=None, level: str = "sentence",
                 segmenter: Segmenter | None = None, ratio_level: str = levels.DEFAULT_SENTENCE_RATIO_LEVEL,
                 reference_column: str = "answer", chunk_size: int | None = None, **kwargs):
        levels.check_level(level, ratio_level)
        if level == "token" and getattr(args, "loss_type", None) == "vespo":
            raise ValueError("loss_type='vespo' weighs whole sequences in TRL (its gamma weight of the summed token "
                             "log-ratios) and has no token form: use level='output' (TRL's vespo) or 'sentence'")
        if level == "token" and getattr(args, "off_policy_mask_threshold", None) is not None:
            raise ValueError("off_policy_mask_threshold masks whole sentences here; at level='token' a sentence is a "
                             "token, not TRL's sequence: use level='output' (TRL's mask) or 'sentence'")
        if level == "sentence" and sentence_reward is None:
            raise ValueError("level='sentence' needs a sentence_reward (one score per sentence)")
        if reward_funcs is None and sentence_reward is None:
            raise ValueError("pass reward_funcs (one score per answer) or sentence_reward (one per sentence)")
        self.sentence_reward, self.level, self.ratio_level = sentence_reward, level, ratio_level
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
        output["segment_ids"] = torch.where(mask.bool(), segment_ids, -1)
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
        ratio_level = levels.loss_ratio_level(self.level, self.ratio_level)
        objective, reduction = LOSS_TYPES[self.loss_type]
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss, metrics = fused_linear_sentence_grpo_loss(
            hidden, weight, inputs["completion_ids"], inputs["segment_ids"], inputs["advantages"].detach(),
            inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            bias=bias, eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta,
            delta=self.args.delta, temperature=self.temperature, ratio_level=ratio_level, reduction=reduction,
            objective=objective, sapo_tau_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_tau_neg=getattr(self.args, "sapo_temperature_neg", 1.05), **self._vespo_options(),
            kl_importance_weighting=self.beta != 0.0 and getattr(self.args, "use_bias_correction_kl", False),
            is_weights=self._rollout_weights(inputs), sampling_logps=inputs.get("sampling_per_token_logps"),
            top_entropy_quantile=getattr(self.args, "top_entropy_quantile", 1.0),
            off_policy_mask_threshold=getattr(self.args, "off_policy_mask_threshold", None),
            # TRL scales its entropy bonus by the accumulation steps only, never by the loss type's normaliser
            entropy_coef=getattr(self.args, "entropy_coef", 0.0) / accumulation,
            normalizer=self._normalizer(inputs, mode, accumulation), chunk_size=self.chunk_size,
            return_metrics=True)
        for name in ("clip_fraction", "ratio_mean", "kl_mean", "entropy_mean"):
            if name in metrics:
                self._metrics[mode][f"sentence/{name}"].append(
                    self.accelerator.gather(metrics[name].float().reshape(1)).mean().item())
        return loss

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
