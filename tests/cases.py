"""Random loss inputs shared by the tests: padding, empty sentences and unscored rows included."""

from __future__ import annotations

import os
import sys

import torch


def random_segments(batch: int, length: int, num_slots: int, generator: torch.Generator,
                    empty_row: bool = True) -> torch.Tensor:
    """``[B, T]`` non-decreasing segment ids in ``[0, num_slots)`` with random skips (empty sentences),
    a random amount of right padding (``-1``) per row and, if ``empty_row``, one row with no scored token."""
    steps = (torch.rand(batch, length, generator=generator) < 0.3).long()
    steps[:, 0] = 0
    skips = (torch.rand(batch, length, generator=generator) < 0.15).long()   # skipping an id leaves it empty
    segment_ids = torch.cumsum(steps * (1 + skips), dim=1).clamp(max=num_slots - 1)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=generator)
    segment_ids[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = -1
    if empty_row and batch > 1:
        segment_ids[batch - 1] = -1
    return segment_ids


def random_case(batch=3, length=9, vocab=13, num_slots=6, dtype=torch.float64, seed=0, per_row_advantages=False,
                with_old=True, with_ref=True, old_spread=0.3, empty_row=True):
    """A dict of loss inputs; ``logits`` is a leaf that requires grad. Unscored ids are -100 on purpose."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=generator) * 2).to(dtype).requires_grad_()
    segment_ids = random_segments(batch, length, num_slots, generator, empty_row=empty_row)
    completion_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    completion_ids[segment_ids < 0] = -100
    with torch.no_grad():
        true_logps = torch.log_softmax(logits.double(), -1).gather(-1, completion_ids.clamp(min=0).unsqueeze(-1))
        true_logps = true_logps.squeeze(-1)
    noise = lambda: torch.randn(batch, length, generator=generator, dtype=torch.float64) * old_spread
    old_logps = (true_logps + noise()).to(torch.float32 if dtype != torch.float64 else dtype) if with_old else None
    ref_logps = (true_logps + noise()).to(torch.float32 if dtype != torch.float64 else dtype) if with_ref else None
    shape = (batch,) if per_row_advantages else (batch, num_slots)
    advantages = torch.randn(*shape, generator=generator, dtype=torch.float64).to(
        torch.float32 if dtype != torch.float64 else dtype)
    return dict(logits=logits, completion_ids=completion_ids, segment_ids=segment_ids, advantages=advantages,
                old_logps=old_logps, ref_logps=ref_logps)


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max |actual - expected| <= rel * max(|expected|, tiny): relative error of the tensor as a whole."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp(min=1e-30) if expected.numel() else torch.tensor(1.0, dtype=torch.float64)
    error = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0, dtype=torch.float64)
    assert error <= rel * scale, f"{what}: max abs error {error.item():.3e} > {rel:g} * {scale.item():.3e}"


# Where the Triton backend runs in the tests: CUDA when there is a device, else the CPU interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_unavailable() -> str | None:
    """Why the native backend (the C++ extension) cannot be tested here, or ``None``."""
    from sgrpo_kernels.ops.native.extension import unavailable_reason
    return unavailable_reason()


def device_of(backend: str) -> torch.device:
    """The device whose tensors a backend is tested on ("triton" and Liger: KERNEL_DEVICE; others: CPU)."""
    return KERNEL_DEVICE if backend in ("triton", "liger") else torch.device("cpu")


def moved(case: dict, device: torch.device) -> dict:
    """The case on ``device``; ``logits`` becomes a fresh leaf that requires grad."""
    result = {key: value.detach().to(device) if isinstance(value, torch.Tensor) else value
              for key, value in case.items()}
    result["logits"].requires_grad_()
    return result


def train_byte_level_bpe(corpus: list[str], vocab_size: int, repeat: int = 20):
    """A Hugging Face fast tokenizer trained here: byte-level BPE without the pre-tokenizer's regex, so
    merges span spaces, dots and newlines (they cross sentence boundaries); ``<eos>`` and ``<pad>``."""
    import tokenizers
    import transformers

    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(corpus * repeat, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>", pad_token="<pad>")


def leave_worker() -> None:
    """End a spawned test worker without running C++ static destructors: after a step on gloo (FSDP2, or an
    accelerate-launched TRL trainer) about one exit in eight aborts there ("terminate called without an active
    exception", no Python frame), after the test has passed and reported. Errors are already in the queue
    (SimpleQueue writes synchronously)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_worker(rank, world, init_file, test, errors):
    import traceback

    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        test(rank, world)
    except BaseException:                                    # report to the parent instead of hanging it
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    leave_worker()


def run_on_ranks(test, tmp_path, world: int = 2) -> None:
    """``test(rank, world)`` in ``world`` spawned gloo processes; fails with every rank's traceback."""
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "rendezvous"), test, errors), nprocs=world, join=True)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)


def rank_only(test, rank, world):
    """Adapter for ``functools.partial(rank_only, test)``: a ``test(rank)`` under :func:`run_on_ranks`."""
    test(rank)
