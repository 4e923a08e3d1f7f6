"""Pass A (one read of the logits: log-prob, logsumexp, entropy) and pass C (the logits gradient) in Triton.

A program handles one token row of ``[B, T, V]`` logits, addressed as ``b * stride_b + t * stride_t``
with int64 arithmetic, on a 1-D grid of ``B * T`` programs: no grid axis caps ``T`` and no offset wraps
at ``2**31``. Logits are read in their dtype; everything is accumulated in fp32 (fp64 for fp64 logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import accumulator_dtype, check_row_layout, float_vector, index_vector, new_output

NEG_INF = tl.constexpr(float("-inf"))


MIN_BLOCK_V = 256
MAX_BLOCK_V = 4096
MAX_VOCAB = 262_144   # the largest vocabulary whose launch choices the build check sweeps (ops/kernel_builds.py)


def vocab_launch_config(vocab: int) -> dict:
    """Tile width ``BLOCK_V`` and ``num_warps`` of passes A and C for a vocabulary of ``vocab`` entries."""
    return dict(BLOCK_V=min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V), num_warps=8)


def launch_choices() -> dict[str, list[dict]]:
    """Every ``vocab_launch_config`` the launchers below can pick for ``V`` in ``1 .. MAX_VOCAB``, per kernel."""
    configs = {tuple(sorted(vocab_launch_config(vocab).items())) for vocab in range(1, MAX_VOCAB + 1)}
    choices = [dict(config) for config in sorted(configs)]
    return {"_logsumexp_kernel": choices, "_logits_grad_kernel": choices}


@triton.jit
def _logsumexp_kernel(logits_ptr, ids_ptr, segment_ids_ptr, logp_ptr, lse_ptr, entropy_ptr,
                      length, vocab, stride_batch, stride_time, temperature,
                      ONLY_SCORED: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ONLY_SCORED:
        if tl.load(segment_ids_ptr + row) < 0:
            return
    row_start = logits_ptr + (row // length) * stride_batch + (row % length) * stride_time
    acc_dtype = logp_ptr.dtype.element_ty
    # Online logsumexp kept per lane (no reduction inside the loop): lane_sum = Σ exp(z - lane_max),
    # lane_weighted = Σ exp(z - lane_max) · z for the entropy. -inf logits contribute 0, NaN propagates.
    lane_max = tl.full([BLOCK_V], NEG_INF, acc_dtype)
    lane_sum = tl.zeros([BLOCK_V], acc_dtype)
    lane_weighted = tl.zeros([BLOCK_V], acc_dtype)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_start + cols, mask=cols < vocab, other=NEG_INF).to(acc_dtype) / temperature
        new_max = tl.maximum(lane_max, z)
        safe_max = tl.where(new_max == NEG_INF, 0.0, new_max)
        rescale = tl.exp(lane_max - safe_max)
        term = tl.exp(z - safe_max)
        lane_sum = lane_sum * rescale + term
        if WITH_ENTROPY:
            lane_weighted = lane_weighted * rescale + tl.where(z == NEG_INF, 0.0, term * z)
        lane_max = new_max
    row_max = tl.max(lane_max, 0)
    safe_row_max = tl.where(row_max == NEG_INF, 0.0, row_max)
    lane_scale = tl.exp(lane_max - safe_row_max)
    total = tl.sum(lane_sum * lane_scale, 0)
    lse = safe_row_max + tl.log(total)
    token = tl.load(ids_ptr + row).to(tl.int64)
    logp = tl.load(row_start + token).to(acc_dtype) / temperature - lse
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:   # H = lse - Σ p z
        tl.store(entropy_ptr + row, lse - tl.sum(lane_weighted * lane_scale, 0) / total)


@triton.jit
def _logits_grad_kernel(logits_ptr, grad_ptr, ids_ptr, logp_coef_ptr, lse_ptr, entropy_coef_ptr, entropy_ptr,
                        length, vocab, stride_batch, stride_time, grad_stride_batch, grad_stride_time, temperature,
                        WITH_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # grad_z = c · (onehot(id) − p) − c_H · p · (log p + H),  z = logits / T,  grad_logits = grad_z / T
    row = tl.program_id(0).to(tl.int64)
    batch_index = row // length
    time_index = row % length
    row_start = logits_ptr + batch_index * stride_batch + time_index * stride_time
    grad_start = grad_ptr + batch_index * grad_stride_batch + time_index * grad_stride_time
    acc_dtype = lse_ptr.dtype.element_ty
    coef = tl.load(logp_coef_ptr + row).to(acc_dtype)
    zero_row = coef == 0
    if WITH_ENTROPY_GRAD:
        entropy_coef = tl.load(entropy_coef_ptr + row).to(acc_dtype)
        zero_row = zero_row & (entropy_coef == 0)
    if zero_row:
        # Unscored or fully clipped token: a zero row, without reading the logits or the (unwritten) lse.
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_start + cols, tl.zeros([BLOCK_V], acc_dtype).to(grad_ptr.dtype.element_ty),
                     mask=cols < vocab)
    else:
        lse = tl.load(lse_ptr + row)
        token = tl.load(ids_ptr + row).to(tl.int64)
        entropy = 0.0
        if WITH_ENTROPY_GRAD:
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < vocab
            z = tl.load(row_start + cols, mask=in_vocab, other=0.0).to(acc_dtype) / temperature
            log_p = z - lse
            p = tl.exp(log_p)
            grad = coef * (tl.where(cols == token, 1.0, 0.0) - p)
            if WITH_ENTROPY_GRAD:
                grad -= entropy_coef * tl.where(p == 0, 0.0, p * (log_p + entropy))
            tl.store(grad_start + cols, (grad / temperature).to(grad_ptr.dtype.element_ty), mask=in_vocab)


def logsumexp_pass(logits: torch.Tensor, ids: torch.Tensor, temperature: float, *,
                   segment_ids: torch.Tensor | None = None, with_entropy: bool = False):
    """Pass A over ``[B, T, V]`` logits (vocabulary dimension contiguous).

    Returns flat ``[B*T]`` tensors ``(logp, lse, entropy or None)`` in the accumulator dtype. With
    ``segment_ids``, rows whose segment is ``< 0`` are skipped and their outputs left unwritten.
    """
    check_row_layout("logits", logits)
    batch, length, vocab = logits.shape
    rows = batch * length
    dtype = accumulator_dtype(logits.dtype)
    logp = new_output((rows,), dtype, logits.device)
    lse = new_output((rows,), dtype, logits.device)
    entropy = new_output((rows,), dtype, logits.device) if with_entropy else None
    if rows == 0:
        return logp, lse, entropy
    ids = index_vector(ids)
    segments = ids if segment_ids is None else index_vector(segment_ids)
    _logsumexp_kernel[(rows,)](
        logits, ids, segments, logp, lse, entropy if with_entropy else lse,
        length, vocab, logits.stride(0), logits.stride(1), float(temperature),
        ONLY_SCORED=segment_ids is not None, WITH_ENTROPY=with_entropy, **vocab_launch_config(vocab))
    return logp, lse, entropy


def logits_grad_pass(logits: torch.Tensor, ids: torch.Tensor, logp_coef: torch.Tensor, lse: torch.Tensor,
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
    _logits_grad_kernel[(rows,)](
        logits, out, index_vector(ids), float_vector(logp_coef, lse.dtype), lse,
        float_vector(entropy_coef, lse.dtype) if with_entropy else lse, entropy if with_entropy else lse,
        length, vocab, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), float(temperature),
        WITH_ENTROPY_GRAD=with_entropy, **vocab_launch_config(vocab))
    return out
