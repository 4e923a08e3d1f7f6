"""Multi-process helpers: the loss and the group advantages over a batch spread across ``torch.distributed`` ranks.

Each rank holds a contiguous slice of the global batch (rank 0 the first rows). The reduction denominators
(``B'`` rows with a sentence, ``Σ n`` scored tokens) are summed over the ranks, and every rank's loss is scaled
by the world size ``W``: then the mean of the rank losses is the loss of the global batch, and the gradient
that DDP/FSDP average over ranks is exactly the gradient of that global loss.
"""

from __future__ import annotations

import torch


def world_size(process_group) -> int:
    """1 without a process group, else its size."""
    if process_group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(process_group)


def global_sum(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``process_group`` (``tensor`` itself without one)."""
    return _all_reduced(tensor, process_group, "SUM")


def global_max(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over the ranks of ``process_group`` (``tensor`` itself without one)."""
    return _all_reduced(tensor, process_group, "MAX")


def _all_reduced(tensor: torch.Tensor, process_group, operation: str) -> torch.Tensor:
    if process_group is None:
        return tensor
    import torch.distributed as dist
    total = tensor.clone()
    dist.all_reduce(total, op=getattr(dist.ReduceOp, operation), group=process_group)
    return total


def gather_rows(tensor: torch.Tensor, process_group) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``tensor`` along dim 0 (shapes may differ: dims > 0 are zero-padded to the widest).

    Returns the global tensor and the offset of this rank's rows in it.
    """
    import torch.distributed as dist

    size = world_size(process_group)
    shape = torch.tensor(list(tensor.shape), device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape, group=process_group)
    widest = torch.stack(shapes).amax(0).tolist()
    padded = torch.zeros(widest, dtype=tensor.dtype, device=tensor.device)
    padded[tuple(slice(0, extent) for extent in tensor.shape)] = tensor
    pieces = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded, group=process_group)
    rank = dist.get_rank(process_group)
    rows = [int(each[0]) for each in shapes]
    return torch.cat([piece[:count] for piece, count in zip(pieces, rows)]), sum(rows[:rank])


_GROUPS_BY_NAME: dict[str, object] = {}


def group_name(process_group) -> str | None:
    """A string that stands for ``process_group`` in a custom op's arguments (ops take no process groups)."""
    if process_group is None:
        return None
    name = f"{type(process_group).__name__}:{id(process_group)}"
    _GROUPS_BY_NAME[name] = process_group
    return name


def group_from_name(name: str | None):
    """The process group :func:`group_name` named (``None`` for ``None``)."""
    return None if name is None else _GROUPS_BY_NAME[name]


def sequence_slice(local_tokens: int, sp_group, device: torch.device) -> tuple[int, int]:
    """Where this rank's contiguous slice of a packed sequence split over ``sp_group`` starts, and the length of
    the whole sequence: the slices lie in rank order, so the start is the sum of the lower ranks' token counts
    (one all-gather of one int64 per rank, on ``device``). Without a group: ``(0, local_tokens)``."""
    if sp_group is None:
        return 0, local_tokens
    import torch.distributed as dist

    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(sp_group))]
    dist.all_gather(gathered, torch.full((1,), int(local_tokens), dtype=torch.int64, device=device), group=sp_group)
    counts = [int(count) for count in torch.cat(gathered).tolist()]
    return sum(counts[:dist.get_rank(sp_group)]), sum(counts)
