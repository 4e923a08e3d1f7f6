"""Vocabulary-parallel passes: the logits (or the LM head) sharded over the vocabulary across a process group.

Rank ``r`` of the tensor-parallel group holds the contiguous vocabulary range ``[start_r, start_r + V_r)`` in rank
order (Megatron's layout; shards may be uneven). Pass A needs from the whole vocabulary only three numbers per
token, and pass C none:

- each rank runs its backend's pass A on its shard: ``lse_r``, ``H_r`` (the entropy of its shard's own softmax)
  and the target logit where it owns the target;
- one all-reduce (max) of ``lse_r`` gives ``m``, one all-reduce (sum) of ``[B*T, 3]`` gives
  ``Σ_r e^{lse_r − m}``, the owner's ``z_id / T`` and ``Σ_r e^{lse_r − m} (lse_r − H_r)``; then
  ``lse = m + log Σ_r e^{lse_r − m}``, ``logp = z_id / T − lse`` and ``H = lse − Σ_r w_r (lse_r − H_r)`` with
  ``w_r = e^{lse_r − lse}`` (``lse_r − H_r`` is the mean of ``z / T`` under the shard's softmax);
- pass C is local: the backend's kernel with the global ``lse`` and ``H`` gives each rank exactly its columns of
  the gradient, except that a rank not owning a row's target must not add the one-hot term: that one element
  per row is rewritten from its saved logit.

Communication per call: the shard sizes (one int per rank), ``N`` floats (max) and ``3N`` (sum), never
``O(N·V)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .passes import TokenScores


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, start + size)`` of a vocabulary of ``total`` ids, and the group it is split
    over."""

    group: object
    start: int
    size: int
    total: int
    sum_hidden_gradient: bool = True      # fused linear path: all-reduce the gradient of the hidden states


def vocab_shard(local_vocab: int, group, device: torch.device, vocab_start: int | None = None,
                sum_hidden_gradient: bool = True) -> VocabShard:
    """Every rank's shard size (one all-gather of one int64 on ``device``, the logits' device, which the group's
    backend serves: no pickling), hence this rank's start (unless given) and the size of the whole vocabulary."""
    import torch.distributed as dist

    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, torch.full((1,), int(local_vocab), dtype=torch.int64, device=device), group=group)
    sizes = [int(size) for size in torch.cat(gathered).tolist()]
    rank = dist.get_rank(group)
    start = sum(sizes[:rank]) if vocab_start is None else int(vocab_start)
    total = sum(sizes)
    if not 0 <= start <= total - local_vocab:
        raise ValueError(f"vocab_start_index={start} puts this rank's {local_vocab} ids outside the vocabulary of "
                         f"{total} (the sum of the shards)")
    return VocabShard(group, start, int(local_vocab), total, sum_hidden_gradient)


class VocabParallelPasses:
    """A backend's passes on this rank's vocabulary shard, combined over ``shard.group`` (module docstring)."""

    def __init__(self, inner, shard: VocabShard):
        self.inner, self.shard = inner, shard

    def __getattr__(self, name):                      # pass B and the group advantages know nothing of vocabularies
        return getattr(self.inner, name)

    def _local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids shifted into the shard and clamped to it, whether this rank owns the id)``."""
        local = ids - self.shard.start
        owned = (local >= 0) & (local < self.shard.size)
        return local.clamp(0, self.shard.size - 1), owned

    def token_scores(self, logits, ids, temperature: float, *, segment_ids=None, with_entropy: bool = False):
        import torch.distributed as dist

        local, owned = self._local(ids)
        scores = self.inner.token_scores(logits, local, temperature, segment_ids=segment_ids,
                                         with_entropy=with_entropy)
        local_lse = scores.lse
        shift = local_lse.clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=self.shard.group)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        weight = torch.exp(local_lse - shift)
        target = torch.where(owned.reshape(-1), scores.logp + local_lse, 0.0)      # z_id / T on the owner
        columns = [weight, target]
        if with_entropy:    # e^{lse_r − m} · E_r[z/T]; a shard whose logits are all −inf has weight 0
            columns.append(torch.where(weight > 0, weight * (local_lse - scores.entropy), 0.0))
        packed = torch.stack(columns, 1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.shard.group)
        lse = shift + torch.log(packed[:, 0])
        logp = packed[:, 1] - lse
        entropy = lse - packed[:, 2] / packed[:, 0] if with_entropy else None
        return TokenScores(logp, lse, entropy)

    def logits_gradient(self, logits, ids, logp_coef, lse, temperature: float, out, *, entropy_coef=None,
                        entropy=None):
        local, owned = self._local(ids)
        index = local.unsqueeze(-1)
        saved = logits.gather(-1, index).to(lse.dtype).reshape(-1)      # before an in-place pass C overwrites it
        self.inner.logits_gradient(logits, local, logp_coef, lse, temperature, out, entropy_coef=entropy_coef,
                                   entropy=entropy)
        # where this rank does not own the target, the kernel's element at the clamped id wrongly holds the one-hot
        # term: rewrite it as (−coef · p − entropy_coef · p (log p + H)) / T
        log_p = saved / temperature - lse
        p = torch.exp(log_p)
        value = -logp_coef * p
        if entropy_coef is not None:
            value = value - torch.where(p > 0, entropy_coef * p * (log_p + entropy), 0.0)
        value = (value / temperature).reshape(index.shape)
        active = logp_coef != 0 if entropy_coef is None else (logp_coef != 0) | (entropy_coef != 0)
        rewrite = ~owned.unsqueeze(-1) & active.reshape(index.shape)     # rows without coefficients hold zeros
        kept = out.gather(-1, index)
        out.scatter_(-1, index, torch.where(rewrite, value.to(out.dtype), kept))
        return out
