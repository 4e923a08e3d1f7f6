"""What the Triton kernel modules share: constants, scalar-argument typing and compile options."""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
LOG2_E = tl.constexpr(1.4426950408889634)   # log2(e); float literals take the type of the tensor they meet,
LN_2 = tl.constexpr(0.6931471805599453)     # ln(2)     so these are exact in fp64 arithmetic

# Passed to every launch: FMA contraction on, whatever Triton's default (it turns it off in 3.10), so the
# numerics of a build do not change with the Triton version.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


@triton.jit
def as_dtype(value, dtype: tl.constexpr):
    """A float kernel argument typed ``tl.float64`` (a Python float under the interpreter) in ``dtype``, rounded
    once. Float arguments are declared ``tl.float64`` so that fp64 kernels get them exactly (an unannotated
    Python float is passed as fp32); ``tl.cast`` of a Python float would round through fp32 in the interpreter."""
    return (tl.zeros([], dtype) + value).to(dtype)
