"""Fused linear path: the loss from hidden states and the LM head, never holding more than one chunk of logits.

The scored tokens are ordered by sentence and packed greedily into chunks of at most ``chunk_size`` tokens
that hold whole sentences. For such a chunk the loss gradient is finished in one visit, because every
coefficient of a token depends only on its own sentence and the reduction weights are known from
``segment_ids`` alone: ``logits = h @ Wᵀ + b`` (2·C·H·V flops), passes A, B and C of the backend on the
chunk (the gradient of the logits overwrites them), then ``grad_h = g @ W`` and ``grad_W += gᵀ @ h``
(4·C·H·V). A sentence longer than a chunk is visited twice: once for its log-probs, once, after its ratio
is known, to recompute its logits and finish its gradient (8·C·H·V for those tokens).

Matmuls run in PyTorch (cuBLAS on GPU); the passes are the backend's (Triton kernels or chunked PyTorch).
``grad_weight`` and ``grad_bias`` accumulate in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .driver import (
    LossOutputs,
    clip_inputs,
    entropy_bonus_coefficients,
    masks_needed,
    needs_entropy,
    policy_token_weights,
    request_layout,
    returned_scores,
    sequence_total,
    total_sentence_sums,
)
from .layout import SentenceArrays, SentenceSums, sentence_metrics
from .passes import Passes, TokenScores, accumulator_dtype, new_output
from .rows import RowInputs

CPU_CHUNK_BYTES = 32 * 2**20
GPU_CHUNK_BYTES_MAX = 2**30
VOCAB_BLOCK = 16384        # rows of grad_weight per product when the product needs an fp32 temporary


def default_chunk_size(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: chunk logits of about 32 MiB on CPU; on GPU an eighth of the free memory, at most 1 GiB."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(free_bytes // 8, GPU_CHUNK_BYTES_MAX)
    else:
        budget = CPU_CHUNK_BYTES
    bytes_per_row = vocab * max(torch.finfo(dtype).bits // 8, 4 if device.type == "cpu" else 2)
    return int(max(16, min(budget // bytes_per_row, 65536)))


@dataclass
class ChunkPlan:
    """Flat token positions: ``whole`` chunks of whole sentences, and per long sentence its list of pieces."""

    whole: list[torch.Tensor]
    long: list[list[torch.Tensor]]


def plan_chunks(segment_ids: torch.Tensor, num_slots: int, chunk_size: int,
                revisit: torch.Tensor | None = None) -> ChunkPlan:
    """Order the scored tokens by sentence and pack whole sentences greedily into chunks of ``chunk_size``;
    a sentence longer than a chunk, or one that ``revisit`` (bool per slot) marks, gets its own pieces."""
    length = segment_ids.shape[1]
    segments = segment_ids.reshape(-1)
    positions = torch.nonzero(segments >= 0).squeeze(1)
    slots = (positions // length) * num_slots + segments[positions].long()
    order = torch.sort(slots, stable=True).indices
    tokens = positions[order]
    sentences, sizes = torch.unique_consecutive(slots[order], return_counts=True)
    marked = [False] * sentences.numel() if revisit is None else revisit[sentences].tolist()
    whole, long = [], []
    chunk_start = chunk_end = 0
    for size, revisited in zip(sizes.tolist(), marked):
        if size > chunk_size or revisited:  # a long sentence: its own pieces, visited twice
            if chunk_end > chunk_start:
                whole.append(tokens[chunk_start:chunk_end])
            long.append(list(tokens[chunk_end:chunk_end + size].split(chunk_size)))
            chunk_start = chunk_end = chunk_end + size
            continue
        if chunk_end + size - chunk_start > chunk_size:
            whole.append(tokens[chunk_start:chunk_end])
            chunk_start = chunk_end
        chunk_end += size
    if chunk_end > chunk_start:
        whole.append(tokens[chunk_start:chunk_end])
    return ChunkPlan(whole, long)


def accumulate_product(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``accumulator += left @ right`` with the product never rounded to the dtype of bf16/fp16 operands.

    accumulator ``[M, N]`` fp32 (or the operands' dtype), left ``[M, K]``, right ``[K, N]``. Rounding each
    chunk's ``gᵀh`` to bf16 before adding it would lose what chunks nearly cancel (``tests/test_fused_linear.py``).
    The fastest form the installed PyTorch and device offer: ``addmm`` into the fp32 accumulator
    (``out_dtype``), else ``mm`` to fp32 a block of rows at a time, else operands upcast to fp32 (CPU).
    """
    if left.dtype == accumulator.dtype:
        accumulator.addmm_(left, right)                         # no [M, N] temporary
        return
    route = _mixed_product_route(accumulator.device)
    if route == "addmm":
        torch.addmm(accumulator, left, right, out_dtype=accumulator.dtype, out=accumulator)
        return
    for start in range(0, accumulator.shape[0], VOCAB_BLOCK):   # small temporaries: a block of rows at a time
        block = slice(start, start + VOCAB_BLOCK)
        if route == "mm":
            accumulator[block] += torch.mm(left[block], right, out_dtype=accumulator.dtype)
        else:
            accumulator[block].addmm_(left[block].to(accumulator.dtype), right.to(accumulator.dtype))


@functools.lru_cache(maxsize=None)
def _mixed_product_route(device: torch.device) -> str:
    """Which fp32-output product of bf16 operands works on ``device``: "addmm", "mm" or "upcast"."""
    left = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    accumulator = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(accumulator, left, left, out_dtype=torch.float32, out=accumulator)
        if accumulator.eq(2).all():
            return "addmm"
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    try:
        if torch.mm(left, left, out_dtype=torch.float32).eq(2).all():
            return "mm"
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    return "upcast"


class _LinearHead:
    """``hidden [N, H]`` rows times ``weight [V, H]`` (+ bias), and the gradient buffers of those three."""

    def __init__(self, hidden, weight, bias, wanted=(False, False, False)):
        """``wanted``: which of hidden, weight, bias need a gradient."""
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight, self.bias = weight, bias
        self.grad_hidden = torch.zeros_like(self.hidden) if wanted[0] else None
        accumulator = accumulator_dtype(weight.dtype)      # fp32 (fp64 for fp64 weights)
        self.grad_weight = torch.zeros(weight.shape, dtype=accumulator, device=weight.device) if wanted[1] else None
        self.grad_bias = (torch.zeros(weight.shape[0], dtype=accumulator, device=weight.device)
                          if wanted[2] and bias is not None else None)

    def logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.hidden[tokens]
        logits = rows @ self.weight.T
        if self.bias is not None:
            logits += self.bias
        return rows, logits

    def accumulate(self, tokens: torch.Tensor, rows: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """Chain ``∂loss/∂logits`` of a chunk into the gradients of hidden, weight and bias."""
        if self.grad_hidden is not None:
            self.grad_hidden[tokens] = grad_logits @ self.weight
        if self.grad_weight is not None:
            accumulate_product(self.grad_weight, grad_logits.T, rows)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0, dtype=self.grad_bias.dtype)

    def gradients(self, passes=None) -> tuple:
        """``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` in the accumulator dtype, ``None`` where
        not wanted. On a vocabulary shard (``passes.shard``) each rank's ``grad_hidden`` is its shard's part of
        the sum: all-reduced over the group here unless the caller's layer does it."""
        shard = getattr(passes, "shard", None)
        if shard is not None and shard.sum_hidden_gradient and self.grad_hidden is not None:
            import torch.distributed as dist
            dist.all_reduce(self.grad_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        return self.grad_hidden, self.grad_weight, self.grad_bias


class _ScoreBuffers:
    """Flat ``[B*T]`` log-probs, logsumexps and (optionally) entropies, filled chunk by chunk by pass A."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device, with_entropy: bool):
        self.logp = new_output((rows,), dtype, device)     # written only at the chunks' tokens, read only there
        self.lse = new_output((rows,), dtype, device)
        self.entropy = new_output((rows,), dtype, device) if with_entropy else None

    def score(self, passes: Passes, head: _LinearHead, ids: torch.Tensor, tokens: torch.Tensor, temperature: float):
        """Compute the chunk's logits, run pass A on them, store the results; return ``(rows, logits)``."""
        chunk_rows, logits = head.logits(tokens)
        logp, lse, entropy = passes.token_scores(logits.unsqueeze(0), ids[tokens].unsqueeze(0), temperature,
                                                 with_entropy=self.entropy is not None)
        self.logp[tokens], self.lse[tokens] = logp, lse
        if self.entropy is not None:
            self.entropy[tokens] = entropy
        return chunk_rows, logits


def run_fused_linear_loss(passes: Passes, hidden, weight, bias, rows: RowInputs, request):
    """The loss (``docs/design.md``, "The loss") on ``logits = hidden @ weight.T + bias``, a chunk at a time.

    hidden ``[B, T, H]`` (a packed batch: its one row ``[1, N, H]``), weight ``[V, H]``, bias ``[V]`` or ``None``;
    ``rows`` the inputs, ``request`` the call (its ``grad_input``, ``grad_weight``, ``grad_bias`` say which
    gradients are wanted; a sentence shared with other ranks of the ``sp_group`` is visited twice, its gradient
    finished once its sums are summed over them). Returns ``(LossOutputs, (grad_hidden [N, H], grad_weight [V, H],
    grad_bias [V]) in the accumulator dtype with ``None`` where not wanted)``.
    """
    config = request.config
    wanted = (request.grad_input, request.grad_weight, request.grad_bias and bias is not None)
    batch, length, _ = hidden.shape
    dtype = accumulator_dtype(hidden.dtype)
    chunk_size = request.chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    segment_ids, num_slots = rows.segment_ids, rows.num_slots
    with torch.no_grad():
        head = _LinearHead(hidden, weight, bias, wanted)
        ids = rows.completion_ids.reshape(batch * length)
        layout = request_layout(rows, request, dtype)
        scores = _ScoreBuffers(batch * length, dtype, hidden.device, needs_entropy(request))
        plan = plan_chunks(segment_ids, num_slots, chunk_size, layout.shared)
        if masks_needed(config):
            # the masks need every token's log-prob (off-policy: the sentence's mean) or entropy (a quantile of
            # the batch) before any sentence is finished: a first visit of every chunk runs pass A only
            for tokens in [*plan.whole, *(piece for pieces in plan.long for piece in pieces)]:
                scores.score(passes, head, ids, tokens, config.temperature)
        token_weights, bonus_tokens, log_is = policy_token_weights(
            config, scores, segment_ids, num_slots, rows.advantages, rows.old_logps, rows.sampling_logps,
            rows.is_weights, request.process_group, rows.packing)
        sums = SentenceSums.zeros(layout, config, with_token_weights=token_weights is not None, log_is=log_is)
        coef_inputs, sums_inputs = clip_inputs(config, rows.old_logps, rows.advantages)
        entropy_coef = (entropy_bonus_coefficients(bonus_tokens, config, dtype, request.process_group, rows.packing)
                        if config.entropy_coef != 0 else None)

        def forward(tokens):
            chunk_rows, logits = scores.score(passes, head, ids, tokens, config.temperature)
            passes.sentence_sums(scores.logp, rows.old_logps, rows.ref_logps, segment_ids, num_slots, sums, config,
                                 tokens, token_weights=token_weights, **sums_inputs)
            return chunk_rows, logits

        def backward(tokens, chunk_rows, logits):
            terms = passes.sentence_terms(layout, sums, rows.advantages, config)
            coef = passes.token_coefficients(scores.logp, rows.ref_logps, segment_ids, num_slots, terms, config,
                                             tokens, token_weights=token_weights, **coef_inputs)
            grid = logits.unsqueeze(0)        # the gradient of the logits overwrites them
            entropy_options = {} if entropy_coef is None else dict(entropy_coef=entropy_coef[tokens],
                                                                   entropy=scores.entropy[tokens])
            passes.logits_gradient(grid, ids[tokens].unsqueeze(0), coef, scores.lse[tokens], config.temperature,
                                   grid, **entropy_options)
            head.accumulate(tokens, chunk_rows, logits)

        for tokens in plan.whole:
            chunk_rows, logits = forward(tokens)
            if any(wanted):
                backward(tokens, chunk_rows, logits)
            del chunk_rows, logits
        for tokens in (piece for pieces in plan.long for piece in pieces):
            forward(tokens)
        total_sentence_sums(sums, rows.packing)      # sentences shared with other ranks are complete from here
        if any(wanted):
            for tokens in (piece for pieces in plan.long for piece in pieces):
                backward(tokens, *head.logits(tokens))
        terms = passes.sentence_terms(layout, sums, rows.advantages, config)
        loss = terms.weighted_loss.sum()
        if entropy_coef is not None:
            loss = loss + sequence_total(rows.packing)(torch.where(bonus_tokens, entropy_coef * scores.entropy,
                                                                   0.0).sum())
        metrics = None
        if request.with_metrics:
            arrays = SentenceArrays(count=layout.count, ratio=terms.ratio, kl_sum=sums.kl,
                                    clipped_tokens=sums.clipped_tokens)
            metrics = sentence_metrics(arrays, rows.advantages, segment_ids.reshape(-1) >= 0, scores.entropy, config,
                                       sequence_total(rows.packing))
        token_scores = returned_scores(TokenScores(scores.logp, scores.lse, scores.entropy),
                                       segment_ids.reshape(-1) >= 0, request)
        return LossOutputs(loss, metrics, *token_scores), head.gradients(passes)


def fused_linear_token_scores(passes: Passes, hidden, weight, bias, ids, temperature: float, with_entropy: bool,
                              chunk_size: int):
    """Pass A on ``hidden @ weight.T + bias`` a chunk of ``chunk_size`` rows at a time: hidden ``[B, T, H]``,
    weight ``[V, H]``, bias ``[V]`` or ``None``, ids ``[B, T]`` -> flat ``[B*T]`` ``(logp, lse, entropy or None)``."""
    rows = ids.numel()
    with torch.no_grad():
        head = _LinearHead(hidden, weight, bias)
        scores = _ScoreBuffers(rows, accumulator_dtype(hidden.dtype), hidden.device, with_entropy)
        for tokens in torch.arange(rows, device=hidden.device).split(chunk_size):
            scores.score(passes, head, ids.reshape(rows), tokens, temperature)
    return scores.logp, scores.lse, scores.entropy


def fused_linear_token_scores_backward(passes: Passes, hidden, weight, bias, ids, grad_logp, grad_entropy, lse,
                                       entropy, temperature: float, chunk_size: int, wanted: tuple) -> tuple:
    """The gradients of ``Σ grad_logp · logp (+ grad_entropy · H)`` for hidden, weight and bias (``wanted``),
    recomputing each chunk's logits; ``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` in the
    accumulator dtype, ``None`` where not wanted. ``grad_logp``/``grad_entropy``: flat ``[B*T]`` or ``None``."""
    rows = ids.numel()
    with torch.no_grad():
        head = _LinearHead(hidden, weight, bias, wanted)
        flat_ids = ids.reshape(rows)
        logp_coef = (torch.zeros(rows, dtype=lse.dtype, device=lse.device) if grad_logp is None
                     else grad_logp.reshape(rows).to(lse.dtype))
        entropy_coef = None if grad_entropy is None else grad_entropy.reshape(rows).to(lse.dtype)
        for tokens in torch.arange(rows, device=hidden.device).split(chunk_size):
            chunk_rows, logits = head.logits(tokens)
            grid = logits.unsqueeze(0)
            passes.logits_gradient(grid, flat_ids[tokens].unsqueeze(0), logp_coef[tokens], lse[tokens], temperature,
                                   grid, entropy_coef=None if entropy_coef is None else entropy_coef[tokens],
                                   entropy=None if entropy_coef is None else entropy[tokens])
            head.accumulate(tokens, chunk_rows, logits)
    return head.gradients(passes)
