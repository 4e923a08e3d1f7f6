"""Long sequences as trainers feed them: one long packed answer, sequence parallelism, a length-skewed batch.

    python -m benchmarks.bench_long --preset quick   # CPU: T in {8k, 32k}, sp at 32k, a skew of 1024:102
    python -m benchmarks.bench_long --preset cpu     # CPU: one answer of 32k and 128k tokens, V=32000, H=512
    python -m benchmarks.bench_long --preset gpu     # CUDA, bf16: T in {32k, 128k}, V=151936, H=4096

Every point runs in a fresh process (and every sequence-parallel rank in one of its own): the time of one forward
and backward, and the peak memory above what the process held when the call began (CPU: the peak resident set,
reset before the call, large blocks straight from mmap; CUDA: ``max_memory_allocated``).

- ``long``: the fused linear loss (``native`` on CPU, ``triton`` on CUDA) on one packed answer of ``T`` tokens in
  sentences of about 40. ``extra`` is the call's peak above its inputs; ``beyond_gradients`` subtracts the
  gradients it returns (``hidden``'s ``[T, H]`` and the head's ``[V, H]`` fp32): the chunk of logits and ``O(T)``
  per-token scalars, flat in ``T`` but for those scalars.
- ``sp``: the same answer split over ``sp`` gloo ranks (``sp_group``; ``sp = 1`` is one such rank alone);
  ``rank_peak`` is a rank's peak above its state after import (its slice of ``hidden``, the head, the call), the
  largest over the ranks: its ``T``-dependent part falls as ``1/sp``, the head and its gradient are every rank's.
- ``skew``: ``B`` answers, one ``10×`` longer than the others, on the logits path (the logits made from hidden
  states inside the measured call, the gradient written in place), packed (``cu_seqlens``) against padded to the
  longest answer: memory and time follow the real tokens when packed, ``B · T_max`` when padded. Then the fused
  linear path at the same answers: this package's packed, and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (token
  level, ``beta = 0``, compiled as it ships, warmed up once at the same shape), which takes padded rows only.
- ``liger``: Liger-Kernel's fused linear GRPO loss on the long answer of ``long`` (one row of ``T`` tokens; its
  log-probabilities stream over tiles of 2048 tokens × 4096 vocabulary entries in 0.8.5).

On the CPU each child process may use at most ``--memory-limit-gib`` of address space: a point that needs more is
reported as an error (``can't allocate``) instead of waking the kernel's out-of-memory killer.

Writes ``bench_long.{csv,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgrpo_kernels as sk  # noqa: E402
from benchmarks import harness  # noqa: E402

SENTENCE = 40      # tokens per sentence of the long answers
PRESETS = {
    "quick": dict(device="cpu", dtype="float32", vocab=32000, hidden=512, long=[8192, 32768], sp_length=32768,
                  sp=[1, 2, 4], skew=dict(answers=8, longest=1024)),
    "cpu": dict(device="cpu", dtype="float32", vocab=32000, hidden=512, long=[32768, 131072], sp_length=131072,
                sp=[1, 2, 4], skew=dict(answers=8, longest=2048)),
    "gpu": dict(device="cuda", dtype="bfloat16", vocab=151936, hidden=4096, long=[32768, 131072],   # one GPU: no sp
                sp_length=131072, sp=[], skew=dict(answers=8, longest=8192)),
}


def packed_answers(lengths: list[int], vocab: int, generator: torch.Generator) -> dict:
    """Ids, segment ids (sentences of ``SENTENCE`` tokens), drifted old log-probs and advantages of packed answers."""
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    total = int(cu_seqlens[-1])
    answer = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(total) - cu_seqlens[:-1][answer]
    segment_ids = position // SENTENCE
    slots = max(1, -(-max(lengths) // SENTENCE))
    return dict(completion_ids=torch.randint(0, vocab, (total,), generator=generator), segment_ids=segment_ids,
                advantages=torch.randn(len(lengths), slots, generator=generator),
                old_logps=-8.0 + 0.1 * torch.randn(total, generator=generator), cu_seqlens=cu_seqlens)


def head(vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator):
    return (torch.randn(vocab, hidden, generator=generator) / hidden ** 0.5).to(device, dtype).requires_grad_()


def _start(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return harness.reset_cpu_peak()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return harness.cpu_peak_bytes()


def measured(call, device: torch.device) -> dict:
    """``{"seconds", "extra_bytes"}`` of one ``call()``."""
    before = _start(device)
    began = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return dict(seconds=time.perf_counter() - began, extra_bytes=_peak(device) - before)


def long_point(point: dict) -> dict:
    """One answer of ``length`` tokens through the fused linear loss, or this rank's slice of it (``sp_group``)."""
    device, dtype = torch.device(point["device"]), getattr(torch, point["dtype"])
    backend = "native" if device.type == "cpu" else "triton"
    generator = torch.Generator().manual_seed(0)
    batch = packed_answers([point["length"]], point["vocab"], generator)
    weight = head(point["vocab"], point["hidden"], dtype, device, generator)
    piece = slice(None)
    group = None
    if point.get("rank") is not None:
        import torch.distributed as dist
        group = dist.group.WORLD
        bounds = [point["length"] * rank // point["sp"] for rank in range(point["sp"] + 1)]
        piece = slice(bounds[point["rank"]], bounds[point["rank"] + 1])
    # only this rank's rows (a slice of the whole would keep the whole alive)
    rows = len(range(point["length"])[piece])
    hidden = torch.randn(rows, point["hidden"], generator=generator).to(device, dtype).requires_grad_()
    tensors = {name: value.to(device) if name in ("advantages", "cu_seqlens") else value[piece].to(device)
               for name, value in batch.items()}
    cu_seqlens = tensors.pop("cu_seqlens")

    def call():
        loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *tensors.values(), backend=backend, beta=0.0,
                                                  cu_seqlens=cu_seqlens, sp_group=group)
        loss.backward()
    result = measured(call, device)
    gradients = (hidden.numel() + weight.numel()) * hidden.element_size()     # Liger's are in the inputs' dtype
    return dict(result, beyond_gradients_bytes=result["extra_bytes"] - gradients, tokens=hidden.shape[0])


def liger_call(hidden: torch.Tensor, weight: torch.Tensor, batch: dict, mask: torch.Tensor, compiled: bool = True):
    """One forward and backward of Liger's fused linear GRPO loss on padded rows ``hidden`` ``[B, T, H]``, with each
    answer's advantage the mean of its sentences' (token level: one advantage per row)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    module = LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False, loss_type="grpo",
                                      importance_sampling_level="token")

    def call():
        loss, _ = module(hidden, weight, batch["completion_ids"], mask, batch["advantages"].mean(1),
                         old_per_token_logps=batch["old_logps"])
        loss.backward()
        hidden.grad = weight.grad = None
    return call


def liger_long_point(point: dict) -> dict:
    """The long answer of ``long_point`` through Liger's fused linear GRPO loss (one row), warmed up once."""
    device, dtype = torch.device(point["device"]), getattr(torch, point["dtype"])
    generator = torch.Generator().manual_seed(0)
    batch = packed_answers([point["length"]], point["vocab"], generator)
    weight = head(point["vocab"], point["hidden"], dtype, device, generator)
    hidden = torch.randn(1, point["length"], point["hidden"], generator=generator).to(device, dtype).requires_grad_()
    batch = {name: value.to(device) if name == "advantages" else value[None].to(device)
             for name, value in batch.items() if name != "cu_seqlens"}
    call = liger_call(hidden, weight, batch, torch.ones(1, point["length"], device=device),
                      point.get("compiled", True))
    call()                                                                   # torch.compile's first call
    result = measured(call, device)
    gradients = (hidden.numel() + weight.numel()) * hidden.element_size()     # Liger's are in the inputs' dtype
    return dict(result, beyond_gradients_bytes=result["extra_bytes"] - gradients, tokens=point["length"])


def _rank_main(rank: int, point: dict, results) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{point['rendezvous']}", rank=rank, world_size=point["sp"])
    start = harness.reset_cpu_peak()
    outcome = long_point(dict(point, rank=rank))
    outcome["rank_peak_bytes"] = harness.cpu_peak_bytes() - start
    results.put((rank, outcome))
    dist.barrier()
    dist.destroy_process_group()


def sp_point(point: dict) -> dict:
    """The long answer split over ``sp`` gloo ranks, each a fresh process: the largest rank's numbers."""
    import tempfile

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        point = dict(point, rendezvous=os.path.join(folder, "rendezvous"))
        mp.spawn(_rank_main, args=(point, results), nprocs=point["sp"], join=True)
    outcomes = [results.get()[1] for _ in range(point["sp"])]
    return {key: max(outcome[key] for outcome in outcomes) for key in outcomes[0]}


def skew_point(point: dict) -> dict:
    """``answers`` answers, one of ``longest`` tokens and the others a tenth of it, in ``point["layout"]``: the
    logits path (the logits made from hidden states inside the call) packed or padded to the longest answer, this
    package's fused linear path packed, or Liger's fused linear loss on the padded rows."""
    device, dtype = torch.device(point["device"]), getattr(torch, point["dtype"])
    backend = "native" if device.type == "cpu" else "triton"
    generator = torch.Generator().manual_seed(1)
    lengths = [point["longest"]] + [point["longest"] // 10] * (point["answers"] - 1)
    batch = packed_answers(lengths, point["vocab"], generator)
    weight = head(point["vocab"], point["hidden"], dtype, device, generator).detach()
    hidden = torch.randn(int(batch["cu_seqlens"][-1]), point["hidden"], generator=generator).to(device, dtype)
    cu_seqlens = batch.pop("cu_seqlens")
    if point["layout"] in ("padded", "liger-fused-padded"):
        from sgrpo_kernels.reference import pad_packed
        fills = dict(segment_ids=-1)
        batch = {name: value if name == "advantages" else pad_packed(value, cu_seqlens, fills.get(name, 0))
                 for name, value in batch.items()}
        hidden, cu_seqlens = pad_packed(hidden, cu_seqlens), None
    batch = {name: value.to(device) for name, value in batch.items()}
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(device)
    tokens = int(hidden.shape[:-1].numel())
    if point["layout"] == "liger-fused-padded":
        hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
        call = liger_call(hidden, weight, batch, (batch["segment_ids"] >= 0).to(dtype), point.get("compiled", True))
        call()                                                               # torch.compile's first call
        return dict(measured(call, device), tokens=tokens)
    if point["layout"] == "fused-packed":
        hidden, weight = hidden.requires_grad_(), weight.requires_grad_()

        def fused():
            loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *batch.values(), backend=backend, beta=0.0,
                                                      cu_seqlens=cu_seqlens)
            loss.backward()
        return dict(measured(fused, device), tokens=tokens)

    def call():
        logits = (hidden @ weight.T).requires_grad_()
        loss = sk.sentence_grpo_loss(logits, *batch.values(), backend=backend, inplace=True, cu_seqlens=cu_seqlens)
        loss.backward()
    return dict(measured(call, device), tokens=tokens)


POINTS = {"long": long_point, "sp": sp_point, "skew": skew_point, "liger": liger_long_point}
SKEW_LAYOUTS = ("packed", "padded", "fused-packed", "liger-fused-padded")


def points(preset: dict) -> list[dict]:
    common = {key: preset[key] for key in ("device", "dtype", "vocab", "hidden")}
    listed = [dict(common, kind="long", length=length) for length in preset["long"]]
    listed += [dict(common, kind="sp", length=preset["sp_length"], sp=sp) for sp in preset["sp"]]
    listed += [dict(common, kind="skew", layout=layout, **preset["skew"]) for layout in SKEW_LAYOUTS]
    listed += [dict(common, kind="liger", length=length) for length in preset["long"]]
    return listed


def child_main(point: dict) -> None:
    if point.get("memory_limit_gib"):
        import resource
        limit = int(point["memory_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(POINTS[point["kind"]](point)))


def describe(point: dict) -> str:
    if point["kind"] == "long":
        return f"one answer of {point['length']} tokens"
    if point["kind"] == "sp":
        return f"one answer of {point['length']} tokens over sp={point['sp']} ranks"
    if point["kind"] == "liger":
        return f"one answer of {point['length']} tokens, Liger's fused linear GRPO loss"
    return f"{point['answers']} answers, {point['longest']}:{point['longest'] // 10}, {point['layout']}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--only", nargs="+", choices=sorted(POINTS), help="run these kinds of point only")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0,
                        help="address space a point's process may use (0: no limit); beyond it the point fails")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        child_main(json.loads(arguments.child))
        return
    os.makedirs(arguments.out, exist_ok=True)
    rows = []
    for point in points(PRESETS[arguments.preset]):
        if arguments.only and point["kind"] not in arguments.only:
            continue
        if arguments.memory_limit_gib and point["device"] == "cpu":
            point = dict(point, memory_limit_gib=arguments.memory_limit_gib)
        result = harness.measure_in_fresh_process("benchmarks.bench_long", point, timeout_s=3600)
        rows.append(dict(point=describe(point), **point, **result))
        print(rows[-1], flush=True)
    names = sorted({key for row in rows for key in row})
    with open(os.path.join(arguments.out, "bench_long.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(arguments.out, "bench_long.md"), "w") as handle:
        handle.write(markdown(rows))
    print(markdown(rows))


def _mib(value) -> str:
    return "" if value is None else f"{value / 2**20:.0f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| point | tokens | time (s) | extra peak (MiB) | beyond gradients (MiB) | rank peak (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['point']} | error: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['point']} | {row['tokens']} | {row['seconds']:.2f} | {_mib(row['extra_bytes'])} | "
                     f"{_mib(row.get('beyond_gradients_bytes'))} | {_mib(row.get('rank_peak_bytes'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
