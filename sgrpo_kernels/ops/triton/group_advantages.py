"""Group advantage normalisation (``reference.group_sentence_advantages``) in Triton: a program per group.

A program walks its group in tiles of ``BLOCK_G`` outputs × ``BLOCK_S`` sentence slots (``BLOCK_S >= S_max``,
so that a whole row sits in one tile for the cumulative mode) four times: the largest reward (a shift that
makes equal rewards centre to exactly 0), the weighted mean, the weighted variance, then the output.
The options weighting, scale, mode and answer_mix are runtime arguments: they select a few scalar operations, and
one compiled kernel per tile shape serves every combination of them. The answer level of ``answer_mix`` (each
member's mean reward) rides along in the same walks. ``baseline="split_final"`` is a compile-time switch
(``SPLIT_FINAL``): its statistics (the pool of the answers' last sentences, one value per answer) ride along too,
and the pooled kernel stays as it was (the build test holds it free of spills at every tile shape; the split form,
not in the GPU presets, spills 8 bytes at two of them on sm_80, measured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..passes import SCALE_CODES, accumulator_dtype, float_vector, index_vector, new_output
from .common import COMPILE_OPTIONS, as_dtype

MAX_SLOTS = 4096        # more sentence slots per answer than this: the caller uses the PyTorch statement
TILE_ELEMENTS = 512     # smallest tile; a tile holds at least one whole row


def group_launch_config(num_slots: int) -> dict:
    """Tile shape and ``num_warps`` for answers of ``num_slots`` sentence slots (``1 <= num_slots <= MAX_SLOTS``)."""
    block_slots = max(triton.next_power_of_2(num_slots), 16)
    tile = max(block_slots, TILE_ELEMENTS)
    return dict(BLOCK_G=tile // block_slots, BLOCK_S=block_slots, num_warps=max(4, tile // 256), **COMPILE_OPTIONS)


def launch_choices() -> dict[str, list[dict]]:
    """Every ``group_launch_config`` the launcher can pick, for ``S_max`` in ``1 .. MAX_SLOTS``."""
    configs = {tuple(sorted(group_launch_config(slots).items())) for slots in range(1, MAX_SLOTS + 1)}
    return {"group_advantages_kernel": [dict(config) for config in sorted(configs)]}


@triton.jit
def _tile(rewards_ptr, num_sentences_ptr, first_row, start, num_slots, group_size,
          BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets, existence mask, rewards and sentence counts of the tile of members ``start .. start+BLOCK_G``."""
    members = start + tl.arange(0, BLOCK_G)
    rows = first_row + members
    in_group = members < group_size
    slots = tl.arange(0, BLOCK_S)
    count = tl.load(num_sentences_ptr + rows, mask=in_group, other=0)
    exists = (slots[None, :] < count[:, None]) & in_group[:, None]
    offsets = rows[:, None] * num_slots + slots[None, :]
    rewards = tl.load(rewards_ptr + offsets, mask=exists, other=0.0)
    in_row = in_group[:, None] & (slots[None, :] < num_slots)
    return offsets, exists, in_row, rewards, count


@triton.jit
def _body_weight(exists, count, output_weighting, dtype, SPLIT_FINAL: tl.constexpr, BLOCK_S: tl.constexpr):
    """The pool of every sentence but, with ``SPLIT_FINAL``, each answer's last (``[BLOCK_G, BLOCK_S]`` bool), and
    each member's weight in it: 1, or with output weighting 1 over its row's members of the pool."""
    members = count - 1 if SPLIT_FINAL else count
    body = exists & (tl.arange(0, BLOCK_S)[None, :] < members[:, None])
    per_member = tl.where(output_weighting != 0, 1.0 / tl.maximum(members, 1).to(dtype), 1.0)
    return body, tl.where(body, per_member[:, None], 0.0)


@triton.jit
def _last_rewards(rewards_ptr, first_row, start, num_slots, group_size, count, BLOCK_G: tl.constexpr):
    """Each member's last sentence reward ``[BLOCK_G]`` and whether it has one (the pool of last sentences: one
    value per answer, so it needs no ``[BLOCK_G, BLOCK_S]`` tile)."""
    members = start + tl.arange(0, BLOCK_G)
    has_last = (members < group_size) & (count > 0)
    last = tl.load(rewards_ptr + (first_row + members) * num_slots + tl.maximum(count - 1, 0), mask=has_last,
                   other=0.0)
    return last, has_last


@triton.jit
def _row_means(rewards, exists, count):
    """Each member's mean sentence reward ``[BLOCK_G]`` and whether it has a sentence (the answer level)."""
    means = tl.sum(tl.where(exists, rewards, 0.0), 1) / tl.maximum(count, 1).to(rewards.dtype)
    return means, count > 0


@triton.jit(do_not_specialize=["num_slots", "group_size", "output_weighting", "scale_code", "cumulative"])
def group_advantages_kernel(rewards_ptr, num_sentences_ptr, out_ptr, num_slots, group_size, eps: tl.float64,
                            output_weighting, scale_code, cumulative, answer_mix: tl.float64,
                            SPLIT_FINAL: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """rewards, out: flat ``[B * S]`` in the accumulator dtype; num_sentences: ``[B]`` int64; ``BLOCK_S >= S``.
    ``answer_mix`` ``α``: the result is ``(1 − α)·Â_sentence + α·Â_answer`` (``reference.answer_advantages``), whose
    statistics the same walks gather (each member's mean reward, over the members with a sentence).
    ``SPLIT_FINAL``: each answer's last sentence is normalised within the pool of the group's last sentences, the
    others within theirs (``_final`` statistics beside the others)."""
    first_row = tl.program_id(0).to(tl.int64) * group_size
    zero = tl.zeros([], out_ptr.dtype.element_ty)
    shift = zero - float("inf")
    answer_shift = zero - float("inf")
    for start in range(0, group_size, BLOCK_G):
        _, exists, _, rewards, count = _tile(rewards_ptr, num_sentences_ptr, first_row, start, num_slots,
                                             group_size, BLOCK_G, BLOCK_S)
        shift = tl.maximum(shift, tl.max(tl.max(tl.where(exists, rewards, float("-inf")), 1), 0))
        means, has_sentence = _row_means(rewards, exists, count)
        answer_shift = tl.maximum(answer_shift, tl.max(tl.where(has_sentence, means, float("-inf")), 0))
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    answer_shift = tl.where(answer_shift == float("-inf"), 0.0, answer_shift)

    # weight: every output weighs 1, split evenly over its sentences of the pool ("output"), or every sentence 1
    total = zero
    weighted_sum = zero
    total_final = zero
    sum_final = zero
    answers = zero
    answer_sum = zero
    for start in range(0, group_size, BLOCK_G):
        _, exists, _, rewards, count = _tile(rewards_ptr, num_sentences_ptr, first_row, start, num_slots,
                                             group_size, BLOCK_G, BLOCK_S)
        body, weight = _body_weight(exists, count, output_weighting, zero.dtype, SPLIT_FINAL, BLOCK_S)
        total += tl.sum(tl.sum(weight, 1), 0)
        weighted_sum += tl.sum(tl.sum(weight * tl.where(body, rewards - shift, 0.0), 1), 0)
        if SPLIT_FINAL:
            last, has_last = _last_rewards(rewards_ptr, first_row, start, num_slots, group_size, count, BLOCK_G)
            total_final += tl.sum(has_last.to(zero.dtype), 0)
            sum_final += tl.sum(tl.where(has_last, last - shift, 0.0), 0)
        means, has_sentence = _row_means(rewards, exists, count)
        answers += tl.sum(has_sentence.to(zero.dtype), 0)
        answer_sum += tl.sum(tl.where(has_sentence, means - answer_shift, 0.0), 0)
    total = tl.maximum(total, 1.0)
    mean = weighted_sum / total
    total_final = tl.maximum(total_final, 1.0)
    mean_final = sum_final / total_final
    answers = tl.maximum(answers, 1.0)
    answer_mean = answer_sum / answers

    squares = zero
    squares_final = zero
    answer_squares = zero
    for start in range(0, group_size, BLOCK_G):
        _, exists, _, rewards, count = _tile(rewards_ptr, num_sentences_ptr, first_row, start, num_slots,
                                             group_size, BLOCK_G, BLOCK_S)
        body, weight = _body_weight(exists, count, output_weighting, zero.dtype, SPLIT_FINAL, BLOCK_S)
        centred = tl.where(body, rewards - shift - mean, 0.0)
        squares += tl.sum(tl.sum(weight * centred * centred, 1), 0)
        if SPLIT_FINAL:
            last, has_last = _last_rewards(rewards_ptr, first_row, start, num_slots, group_size, count, BLOCK_G)
            last_centred = tl.where(has_last, last - shift - mean_final, 0.0)
            squares_final += tl.sum(last_centred * last_centred, 0)
        means, has_sentence = _row_means(rewards, exists, count)
        answer_centred = tl.where(has_sentence, means - answer_shift - answer_mean, 0.0)
        answer_squares += tl.sum(answer_centred * answer_centred, 0)
    divisor = tl.where(scale_code == 2, tl.maximum(total - 1.0, 1.0), total)     # 2: Bessel's correction
    scale = tl.where(scale_code != 0, tl.sqrt(squares / divisor) + as_dtype(eps, zero.dtype), 1.0)
    divisor_final = tl.where(scale_code == 2, tl.maximum(total_final - 1.0, 1.0), total_final)
    scale_final = tl.where(scale_code != 0, tl.sqrt(squares_final / divisor_final) + as_dtype(eps, zero.dtype), 1.0)
    answer_count = tl.where(scale_code == 2, tl.maximum(answers - 1.0, 1.0), answers)
    answer_scale = tl.where(scale_code != 0, tl.sqrt(answer_squares / answer_count) + as_dtype(eps, zero.dtype), 1.0)
    mix = as_dtype(answer_mix, zero.dtype)
    keep = as_dtype(1.0 - answer_mix, zero.dtype)

    for start in range(0, group_size, BLOCK_G):
        offsets, exists, in_row, rewards, count = _tile(rewards_ptr, num_sentences_ptr, first_row, start, num_slots,
                                                        group_size, BLOCK_G, BLOCK_S)
        advantages = tl.where(exists, (rewards - shift - mean) / scale, 0.0)
        if SPLIT_FINAL:     # the last slot belongs to its own pool (the cumulative mode carries it to the slots before)
            last, has_last = _last_rewards(rewards_ptr, first_row, start, num_slots, group_size, count, BLOCK_G)
            own = tl.where(has_last, (last - shift - mean_final) / scale_final, 0.0)
            is_last = tl.arange(0, BLOCK_S)[None, :] == count[:, None] - 1
            advantages = tl.where(is_last, own[:, None], advantages)
        # cumulative: sentence s gets the sum of the normalised rewards of s .. S_i - 1
        advantages = tl.where(cumulative != 0, tl.where(exists, tl.cumsum(advantages, 1, reverse=True), 0.0),
                              advantages)
        means, _ = _row_means(rewards, exists, count)
        answer_advantages = (means - answer_shift - answer_mean) / answer_scale
        mixed = tl.where(exists, keep * advantages + mix * answer_advantages[:, None], 0.0)
        advantages = tl.where(answer_mix != 0, mixed, advantages)
        tl.store(out_ptr + offsets, advantages, mask=in_row)


def group_advantages(rewards: torch.Tensor, num_sentences: torch.Tensor, group_size: int, eps: float,
                     weighting: str, scale: str, mode: str, answer_mix: float = 0.0,
                     baseline: str = "pooled") -> torch.Tensor | None:
    """The kernel on validated inputs: rewards ``[B, S]`` float, num_sentences ``[B]`` int, ``G | B``.

    Returns ``[B, S]`` advantages in the dtype of ``rewards``, or ``None`` when ``S`` exceeds ``MAX_SLOTS``.
    """
    batch, num_slots = rewards.shape
    if num_slots > MAX_SLOTS:
        return None
    dtype = accumulator_dtype(rewards.dtype)
    out = new_output((batch * num_slots,), dtype, rewards.device)
    if batch and num_slots:
        group_advantages_kernel[(batch // group_size,)](
            float_vector(rewards, dtype), index_vector(num_sentences), out, num_slots, group_size, float(eps),
            int(weighting == "output"), SCALE_CODES[scale], int(mode == "cumulative"), float(answer_mix),
            SPLIT_FINAL=baseline == "split_final", **group_launch_config(num_slots))
    else:
        out.zero_()
    return out.view(batch, num_slots).to(rewards.dtype)
