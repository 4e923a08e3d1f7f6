"""Group advantage normalisation (DESIGN.md §1) as one Triton program per group of ``G`` outputs."""

import triton
import triton.language as tl


@triton.jit
def group_advantages_kernel(rewards_ptr, num_sentences_ptr, out_ptr, num_slots, group_size, eps,
                            OUTPUT_WEIGHTING: tl.constexpr, SCALE_STD: tl.constexpr, CUMULATIVE: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """rewards, out: ``[B, S]``; num_sentences: ``[B]``; needs ``BLOCK_G >= G`` and ``BLOCK_S >= S``."""
    group = tl.program_id(0).to(tl.int64)
    members = tl.arange(0, BLOCK_G)
    rows = group * group_size + members
    in_group = members < group_size
    slots = tl.arange(0, BLOCK_S)
    count = tl.load(num_sentences_ptr + rows, mask=in_group, other=0)
    exists = (slots[None, :] < count[:, None]) & in_group[:, None]
    offsets = rows[:, None] * num_slots + slots[None, :]
    rewards = tl.load(rewards_ptr + offsets, mask=exists, other=0.0).to(ACC_DTYPE)

    # Shift by the group's largest reward so that equal rewards centre to exactly 0.
    shift = tl.max(tl.max(tl.where(exists, rewards, float("-inf")), 1), 0)
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    values = tl.where(exists, rewards - shift, 0.0)
    if OUTPUT_WEIGHTING:   # every output weighs 1, split evenly over its sentences
        weight = tl.where(exists, 1.0 / tl.maximum(count, 1).to(ACC_DTYPE)[:, None], 0.0)
    else:                  # every sentence weighs 1
        weight = tl.where(exists, 1.0, 0.0).to(ACC_DTYPE)
    total = tl.maximum(tl.sum(tl.sum(weight, 1), 0), 1.0)
    mean = tl.sum(tl.sum(weight * values, 1), 0) / total
    advantages = values - mean
    if SCALE_STD:
        variance = tl.sum(tl.sum(weight * advantages * advantages, 1), 0) / total
        advantages = advantages / (tl.sqrt(variance) + eps)
    advantages = tl.where(exists, advantages, 0.0)
    if CUMULATIVE:         # sentence s gets the sum of the normalised rewards of s .. S_i - 1
        advantages = tl.where(exists, tl.cumsum(advantages, 1, reverse=True), 0.0)
    tl.store(out_ptr + offsets, advantages.to(out_ptr.dtype.element_ty),
             mask=in_group[:, None] & (slots[None, :] < num_slots))
