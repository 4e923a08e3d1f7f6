"""Pieces shared by SFT and GRPO: prompts, seeding, learning-rate schedule, evaluation, checkpoints."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch


def prompt_text(question: str) -> str:
    """The model sees the question on its own line; its completion is the solution."""
    return question + "\n"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_then_linear_decay(optimizer, warmup_steps: int, total_steps: int, floor: float = 0.1):
    """Linear warm-up to the base rate, then linear decay to ``floor`` times it at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * (1 - progress)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def encode_prompts(tokenizer, questions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, P]`` prompt ids (BOS first) and their attention mask."""
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(prompt_text(question), add_special_tokens=False)
            for question in questions]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = torch.tensor(row)
        mask[index, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = completion_ids == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def generate(model, tokenizer, questions: list[str], *, max_new_tokens: int, greedy: bool, temperature: float = 1.0,
             num_return_sequences: int = 1):
    """Prompt ids/mask and completion ids/mask (``[B·n, ·]``) from Hugging Face ``generate``."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, questions, device)
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                            do_sample=not greedy, temperature=temperature if not greedy else None, top_k=0 if not greedy
                            else None, top_p=1.0 if not greedy else None, num_return_sequences=num_return_sequences,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completion_ids = output[:, prompt_ids.shape[1]:]
    repeat = lambda tensor: tensor.repeat_interleave(num_return_sequences, dim=0)  # noqa: E731
    return repeat(prompt_ids), repeat(prompt_mask), completion_ids, completion_mask(completion_ids,
                                                                                    tokenizer.eos_token_id)


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[row_mask.bool()].tolist(), skip_special_tokens=True)
            for row, row_mask in zip(completion_ids, mask)]


def evaluate_accuracy(model, tokenizer, problems, is_correct, *, max_new_tokens: int, batch_size: int = 128) -> float:
    """Greedy accuracy on held-out problems."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        _, _, completion_ids, mask = generate(model, tokenizer, [problem.question for problem in chunk],
                                              max_new_tokens=max_new_tokens, greedy=True)
        texts = decode_completions(tokenizer, completion_ids, mask)
        correct += sum(is_correct(text, problem.answer) for text, problem in zip(texts, chunk))
    model.train(was_training)
    return correct / max(len(problems), 1)


@torch.no_grad()
def sample_held_out(model, tokenizer, problems, is_correct, *, samples: int, max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 0, batch_size: int = 128):
    """``samples`` answers per held-out problem, sampled at ``temperature`` under a fixed seed: the same draws for
    the same policy, whatever ran before, and the global random state is left as it was (so evaluating does not
    change what training samples next).

    Returns:
        ``(questions, sentences, accuracy)``: the question of each answer (``len(problems) · samples``, problem
        by problem), each answer's sentence texts, and the share of right answers.
    """
    from ..segmentation import Segmenter

    was_training = model.training
    model.eval()
    segmenter = Segmenter(tokenizer, "sentence")
    per_call = max(1, batch_size // samples)
    questions, sentences, correct = [], [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(problems), per_call):
            chunk = problems[start:start + per_call]
            _, _, completion_ids, mask = generate(model, tokenizer, [problem.question for problem in chunk],
                                                  max_new_tokens=max_new_tokens, greedy=False,
                                                  temperature=temperature, num_return_sequences=samples)
            texts = decode_completions(tokenizer, completion_ids, mask)
            answers = [problem.answer for problem in chunk for _ in range(samples)]
            correct += sum(is_correct(text, answer) for text, answer in zip(texts, answers))
            questions += [problem.question for problem in chunk for _ in range(samples)]
            sentences += segmenter(completion_ids, mask).texts
    model.train(was_training)
    return questions, sentences, correct / max(len(questions), 1)


class MetricsLog:
    """Append one JSON object per step to ``metrics.jsonl``."""

    def __init__(self, path: str, append: bool = False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        if not append:
            open(path, "w").close()

    def write(self, record: dict) -> None:
        clean = {key: (float(value) if isinstance(value, (float, np.floating, torch.Tensor)) else value)
                 for key, value in record.items()}
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in clean.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")
