"""Group-relative sentence advantages (``reference.group_sentence_advantages`` states them).

The backend is chosen like the loss's (``ops/backends.py``): CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``) use the Triton kernel of ``ops/triton/group_advantages.py``; CPU tensors the C++ loop of
the native backend when it is built, else the torch backend (``ops/torch/group_advantages.py``).
"""

from __future__ import annotations

import torch

from . import ops, reference
from .config import (
    ADVANTAGE_BASELINES,
    ADVANTAGE_MODES,
    ADVANTAGE_SCALES,
    ADVANTAGE_WEIGHTINGS,
    _check_choice,
    _check_real,
)
from .distributed import gather_rows


def group_sentence_advantages(rewards: torch.Tensor, num_sentences: torch.Tensor, group_size: int, *,
                              eps: float = 1e-4, weighting: str = "output", scale: str = "std",
                              mode: str = "sentence", answer_mix: float = 0.0, baseline: str = "pooled",
                              backend: str = "auto", process_group=None) -> torch.Tensor:
    """Normalise sentence rewards within each group of ``group_size`` consecutive outputs.

    Args:
        rewards: ``[B, S_max]`` float, ``rewards[b, s]`` the reward of sentence ``s`` of output ``b``;
            entries at ``s >= num_sentences[b]`` are ignored.
        num_sentences: ``[B]`` int in ``[0, S_max]``, the number of sentences of each output.
        group_size: ``G``, the number of sampled outputs per prompt; must divide ``B``.
        eps: added to the group standard deviation (``> 0`` when ``scale="std"``).
        weighting: ``"output"`` (the seed: every output weighs the same whatever its number of
            sentences) or ``"sentence"`` (every sentence of the group weighs the same).
        scale: ``"std"`` divides by ``σ + eps``; ``"unbiased_std"`` by ``σ·sqrt(W / (W − 1)) + eps`` with ``W``
            the group's total weight (Bessel's correction: ``torch.std`` and verl's ``grpo`` at one sentence per
            output; computed by the reference whatever the backend); ``"none"`` only subtracts the group mean.
        mode: ``"sentence"`` (each sentence its own normalised reward) or ``"cumulative"`` (sentence
            ``s`` gets the sum of the normalised rewards of sentences ``s .. S_b - 1``).
        answer_mix: ``α`` in ``[0, 1]``, the seed's multi-scale fusion ``Â = (1 − α)·Â_sentence + α·Â_answer``:
            ``Â_sentence`` the advantages the options above give, ``Â_answer`` the answer's mean sentence reward
            normalised over the answers of its group (by ``scale``, every answer weighing 1), given to each of its
            sentences. ``0`` (default): the sentence level; ``1``: every sentence its answer's advantage.
        baseline: ``"pooled"`` (the seed: one mean and spread over every sentence of the group) or
            ``"split_final"``: the last sentence of each answer (its answer line, where it stops) is normalised
            among the group's last sentences and every other sentence among the group's other sentences, each pool
            with its own mean and spread. Under the pooled baseline a final sentence that is harder to get right
            than a step (a final answer) has a systematically negative advantage, which on long chains teaches the
            policy not to stop (``docs/design.md``, "Group advantages"); the split removes that offset.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"torch"`` (``sgrpo_kernels.backends``).
        process_group: a ``torch.distributed`` group whose ranks each hold a contiguous slice of the global
            batch (rank 0 the first rows), so that a group of ``G`` answers may straddle two ranks; the
            statistics are then computed on the gathered global batch.

    Returns:
        ``[B, S_max]`` advantages in the dtype of ``rewards``; 0 where ``s >= num_sentences[b]``.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, S_max], got {tuple(rewards.shape)}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must have a floating dtype, got {rewards.dtype}")
    if not isinstance(num_sentences, torch.Tensor):
        raise TypeError(f"num_sentences must be a torch.Tensor, got {type(num_sentences).__name__}")
    if num_sentences.dtype.is_floating_point or num_sentences.dtype == torch.bool:
        raise TypeError(f"num_sentences must have an integer dtype, got {num_sentences.dtype}")
    batch, num_slots = rewards.shape
    if tuple(num_sentences.shape) != (batch,):
        raise ValueError(f"num_sentences must have shape [B] = ({batch},), got {tuple(num_sentences.shape)}")
    if num_sentences.device != rewards.device:
        raise ValueError(f"num_sentences is on {num_sentences.device} but rewards is on {rewards.device}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if process_group is None and batch % group_size:
        raise ValueError(f"group_size must divide the batch: B={batch} is not a multiple of {group_size}")
    if num_sentences.numel() and (int(num_sentences.min()) < 0 or int(num_sentences.max()) > num_slots):
        raise ValueError(f"num_sentences must lie in [0, S_max={num_slots}], "
                         f"got values in [{int(num_sentences.min())}, {int(num_sentences.max())}]")
    _check_choice("weighting", weighting, ADVANTAGE_WEIGHTINGS)
    _check_choice("scale", scale, ADVANTAGE_SCALES)
    _check_choice("mode", mode, ADVANTAGE_MODES)
    _check_choice("baseline", baseline, ADVANTAGE_BASELINES)
    eps = _check_real("eps", eps, low=0.0, low_inclusive=scale == "none")
    answer_mix = _check_real("answer_mix", answer_mix, low=0.0)
    if answer_mix > 1:
        raise ValueError(f"answer_mix must lie in [0, 1], got {answer_mix}")
    name = ops.resolve_backend(backend, rewards.device).name
    if process_group is not None:      # every rank checked its own rows above; the global batch is checked there
        return _across_ranks(rewards, num_sentences, group_size, process_group, eps=eps, weighting=weighting,
                             scale=scale, mode=mode, answer_mix=answer_mix, baseline=baseline, backend=name)
    if name != "reference":
        out = ops.group_advantages(rewards, num_sentences, group_size, name, eps=eps, weighting=weighting,
                                   scale=scale, mode=mode, answer_mix=answer_mix, baseline=baseline)
        if out is not None:
            return out
    return reference.group_sentence_advantages(rewards, num_sentences.long(), group_size, eps=eps,
                                               weighting=weighting, scale=scale, mode=mode, answer_mix=answer_mix,
                                               baseline=baseline)


def _across_ranks(rewards, num_sentences, group_size, process_group, **options):
    """Gather every rank's rows, normalise the global batch, return this rank's rows."""
    all_rewards, offset = gather_rows(rewards, process_group)
    all_counts, _ = gather_rows(num_sentences, process_group)
    advantages = group_sentence_advantages(all_rewards, all_counts, group_size, **options)
    return advantages[offset:offset + rewards.shape[0], :rewards.shape[1]].contiguous()
