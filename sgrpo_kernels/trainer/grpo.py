"""A small, readable GRPO loop on top of the fused sentence-level loss.

One step: sample ``G`` answers for each of ``P`` prompts; split them into sentences; reward every sentence
(correctness, logic, format); normalise within each group; record the log-probs of the sampling policy (and of
a frozen reference when ``beta > 0``) with the fused no-grad path; then ``mu`` updates of the fused
hidden-state loss with AdamW, gradient clipping and a warm-up/decay schedule. ``level`` picks the scale of
the policy's observation: ``"sentence"`` (sentence rewards and ratios), ``"token"`` or ``"output"`` (one reward
per answer — the mean of its sentence rewards — with per-token ratios or one length-normalised ratio); see
:mod:`sgrpo_kernels.levels`.
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
from ..integrations.hf import completion_hidden_states
from ..loss import fused_linear_sentence_grpo_loss, fused_linear_token_logprobs
from ..segmentation import Segmenter
from .common import MetricsLog, decode_completions, evaluate_accuracy, generate, warmup_then_linear_decay
from .tiny import save_pretrained

ADVANTAGES = ("sentence", "cumulative", "broadcast")


@dataclass
class GRPOLoopConfig:
    """Options of :class:`GRPOLoop`; ``level`` and ``ratio_level`` (the sentence level's) as in
    :mod:`sgrpo_kernels.levels`."""

    level: str = "sentence"
    ratio_level: str = levels.DEFAULT_SENTENCE_RATIO_LEVEL
    # sentence level: each sentence its normalised reward ("sentence"), the sum of those from it to the answer's
    # end ("cumulative", reward-to-go), or its answer's normalised mean reward ("broadcast": the sentence loss and
    # ratios with output-level credit, which separates credit assignment from the token weighting)
    advantage: str = "sentence"
    # sentence level, advantage="sentence": weight of the answer-level advantage fused into each sentence's,
    # (1 - a) * A_sentence + a * A_answer (the seed's multi-scale credit; 0 is pure sentence credit, 1 broadcast)
    answer_mix: float = 0.0
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
    save_every: int = 0
    seed: int = 0

    def __post_init__(self):
        levels.check_level(self.level, self.ratio_level)
        levels.check_level("output", self.output_ratio_level)
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {', '.join(map(repr, ADVANTAGES))}, got {self.advantage!r}")
        if self.advantage != "sentence" and self.level != "sentence":
            raise ValueError(f"advantage={self.advantage!r} is a sentence-level variant; level is {self.level!r}")
        if not 0.0 <= self.answer_mix <= 1.0:
            raise ValueError(f"answer_mix must lie in [0, 1], got {self.answer_mix}")
        if self.answer_mix and (self.level != "sentence" or self.advantage != "sentence"):
            raise ValueError(f"answer_mix mixes per-sentence advantages (level='sentence', advantage='sentence'); "
                             f"got level={self.level!r}, advantage={self.advantage!r}")
        for name in ("steps", "prompts_per_step", "group_size", "mu", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class GRPOLoop:
    """GRPO on a Hugging Face causal LM with sentence-level credit assignment.

    Args:
        model, tokenizer: the policy (any causal LM whose head is a plain linear layer) and its tokenizer.
        train, held_out: lists of problems (``.question``, ``.answer``); ``is_correct(text, answer)`` judges one.
        reward: a ``CompositeReward`` over sentences. config: :class:`GRPOLoopConfig`. output_dir: where
        ``metrics.jsonl``, plots and checkpoints go. resume_from: a checkpoint folder written by :meth:`save`.
    """

    def __init__(self, model, tokenizer, train, held_out, is_correct, reward, config: GRPOLoopConfig, output_dir: str,
                 resume_from: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train_set, self.held_out, self.is_correct, self.reward = train, held_out, is_correct, reward
        self.output_dir = output_dir
        self.sentences = Segmenter(tokenizer, "sentence")
        self.loss_segmenter = levels.loss_segmenter(tokenizer, config.level)
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
        """Per-sentence advantages (sentence level) or one per answer (token and output levels)."""
        sentences, rewards, group = batch["sentences"], batch["rewards"], self.config.group_size
        per_answer = levels.mean_sentence_reward(rewards, sentences.num_sentences).unsqueeze(1)
        has_sentence = (sentences.num_sentences > 0).long()
        if levels.advantages_per_sentence(self.config.level):
            if self.config.advantage == "broadcast":      # [B]: every sentence of an answer gets the answer's
                answer = group_sentence_advantages(per_answer, has_sentence, group, scale=self.config.scale)
                return sentences.segment_ids, answer[:, 0]
            mode = "cumulative" if self.config.advantage == "cumulative" else "sentence"
            return sentences.segment_ids, group_sentence_advantages(rewards, sentences.num_sentences, group,
                                                                    scale=self.config.scale, mode=mode,
                                                                    answer_mix=self.config.answer_mix)
        segment_ids = self.loss_segmenter(batch["completion_ids"], batch["mask"]).segment_ids
        return segment_ids, group_sentence_advantages(per_answer, has_sentence, group, scale=self.config.scale)[:, 0]

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
        ratio_level = (config.output_ratio_level if config.level == "output"
                       else levels.loss_ratio_level(config.level, config.ratio_level))
        hidden, weight, bias = self._head_inputs(self.model, batch)
        return fused_linear_sentence_grpo_loss(
            hidden, weight, batch["completion_ids"], segment_ids, advantages, old_logps, ref_logps, bias=bias,
            eps_low=config.epsilon, eps_high=config.epsilon, beta=config.beta, temperature=config.temperature,
            ratio_level=ratio_level, return_metrics=True)

    def step(self) -> dict:
        config, start, cpu_start = self.config, time.perf_counter(), time.process_time()
        batch = self.rollout()
        segment_ids, advantages = self.advantages(batch)
        old_logps = self._logprobs(self.model, batch)
        ref_logps = self._logprobs(self.reference, batch) if self.reference is not None else None
        for _ in range(config.mu):
            loss, metrics = self.policy_loss(batch, segment_ids, advantages, old_logps, ref_logps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
        self.schedule.step()
        self.step_index += 1
        record = self._step_metrics(batch, loss, metrics, grad_norm, time.perf_counter() - start)
        return record | {"cpu_seconds": time.process_time() - cpu_start}

    def _step_metrics(self, batch, loss, metrics, grad_norm, seconds) -> dict:
        """One step's record; ``seconds`` is its wall time (rollout, rewards and update; ``cpu_seconds``, added by
        :meth:`step`, the process's CPU time over the same span, which another job on the machine does not
        inflate)."""
        exists = torch.arange(batch["rewards"].shape[1]) < batch["sentences"].num_sentences.unsqueeze(1)
        texts = decode_completions(self.tokenizer, batch["completion_ids"], batch["mask"])
        record = {"step": self.step_index, "loss": loss.item(), "reward": batch["rewards"][exists].mean().item(),
                  "train_accuracy": sum(self.is_correct(text, answer) for text, answer in
                                        zip(texts, batch["answers"])) / len(texts),
                  "completion_tokens": batch["mask"].sum(1).float().mean().item(),
                  "sentences": batch["sentences"].num_sentences.float().mean().item(),
                  "grad_norm": float(grad_norm), "lr": self.schedule.get_last_lr()[0], "seconds": seconds}
        for name, scores in self.reward.breakdown.items():
            record[f"reward_{name}"] = scores[exists].mean().item()
        for name in ("clip_fraction", "ratio_mean", "kl_mean", "entropy_mean"):
            if name in metrics:
                record[name] = metrics[name].item()
        return record

    # -- the loop -------------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        return evaluate_accuracy(self.model, self.tokenizer, self.held_out, self.is_correct,
                                 max_new_tokens=self.config.max_new_tokens)

    def train(self, progress: bool = True) -> dict:
        """Run until ``config.steps``; returns held-out accuracy before and after (``accuracy_before`` is
        measured only when starting from step 0)."""
        from tqdm import tqdm

        summary = {}
        if self.step_index == 0:
            summary["accuracy_before"] = self.evaluate()
            self.log.write({"step": 0, "eval_accuracy": summary["accuracy_before"]})
        bar = tqdm(total=self.config.steps, initial=self.step_index, desc=f"grpo[{self.config.level}]",
                   disable=not progress)
        while self.step_index < self.config.steps:
            record = self.step()
            if self.step_index % self.config.eval_every == 0 or self.step_index == self.config.steps:
                record["eval_accuracy"] = self.evaluate()
            self.log.write(record)
            bar.update(1)
            # train_acc: this step's sampled answers (at the sampling temperature), not the held-out greedy accuracy
            bar.set_postfix(reward=f"{record['reward']:.3f}", train_acc=f"{record['train_accuracy']:.2f}")
            if self.config.save_every and self.step_index % self.config.save_every == 0:
                self.save(os.path.join(self.output_dir, f"checkpoint-{self.step_index}"))
        bar.close()
        summary["accuracy_after"] = record["eval_accuracy"] if self.step_index else self.evaluate()
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
