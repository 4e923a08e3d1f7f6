"""Group-relative sentence advantages in PyTorch, on a ``[groups, G, S_max]`` view of the rewards.

One pass of a few tensor operations per statistic: the group's largest reward (a shift that makes equal rewards
centre to exactly 0), then for each pool of sentences (all of them, or with ``baseline="split_final"`` the answers'
last sentences apart from the others) its weighted mean and spread, then the answer level of ``answer_mix``.
Half-precision rewards are normalised in float32 and returned in their dtype.
"""

from __future__ import annotations

import torch


def _group_total(values: torch.Tensor) -> torch.Tensor:
    """``[groups, G, S]`` -> ``[groups, 1, 1]``: the sum over each group's answers and slots."""
    return values.sum(dim=(1, 2), keepdim=True)


def _normalised(values: torch.Tensor, member: torch.Tensor, eps: float, output_weighting: bool,
                scale: str) -> torch.Tensor:
    """``values`` centred (and scaled) by the weighted statistics of the ``member`` sentences of each group; 0
    outside ``member``. ``values``, ``member``: ``[groups, G, S]``."""
    per_answer = member.sum(dim=2, keepdim=True).clamp(min=1).to(values.dtype)
    weight = member / per_answer if output_weighting else member.to(values.dtype)
    total = _group_total(weight).clamp(min=1)
    centred = torch.where(member, values - _group_total(weight * values) / total, 0.0)
    if scale == "none":
        return centred
    divisor = total if scale == "std" else (total - 1).clamp(min=1)       # unbiased_std: Bessel's correction
    spread = torch.sqrt(_group_total(weight * centred * centred) / divisor)
    return torch.where(member, centred / (spread + eps), 0.0)


def _shift(values: torch.Tensor, member: torch.Tensor, dims) -> torch.Tensor:
    """The largest member value over ``dims`` (keepdim); 0 where there is none or it is not finite."""
    largest = torch.where(member, values, float("-inf")).amax(dim=dims, keepdim=True)
    return torch.where(torch.isfinite(largest), largest, 0.0)


def _answer_level(values: torch.Tensor, exists: torch.Tensor, counts: torch.Tensor, eps: float,
                  scale: str) -> torch.Tensor:
    """Each answer's mean sentence reward normalised over the answers of its group that have a sentence (every
    answer weighing 1): ``[groups, G, 1]``."""
    means = torch.where(exists, values, 0.0).sum(dim=2, keepdim=True) / counts.clamp(min=1).to(values.dtype)
    has_sentence = counts > 0
    centred_means = means - _shift(means, has_sentence, dims=(1, 2))
    return _normalised(centred_means, has_sentence, eps, True, scale)


def group_advantages(rewards, num_sentences, group_size: int, eps: float, weighting: str, scale: str, mode: str,
                     answer_mix: float = 0.0, baseline: str = "pooled") -> torch.Tensor:
    """The contract of ``ops.passes.Passes.group_advantages``: rewards ``[B, S]``, num_sentences ``[B]`` int,
    ``G | B`` -> ``[B, S]`` advantages in the dtype of ``rewards``, 0 past each answer's last sentence."""
    batch, num_slots = rewards.shape
    work = torch.promote_types(rewards.dtype, torch.float32)
    values = rewards.to(work).reshape(batch // group_size, group_size, num_slots)
    counts = num_sentences.to(torch.int64).reshape(batch // group_size, group_size, 1)
    slot = torch.arange(num_slots, device=rewards.device)
    exists = slot < counts
    values = torch.where(exists, values - _shift(values, exists, dims=(1, 2)), 0.0)
    if baseline == "split_final":
        last = slot == counts - 1
        pools = (exists & ~last, exists & last)
    else:
        pools = (exists,)
    advantages = sum(_normalised(values, member, eps, weighting == "output", scale) for member in pools)
    if mode == "cumulative":         # sentence s: the sum of the normalised rewards of s .. S_i − 1
        advantages = torch.where(exists, advantages.flip(2).cumsum(2).flip(2), 0.0)
    if answer_mix != 0:
        answer = _answer_level(values, exists, counts, eps, scale)
        advantages = torch.where(exists, (1 - answer_mix) * advantages + answer_mix * answer, 0.0)
    return advantages.reshape(batch, num_slots).to(rewards.dtype)
