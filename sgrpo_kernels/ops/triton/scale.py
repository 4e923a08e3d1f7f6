"""Scale a finished gradient by a 0-dim device tensor in place, without reading it when the scale is 1.

The fused losses finish their gradients in the forward pass; backward multiplies them by ``grad_output``. The
usual ``loss.backward()`` passes 1, and reading the scale on the host would be a device sync: each program reads
the scale on the device and touches its block only when the scale differs from 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import COMPILE_OPTIONS

BLOCK = 4096
LAUNCH = dict(BLOCK=BLOCK, num_warps=8, **COMPILE_OPTIONS)


def launch_choices() -> dict[str, list[dict]]:
    return {"_scale_unless_one_kernel": [dict(LAUNCH)]}


@triton.jit(do_not_specialize=["numel"])
def _scale_unless_one_kernel(values_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        values = tl.load(values_ptr + offsets, mask=in_range)
        tl.store(values_ptr + offsets, (values * scale).to(values_ptr.dtype.element_ty), mask=in_range)


def scale_unless_one_(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values *= scale`` unless ``scale == 1``; values: any shape, contiguous, fp16/bf16/fp32/fp64; scale: 0-dim
    float on the same device. Returns ``values``."""
    if not values.is_contiguous():
        raise ValueError("scale_unless_one_ needs a contiguous tensor")
    if values.numel():
        scale = scale.reshape(1).to(torch.float64 if values.dtype == torch.float64 else torch.float32)
        _scale_unless_one_kernel[(triton.cdiv(values.numel(), BLOCK),)](values, scale, values.numel(), **LAUNCH)
    return values
