"""Pass A (one read of the logits: log-prob, logsumexp, entropy) and pass C (the logits gradient) in Triton.

A program handles one token row of ``[B, T, V]`` logits, addressed as ``b * stride_b + t * stride_t``
with int64 arithmetic, on a 1-D grid of ``B * T`` programs: no grid axis caps ``T`` and no offset wraps
at ``2**31``. Logits are read in their dtype; everything is accumulated in fp32 (fp64 for fp64 logits).

What keeps the vocabulary loop at the memory floor on GPUs (the counts are read off the built code by
``benchmarks/compile_report.py`` and held by tests):

* exponentials in base 2 of pre-scaled logits: ``exp(x/T − m) = 2^(x·log2(e)/T − m₂)``, one ``exp2`` and one
  fused multiply-add per logit, no division (``1/T`` comes from the host, in fp64);
* the running maximum is kept per vector of ``VEC`` logits (the 16 bytes one load brings): one rescaling
  ``exp2`` per vector instead of one per logit;
* a row is read as an unaligned head (``< VEC`` logits up to a 16-byte boundary), unmasked full tiles from
  that boundary, and a masked remainder: whatever ``V``, the row stride or the start of a sliced tensor, the
  main loop issues 128-bit loads and stores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..passes import (
    TokenScores,
    check_row_layout,
    float_vector,
    index_vector,
    new_token_scores,
)
from .common import COMPILE_OPTIONS, LN_2, LOG2_E, NEG_INF, as_dtype

MIN_BLOCK_V = 256
MAX_BLOCK_V = 4096
MAX_VOCAB = 262_144   # the largest vocabulary whose launch choices the build check sweeps (tools/kernel_builds.py)
LOAD_BYTES = 16       # one 128-bit load


def vocab_launch_config(vocab: int) -> dict:
    """Tile width ``BLOCK_V`` and ``num_warps`` of passes A and C for a vocabulary of ``vocab`` entries."""
    return dict(BLOCK_V=min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V), num_warps=8,
                **COMPILE_OPTIONS)


def launch_choices() -> dict[str, list[dict]]:
    """Every ``vocab_launch_config`` the launchers below can pick for ``V`` in ``1 .. MAX_VOCAB``, per kernel."""
    configs = {tuple(sorted(vocab_launch_config(vocab).items())) for vocab in range(1, MAX_VOCAB + 1)}
    choices = [dict(config) for config in sorted(configs)]
    return {"_logsumexp_kernel": choices, "_logits_grad_kernel": choices}


@triton.jit
def _row_offset(row, length, stride_batch, stride_time, base_offset):
    """Element offset of a ``[B, T]`` row from the (16-byte aligned) base pointer."""
    return base_offset + (row // length) * stride_batch + (row % length) * stride_time


@triton.jit
def _head_length(offset, vocab, VEC: tl.constexpr):
    """Logits before the first 16-byte boundary of a row starting at element ``offset`` (at most ``vocab``)."""
    return tl.minimum((VEC - offset % VEC) % VEC, vocab).to(tl.int32)


@triton.jit
def _remainder_columns(index, head, tail_start, tail_count):
    """Columns of the masked remainder: the tail ``tail_start ..`` first, then the unaligned head ``0 .. head``."""
    return tl.where(index < tail_count, tail_start + index, index - tail_count), index < tail_count + head


@triton.jit
def _accumulate(x, vector_max, vector_sum, vector_weighted, scale,
                WITH_ENTROPY: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online logsumexp in base 2 over a tile of ``BLOCK_V`` logits, kept per vector of ``VEC`` logits.

    With ``y = x · scale`` (``scale = log2(e) / T``): ``vector_sum = Σ 2^(y − vector_max)`` and
    ``vector_weighted = Σ 2^(y − vector_max) · y`` (for the entropy); ``-inf`` logits add 0, NaN propagates.
    """
    x = tl.reshape(x.to(vector_sum.dtype), [BLOCK_V // VEC, VEC])
    new_max = tl.maximum(vector_max, tl.max(x, 1) * scale)       # scale > 0: max(x)·scale = max(x·scale)
    safe_max = tl.where(new_max == NEG_INF, 0.0, new_max)
    rescale = tl.exp2(vector_max - safe_max)
    shifted = x * scale - safe_max[:, None]
    terms = tl.exp2(shifted)
    vector_sum = vector_sum * rescale + tl.sum(terms, 1)
    if WITH_ENTROPY:
        y = shifted + safe_max[:, None]
        vector_weighted = vector_weighted * rescale + tl.sum(tl.where(terms == 0, 0.0, terms * y), 1)
    return new_max, vector_sum, vector_weighted


# Integer arguments are not specialised on their values (Triton would compile a variant for each value equal to 1
# or divisible by 16): the kernels find the alignment of each row themselves, so one build serves every shape.
@triton.jit(do_not_specialize=["length", "vocab", "stride_batch", "stride_time", "base_offset"])
def _logsumexp_kernel(logits_ptr, ids_ptr, segment_ids_ptr, logp_ptr, lse_ptr, entropy_ptr,
                      length, vocab, stride_batch, stride_time, base_offset, inverse_temperature: tl.float64,
                      ONLY_SCORED: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                      VEC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ONLY_SCORED:
        if tl.load(segment_ids_ptr + row) < 0:
            return
    acc_dtype = logp_ptr.dtype.element_ty
    scale = as_dtype(inverse_temperature * LOG2_E, acc_dtype)
    offset = _row_offset(row, length, stride_batch, stride_time, base_offset)
    head = _head_length(offset, vocab, VEC)
    vector_max = tl.full([BLOCK_V // VEC], NEG_INF, acc_dtype)
    vector_sum = tl.zeros([BLOCK_V // VEC], acc_dtype)
    vector_weighted = tl.zeros([BLOCK_V // VEC], acc_dtype)
    columns = tl.arange(0, BLOCK_V)
    aligned = logits_ptr + tl.multiple_of(offset + head, VEC)
    full_tiles = (vocab - head) // BLOCK_V
    for tile in range(0, full_tiles):
        x = tl.load(aligned + tile * BLOCK_V + columns)
        vector_max, vector_sum, vector_weighted = _accumulate(x, vector_max, vector_sum, vector_weighted, scale,
                                                              WITH_ENTROPY, VEC, BLOCK_V)
    tail_start = head + full_tiles * BLOCK_V
    for start in range(0, vocab - tail_start + head, BLOCK_V):
        cols, valid = _remainder_columns(start + columns, head, tail_start, vocab - tail_start)
        x = tl.load(logits_ptr + offset + cols, mask=valid, other=NEG_INF)
        vector_max, vector_sum, vector_weighted = _accumulate(x, vector_max, vector_sum, vector_weighted, scale,
                                                              WITH_ENTROPY, VEC, BLOCK_V)
    row_max = tl.max(vector_max, 0)
    safe_row_max = tl.where(row_max == NEG_INF, 0.0, row_max)
    vector_scale = tl.exp2(vector_max - safe_row_max)
    total = tl.sum(vector_sum * vector_scale, 0)
    lse2 = safe_row_max + tl.log2(total)                  # log2 Σ 2^(x·scale)
    token = tl.load(ids_ptr + row)
    target = tl.load(logits_ptr + offset + token).to(acc_dtype)
    tl.store(logp_ptr + row, (target * scale - lse2) * LN_2)
    tl.store(lse_ptr + row, lse2 * LN_2)
    if WITH_ENTROPY:   # H = lse − Σ p·x/T = ln2 · (lse2 − Σ p·y)
        tl.store(entropy_ptr + row, (lse2 - tl.sum(vector_weighted * vector_scale, 0) / total) * LN_2)


@triton.jit
def _gradient_tile(x, columns, target, lse2, scale, logp_coef, entropy_coef, entropy,
                   WITH_ENTROPY_GRAD: tl.constexpr):
    """``∂/∂x`` of ``T · (logp_coef · logp_target + entropy_coef · H)`` for a tile of logits (the coefficients
    arrive already divided by the temperature ``T``)."""
    log2_p = x.to(lse2.dtype) * scale - lse2
    p = tl.exp2(log2_p)
    grad = logp_coef * (tl.where(columns == target, 1.0, 0.0) - p)
    if WITH_ENTROPY_GRAD:   # ∂H/∂z = −p · (log p + H)
        grad -= entropy_coef * tl.where(p == 0, 0.0, p * (log2_p * LN_2 + entropy))
    return grad


@triton.jit(do_not_specialize=["length", "vocab", "stride_batch", "stride_time", "base_offset", "grad_stride_batch",
                               "grad_stride_time", "grad_base_offset"])
def _logits_grad_kernel(logits_ptr, grad_ptr, ids_ptr, logp_coef_ptr, lse_ptr, entropy_coef_ptr, entropy_ptr,
                        length, vocab, stride_batch, stride_time, base_offset, grad_stride_batch, grad_stride_time,
                        grad_base_offset, inverse_temperature: tl.float64, WITH_ENTROPY_GRAD: tl.constexpr,
                        GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # grad_z = c · (onehot(id) − p) − c_H · p · (log p + H),  z = logits / T,  grad_logits = grad_z / T.
    # GRAD_ALIGNED: every gradient row starts at the same offset modulo VEC as its logits row (same layout).
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = lse_ptr.dtype.element_ty
    out_dtype = grad_ptr.dtype.element_ty
    offset = _row_offset(row, length, stride_batch, stride_time, base_offset)
    grad_offset = _row_offset(row, length, grad_stride_batch, grad_stride_time, grad_base_offset)
    coef = tl.load(logp_coef_ptr + row).to(acc_dtype)
    zero_row = coef == 0
    entropy_coef = tl.zeros([], acc_dtype)
    entropy = tl.zeros([], acc_dtype)
    if WITH_ENTROPY_GRAD:
        entropy_coef = tl.load(entropy_coef_ptr + row).to(acc_dtype)
        zero_row = zero_row & (entropy_coef == 0)
    columns = tl.arange(0, BLOCK_V)
    if zero_row:
        # Unscored or fully clipped token: a zero row, without reading the logits or the (unwritten) lse.
        head = _head_length(grad_offset, vocab, VEC)
        aligned = grad_ptr + tl.multiple_of(grad_offset + head, VEC)
        zeros = tl.zeros([BLOCK_V], out_dtype)
        full_tiles = (vocab - head) // BLOCK_V
        for tile in range(0, full_tiles):
            tl.store(aligned + tile * BLOCK_V + columns, zeros)
        tail_start = head + full_tiles * BLOCK_V
        for start in range(0, vocab - tail_start + head, BLOCK_V):
            cols, valid = _remainder_columns(start + columns, head, tail_start, vocab - tail_start)
            tl.store(grad_ptr + grad_offset + cols, zeros, mask=valid)
    else:
        lse2 = tl.load(lse_ptr + row) * LOG2_E
        scale = as_dtype(inverse_temperature * LOG2_E, acc_dtype)
        inverse_t = as_dtype(inverse_temperature, acc_dtype)
        coef *= inverse_t                       # ∂/∂logits = ∂/∂z / T
        entropy_coef *= inverse_t
        if WITH_ENTROPY_GRAD:
            entropy = tl.load(entropy_ptr + row)
        head = _head_length(offset, vocab, VEC)
        aligned = logits_ptr + tl.multiple_of(offset + head, VEC)
        if GRAD_ALIGNED:
            grad_aligned = grad_ptr + tl.multiple_of(grad_offset + head, VEC)
        else:
            grad_aligned = grad_ptr + grad_offset + head
        target = tl.load(ids_ptr + row).to(tl.int32) - head     # relative to the aligned start: int32 compares
        full_tiles = (vocab - head) // BLOCK_V
        for tile in range(0, full_tiles):
            x = tl.load(aligned + tile * BLOCK_V + columns)
            grad = _gradient_tile(x, columns, target - tile * BLOCK_V, lse2, scale, coef, entropy_coef, entropy,
                                  WITH_ENTROPY_GRAD)
            tl.store(grad_aligned + tile * BLOCK_V + columns, grad.to(out_dtype))
        tail_start = head + full_tiles * BLOCK_V
        for start in range(0, vocab - tail_start + head, BLOCK_V):
            cols, valid = _remainder_columns(start + columns, head, tail_start, vocab - tail_start)
            x = tl.load(logits_ptr + offset + cols, mask=valid, other=0.0)
            grad = _gradient_tile(x, cols, target + head, lse2, scale, coef, entropy_coef, entropy,
                                  WITH_ENTROPY_GRAD)
            tl.store(grad_ptr + grad_offset + cols, grad.to(out_dtype), mask=valid)


def _aligned_base(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(view, k)``: a view starting ``k`` elements before ``tensor`` at a 16-byte boundary of its storage (the
    kernels add ``k`` to every offset), or ``(tensor, 0)`` when ``tensor`` starts at one or its storage does not."""
    misalignment = tensor.data_ptr() % LOAD_BYTES // tensor.element_size()
    if misalignment == 0 or tensor.untyped_storage().data_ptr() % LOAD_BYTES:
        return tensor, 0
    return tensor.as_strided((1,), (1,), tensor.storage_offset() - misalignment), misalignment


def _vector_width(dtype: torch.dtype) -> int:
    return LOAD_BYTES // torch.empty((), dtype=dtype).element_size()


def _inverse_temperature(temperature: float) -> float:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return 1.0 / float(temperature)


def token_scores(logits: torch.Tensor, ids: torch.Tensor, temperature: float, *,
                 segment_ids: torch.Tensor | None = None, with_entropy: bool = False):
    """Pass A over ``[B, T, V]`` logits (vocabulary dimension contiguous).

    Returns flat ``[B*T]`` tensors ``(logp, lse, entropy or None)`` in the accumulator dtype. With
    ``segment_ids``, rows whose segment is ``< 0`` are skipped and their outputs left unwritten.
    """
    logp, lse, entropy = new_token_scores(logits, with_entropy)
    batch, length, vocab = logits.shape
    rows = batch * length
    if rows == 0:
        return TokenScores(logp, lse, entropy)
    ids = index_vector(ids)
    segments = ids if segment_ids is None else index_vector(segment_ids)
    base, base_offset = _aligned_base(logits)
    _logsumexp_kernel[(rows,)](
        base, ids, segments, logp, lse, entropy if with_entropy else lse,
        length, vocab, logits.stride(0), logits.stride(1), base_offset, _inverse_temperature(temperature),
        ONLY_SCORED=segment_ids is not None, WITH_ENTROPY=with_entropy, VEC=_vector_width(logits.dtype),
        **vocab_launch_config(vocab))
    return TokenScores(logp, lse, entropy)


def logits_gradient(logits: torch.Tensor, ids: torch.Tensor, logp_coef: torch.Tensor, lse: torch.Tensor,
                    temperature: float, out: torch.Tensor, *, entropy_coef: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Pass C: ``out[b, t] = ∂/∂logits[b, t]`` of ``Σ_t logp_coef[t] · logp_t (+ entropy_coef[t] · H_t)``.

    logits, out: ``[B, T, V]`` (``out`` may be ``logits`` itself: the update is row-local);
    ids, logp_coef, lse (and entropy_coef, entropy): ``[B*T]``. Rows with zero coefficients become 0.
    """
    check_row_layout("logits", logits)
    check_row_layout("out", out)
    batch, length, vocab = logits.shape
    rows = batch * length
    if rows == 0:
        return out
    with_entropy = entropy_coef is not None
    base, base_offset = _aligned_base(logits)
    grad_base, grad_base_offset = _aligned_base(out)
    vector = _vector_width(logits.dtype)
    same_phase = (out.dtype == logits.dtype and (grad_base_offset - base_offset) % vector == 0
                  and all((a - b) % vector == 0 for a, b in zip(out.stride()[:2], logits.stride()[:2])))
    _logits_grad_kernel[(rows,)](
        base, grad_base, index_vector(ids), float_vector(logp_coef, lse.dtype), lse,
        float_vector(entropy_coef, lse.dtype) if with_entropy else lse, entropy if with_entropy else lse,
        length, vocab, logits.stride(0), logits.stride(1), base_offset, out.stride(0), out.stride(1),
        grad_base_offset, _inverse_temperature(temperature), WITH_ENTROPY_GRAD=with_entropy,
        GRAD_ALIGNED=same_phase, VEC=vector, **vocab_launch_config(vocab))
    return out
