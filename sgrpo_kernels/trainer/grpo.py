"""A small, readable GRPO loop on top of the fused sentence-level loss.

One step: sample ``G`` answers for each of ``P`` prompts; split them into sentences; reward every sentence
(correctness, logic, format); normalise within each group; record the log-probs of the sampling policy (and of
a frozen reference when ``beta > 0``) with the fused no-grad path; then ``mu`` updates of the fused
hidden-state loss with AdamW, gradient clipping and a warm-up/decay schedule (each of the ``mu`` updates on the
whole batch: GRPO's μ, TRL's ``num_iterations``).

Two axes say what the policy is taught at which scale: ``credit`` (``"sentence"``: each sentence its own
group-relative advantage; ``"answer"``: one advantage per answer, from the mean of its sentence rewards) and
``ratio`` (the segment whose importance ratio is clipped: each ``"token"``, each ``"sentence"`` or the whole
``"output"``, GSPO's length-normalised ratio). ``credit="sentence", ratio="token"`` gives every token its
sentence's advantage (DeepSeekMath's process supervision). ``level`` is the shorthand of
:mod:`sgrpo_kernels.levels`: ``"token"`` = (answer, token), ``"sentence"`` = (sentence, sentence), ``"output"`` =
(answer, output).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from .. import levels
from ..advantages import group_sentence_advantages
from ..choices import ADVANTAGE_BASELINES, ADVANTAGES, CREDITS, LEVEL_AXES, RATIOS
from ..integrations.hf import completion_hidden_states
from ..loss import fused_linear_sentence_grpo_loss, fused_linear_token_logprobs
from ..models import save_pretrained
from ..segmentation import Segmenter
from .common import (
    MetricsLog,
    decode_completions,
    evaluate_accuracy,
    generate,
    sample_held_out,
    warmup_then_linear_decay,
)


@dataclass
class GRPOLoopConfig:
    """Options of :class:`GRPOLoop`; ``level`` and ``ratio_level`` (the sentence level's) as in
    :mod:`sgrpo_kernels.levels`. ``credit`` and ``ratio`` (module docstring), when given, replace the pair that
    ``level`` stands for; after construction both hold the pair in use."""

    level: str = "sentence"
    credit: str | None = None
    ratio: str | None = None
    ratio_level: str = levels.DEFAULT_SENTENCE_RATIO_LEVEL
    # sentence level: each sentence its normalised reward ("sentence"), the sum of those from it to the answer's
    # end ("cumulative", reward-to-go), or its answer's normalised mean reward ("broadcast": the sentence loss and
    # ratios with output-level credit, which separates credit assignment from the token weighting)
    advantage: str = "sentence"
    # sentence level, advantage="sentence": weight of the answer-level advantage fused into each sentence's,
    # (1 - a) * A_sentence + a * A_answer (the seed's multi-scale credit; 0 is pure sentence credit, 1 broadcast)
    answer_mix: float = 0.0
    # sentence credit: "pooled" (one baseline over the group's sentences, the seed) or "split_final" (each answer's
    # last sentence normalised among the group's last sentences: no systematic negative credit for stopping)
    baseline: str = "pooled"
    output_ratio_level: str = "mean"  # output level: GSPO's length-normalised ratio, or "sum" (the product)
    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    mu: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    scale: str = "std"                # group normalisation: "std" (GRPO) or "none" (only the mean, Dr. GRPO)
    lr: float = 5e-4
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 64
    eval_every: int = 20
    # further steps at which to evaluate (step 0, every eval_every-th step and the last are evaluated anyway)
    eval_steps: tuple[int, ...] = ()
    # held-out evaluation: greedy accuracy, and with eval_samples = k > 0 the accuracy of k answers per problem
    # sampled at temperature 1 (the same sampling seed at every evaluation of every run: paired across runs)
    eval_greedy: bool = True
    eval_samples: int = 0
    save_every: int = 0
    seed: int = 0

    def __post_init__(self):
        levels.check_level(self.level, self.ratio_level)
        levels.check_level("output", self.output_ratio_level)
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {', '.join(map(repr, ADVANTAGES))}, got {self.advantage!r}")
        if self.advantage != "sentence" and self.level != "sentence":
            raise ValueError(f"advantage={self.advantage!r} is a sentence-level variant; level is {self.level!r}")
        for name, value, choices in (("credit", self.credit, CREDITS), ("ratio", self.ratio, RATIOS)):
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        level_credit, level_ratio = LEVEL_AXES[self.level]
        if self.advantage == "broadcast":
            if self.credit == "sentence":
                raise ValueError("advantage='broadcast' gives every sentence its answer's advantage: it is "
                                 "credit='answer', not credit='sentence'")
            level_credit = "answer"
        self.credit, self.ratio = self.credit or level_credit, self.ratio or level_ratio
        if (self.credit, self.ratio) == ("sentence", "output"):
            raise ValueError("credit='sentence' needs a ratio segment no longer than a sentence (ratio='token' or "
                             "'sentence'): one ratio over the whole output cannot carry several advantages")
        if self.advantage == "cumulative" and self.credit != "sentence":
            raise ValueError("advantage='cumulative' sums sentence advantages: it needs credit='sentence'")
        if not 0.0 <= self.answer_mix <= 1.0:
            raise ValueError(f"answer_mix must lie in [0, 1], got {self.answer_mix}")
        if self.baseline not in ADVANTAGE_BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(map(repr, ADVANTAGE_BASELINES))}, "
                             f"got {self.baseline!r}")
        if self.baseline != "pooled" and self.credit != "sentence":
            raise ValueError(f"baseline={self.baseline!r} splits the sentence baseline: it needs credit='sentence'")
        if self.answer_mix and (self.credit != "sentence" or self.advantage != "sentence"):
            raise ValueError(f"answer_mix mixes per-sentence advantages (credit='sentence', advantage='sentence'); "
                             f"got credit={self.credit!r}, advantage={self.advantage!r}")
        for name in ("steps", "prompts_per_step", "group_size", "mu", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}")
        if not self.eval_greedy and not self.eval_samples:
            raise ValueError("an evaluation needs eval_greedy=True or eval_samples > 0")
        self.eval_steps = tuple(sorted(set(self.eval_steps)))
        if any(step < 1 or step > self.steps for step in self.eval_steps):
            raise ValueError(f"eval_steps must lie in [1, steps={self.steps}], got {list(self.eval_steps)}")

    @property
    def loss_ratio_level(self) -> str:
        """The loss's ``ratio_level`` for :attr:`ratio`: the sum over a one-token segment, the sentence level's
        choice, or the output level's (GSPO's mean unless ``output_ratio_level="sum"``)."""
        return {"token": "sum", "sentence": self.ratio_level, "output": self.output_ratio_level}[self.ratio]


class GRPOLoop:
    """GRPO on a Hugging Face causal LM with sentence-level credit assignment.

    Args:
        model, tokenizer: the policy (any causal LM whose head is a plain linear layer) and its tokenizer.
        train, held_out: lists of problems (``.question``, ``.answer``); ``is_correct(text, answer)`` judges one.
        reward: a ``CompositeReward`` over sentences. config: :class:`GRPOLoopConfig`. output_dir: where
        ``metrics.jsonl``, plots and checkpoints go. resume_from: a checkpoint folder written by :meth:`save`.
        eval_extra: ``eval_extra(questions, sentences) -> dict`` of more numbers to log from the sampled held-out
        answers (``sentences[k]``: the sentence texts of answer ``k``; ``eval_samples`` answers per question),
        e.g. a task's per-step error rates.
    """

    def __init__(self, model, tokenizer, train, held_out, is_correct, reward, config: GRPOLoopConfig, output_dir: str,
                 resume_from: str | None = None, eval_extra=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train_set, self.held_out, self.is_correct, self.reward = train, held_out, is_correct, reward
        self.output_dir, self.eval_extra = output_dir, eval_extra
        self.sentences = Segmenter(tokenizer, "sentence")
        self.loss_segmenter = None if config.ratio == "sentence" else Segmenter(tokenizer, config.ratio)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if config.beta > 0 else None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        self.schedule = warmup_then_linear_decay(self.optimizer, config.warmup_steps, config.steps)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_index = 0
        if resume_from:
            self._load_state(resume_from)
        self.log = MetricsLog(os.path.join(output_dir, "metrics.jsonl"), append=resume_from is not None)

    # -- one step -------------------------------------------------------------------------------------------
    def rollout(self):
        """Sample ``G`` answers per prompt; return the batch, its sentences and their rewards."""
        config = self.config
        picks = torch.randint(len(self.train_set), (config.prompts_per_step,), generator=self.generator).tolist()
        problems = [self.train_set[index] for index in picks]
        self.model.eval()
        prompt_ids, prompt_mask, completion_ids, mask = generate(
            self.model, self.tokenizer, [problem.question for problem in problems], greedy=False,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            num_return_sequences=config.group_size)
        self.model.train()
        questions = [problem.question for problem in problems for _ in range(config.group_size)]
        answers = [problem.answer for problem in problems for _ in range(config.group_size)]
        sentences = self.sentences(completion_ids, mask)
        rewards = self.reward(questions, sentences.texts, answers)
        return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, mask=mask,
                    questions=questions, answers=answers, sentences=sentences, rewards=rewards)

    def advantages(self, batch):
        """``(segment_ids [B, T], advantages)`` for the loss: the ratio's segments (:attr:`GRPOLoopConfig.ratio`)
        and the advantage of each segment: ``[B, S_max]`` per sentence (``credit="sentence"``), ``[B, T]`` per
        token carrying its sentence's (``credit="sentence", ratio="token"``), or ``[B]`` one per answer
        (``credit="answer"``)."""
        config, sentences, rewards = self.config, batch["sentences"], batch["rewards"]
        if config.credit == "answer":
            per_answer = levels.mean_sentence_reward(rewards, sentences.num_sentences).unsqueeze(1)
            has_sentence = (sentences.num_sentences > 0).long()
            advantages = group_sentence_advantages(per_answer, has_sentence, config.group_size,
                                                   scale=config.scale)[:, 0]
        else:
            mode = "cumulative" if config.advantage == "cumulative" else "sentence"
            advantages = group_sentence_advantages(rewards, sentences.num_sentences, config.group_size,
                                                   scale=config.scale, mode=mode, answer_mix=config.answer_mix,
                                                   baseline=config.baseline)
        if self.loss_segmenter is None:                       # ratio="sentence": the rewarded sentences
            return sentences.segment_ids, advantages
        segment_ids = self.loss_segmenter(batch["completion_ids"], batch["mask"]).segment_ids
        if config.credit == "sentence":                      # ratio="token": each token its sentence's advantage
            scored = sentences.segment_ids >= 0
            advantages = torch.where(scored, advantages.gather(1, sentences.segment_ids.clamp(min=0)),
                                     torch.zeros((), dtype=advantages.dtype))
        return segment_ids, advantages

    def _head_inputs(self, model, batch):
        """Hidden states of the completion positions and the LM head, with positions that skip left padding."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["mask"]], 1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        return completion_hidden_states(model, input_ids, attention, completion_length=batch["completion_ids"].shape[1],
                                        position_ids=positions)

    @torch.no_grad()
    def _logprobs(self, model, batch):
        hidden, weight, bias = self._head_inputs(model, batch)
        return fused_linear_token_logprobs(hidden, weight, batch["completion_ids"], bias=bias,
                                           temperature=self.config.temperature)

    def policy_loss(self, batch, segment_ids, advantages, old_logps, ref_logps):
        """``(loss, metrics)`` of the current policy on ``batch`` (from :meth:`rollout`) with the given
        ``segment_ids`` ``[B, T]`` and ``advantages`` (from :meth:`advantages`) and sampling-policy log-probs."""
        config = self.config
        hidden, weight, bias = self._head_inputs(self.model, batch)
        return fused_linear_sentence_grpo_loss(
            hidden, weight, batch["completion_ids"], segment_ids, advantages, old_logps, ref_logps, bias=bias,
            eps_low=config.epsilon, eps_high=config.epsilon, beta=config.beta, temperature=config.temperature,
            ratio_level=config.loss_ratio_level, return_metrics=True)

    def step(self) -> dict:
        config, start, cpu_start = self.config, time.perf_counter(), time.process_time()
        batch = self.rollout()
        segment_ids, advantages = self.advantages(batch)
        old_logps = self._logprobs(self.model, batch)
        ref_logps = self._logprobs(self.reference, batch) if self.reference is not None else None
        updates = []
        for _ in range(config.mu):
            loss, metrics = self.policy_loss(batch, segment_ids, advantages, old_logps, ref_logps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            updates.append({"loss": loss.item(), "grad_norm": float(grad_norm)}
                           | {name: metrics[name].item() for name in ("clip_fraction", "ratio_mean", "kl_mean",
                                                                     "entropy_mean") if name in metrics})
        self.schedule.step()
        self.step_index += 1
        record = self._step_metrics(batch, updates, time.perf_counter() - start)
        return record | {"cpu_seconds": time.process_time() - cpu_start}

    def _step_metrics(self, batch, updates: list[dict], seconds) -> dict:
        """One step's record; ``updates`` holds each of the ``mu`` updates' loss, gradient norm (before clipping)
        and loss metrics, logged as their mean over the updates (the first update is on-policy: its ratio is 1),
        the last update's as ``*_last``. ``seconds`` is the step's wall time (rollout, rewards and update;
        ``cpu_seconds``, added by :meth:`step`, the process's CPU time over the same span, which another job on
        the machine does not inflate)."""
        exists = torch.arange(batch["rewards"].shape[1]) < batch["sentences"].num_sentences.unsqueeze(1)
        texts = decode_completions(self.tokenizer, batch["completion_ids"], batch["mask"])
        record = {"step": self.step_index, "reward": batch["rewards"][exists].mean().item(),
                  "train_accuracy": sum(self.is_correct(text, answer) for text, answer in
                                        zip(texts, batch["answers"])) / len(texts),
                  "completion_tokens": batch["mask"].sum(1).float().mean().item(),
                  "sentences": batch["sentences"].num_sentences.float().mean().item(),
                  "lr": self.schedule.get_last_lr()[0], "seconds": seconds}
        for name, scores in self.reward.breakdown.items():
            record[f"reward_{name}"] = scores[exists].mean().item()
        for name in updates[0]:
            record[name] = sum(update[name] for update in updates) / len(updates)
            if len(updates) > 1 and name in ("clip_fraction", "ratio_mean"):
                record[f"{name}_last"] = updates[-1][name]
        return record

    # -- the loop -------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out measures: ``eval_accuracy`` (greedy, when ``eval_greedy``), ``eval_sampled_accuracy`` (the
        share of right answers among ``eval_samples`` per problem at temperature 1, when ``eval_samples > 0``)
        and what ``eval_extra`` reads from those sampled answers."""
        config, result = self.config, {}
        if config.eval_greedy:
            result["eval_accuracy"] = evaluate_accuracy(self.model, self.tokenizer, self.held_out, self.is_correct,
                                                        max_new_tokens=config.max_new_tokens)
        if config.eval_samples:
            questions, texts, accuracy = sample_held_out(self.model, self.tokenizer, self.held_out, self.is_correct,
                                                         samples=config.eval_samples,
                                                         max_new_tokens=config.max_new_tokens)
            result["eval_sampled_accuracy"] = accuracy
            if self.eval_extra is not None:
                result |= {f"eval_{key}": value for key, value in self.eval_extra(questions, texts).items()}
        return result

    def _evaluates_at(self, step: int) -> bool:
        config = self.config
        return step % config.eval_every == 0 or step == config.steps or step in config.eval_steps

    def train(self, progress: bool = True) -> dict:
        """Run until ``config.steps``; returns held-out greedy accuracy before and after (``accuracy_before`` is
        measured only when starting from step 0; without ``eval_greedy`` the sampled accuracy stands in)."""
        from tqdm import tqdm

        key = "eval_accuracy" if self.config.eval_greedy else "eval_sampled_accuracy"
        summary = {}
        if self.step_index == 0:
            measures = self.evaluate()
            summary["accuracy_before"] = measures[key]
            self.log.write({"step": 0, **measures})
        bar = tqdm(total=self.config.steps, initial=self.step_index, desc=f"grpo[{self.config.credit} credit, "
                   f"{self.config.ratio} ratio]", disable=not progress)
        while self.step_index < self.config.steps:
            record = self.step()
            if self._evaluates_at(self.step_index):
                record |= self.evaluate()
            self.log.write(record)
            bar.update(1)
            # train_acc: this step's sampled answers (at the sampling temperature), not the held-out greedy accuracy
            bar.set_postfix(reward=f"{record['reward']:.3f}", train_acc=f"{record['train_accuracy']:.2f}")
            if self.config.save_every and self.step_index % self.config.save_every == 0:
                self.save(os.path.join(self.output_dir, f"checkpoint-{self.step_index}"))
        bar.close()
        summary["accuracy_after"] = record[key] if self.step_index else self.evaluate()[key]
        self.save(self.output_dir)
        return summary

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """``save_pretrained`` model and tokenizer, plus optimizer, schedule, step and sampler state."""
        os.makedirs(path, exist_ok=True)
        save_pretrained(self.model, self.tokenizer, path)
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "step": self.step_index, "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, os.path.join(path, "trainer_state.pt"))
        with open(os.path.join(path, "grpo_config.json"), "w") as handle:
            json.dump(asdict(self.config), handle, indent=1)

    def _load_state(self, path: str) -> None:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step_index = state["step"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
