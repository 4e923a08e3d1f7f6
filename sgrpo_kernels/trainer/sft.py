"""Supervised warm start: teach the tiny model the solution format so that RL has a signal to work with."""

from __future__ import annotations

import os

import torch

from ..models import save_pretrained
from .common import MetricsLog, evaluate_accuracy, prompt_text, seed_everything, warmup_then_linear_decay


def sft_batch(tokenizer, problems, device):
    """``[B, L]`` ids of prompt + solution + EOS (right-padded) and labels (-100 on prompt and padding)."""
    rows, labels = [], []
    for problem in problems:
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(prompt_text(problem.question), add_special_tokens=False)
        answer = tokenizer.encode(problem.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for index, (row, label) in enumerate(zip(rows, labels)):
        ids[index, :len(row)] = torch.tensor(row)
        targets[index, :len(label)] = torch.tensor(label)
    return ids.to(device), (ids != tokenizer.pad_token_id).long().to(device), targets.to(device)


def run_sft(model, tokenizer, train, held_out, is_correct, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
            seed: int = 0, output_dir: str | None = None, max_new_tokens: int = 64, progress: bool = True):
    """Teacher-forced cross-entropy on the solutions; returns the held-out greedy accuracy at the end."""
    from tqdm import tqdm

    seed_everything(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_then_linear_decay(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps, floor=0.05)
    log = MetricsLog(os.path.join(output_dir, "sft_metrics.jsonl")) if output_dir else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="sft", disable=not progress)
    for step in bar:
        indices = torch.randint(len(train), (batch_size,), generator=generator).tolist()
        ids, mask, labels = sft_batch(tokenizer, [train[index] for index in indices], device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log:
            log.write({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
    accuracy = evaluate_accuracy(model, tokenizer, held_out, is_correct, max_new_tokens=max_new_tokens)
    if output_dir:
        save_pretrained(model, tokenizer, output_dir)
    return accuracy
