"""Speed and memory of the sentence-level GRPO loss from logits, every provider at the same inputs.

    python -m benchmarks.bench_loss --preset quick     # CPU, about a minute
    python -m benchmarks.bench_loss --preset cpu       # CPU, the README's table (B=4, T=1024, V=32000 fp32)
    python -m benchmarks.bench_loss --preset gpu       # CUDA, V=151936, N in {4096, 16384, 65536}, bf16

Writes ``bench_loss.csv`` (one row per provider, shape, mode and metric), ``bench_loss.png`` and
``bench_loss.md`` into ``--out``. Times are medians; the floor is ``3·N·V·bytes / copy bandwidth``
(read the logits twice, write the gradient once), with the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
from dataclasses import dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgrpo_kernels as sk  # noqa: E402
from benchmarks import harness  # noqa: E402
from sgrpo_kernels import reference  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402

BETA = 0.04
MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    vocab: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


PRESETS = {
    "quick": dict(device="cpu", shapes=[Shape(1, 512, 32000, "float32"), Shape(4, 1024, 32000, "float32")],
                  providers=["reference", "torch", "torch-inplace"], repeats=2, memory=("full",)),
    "cpu": dict(device="cpu", shapes=[Shape(1, 1024, 32000, "float32"), Shape(4, 1024, 32000, "float32"),
                                      Shape(8, 1024, 32000, "float32")],
                providers=["reference", "reference-compiled", "torch", "torch-inplace"], repeats=5,
                memory=("forward", "full")),
    "gpu": dict(device="cuda", shapes=[Shape(4, 1024, 151936, "bfloat16"), Shape(8, 2048, 151936, "bfloat16"),
                                       Shape(16, 4096, 151936, "bfloat16")],
                providers=["reference", "reference-compiled", "triton", "triton-inplace", "liger", "liger-inplace"],
                repeats=20, memory=("forward", "full")),
}


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    """Random inputs with sentences of 8..32 tokens, ~10% right padding, off-policy old log-probs.

    ``logits`` is a contiguous ``[B, T, V]`` leaf, as an LM head applied to the completion positions
    gives it (``logits_to_keep``); Liger's ``[B, T + 1, V]`` copy is made by ``leaf_of`` when needed.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    logits = torch.randn(batch, length, vocab, dtype=shape.torch_dtype, device=device)
    completion_ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    sentence_lengths = torch.randint(8, 33, (batch, length), generator=generator)
    positions = torch.arange(length).expand(batch, length).contiguous()
    segment_ids = torch.searchsorted(sentence_lengths.cumsum(1), positions, right=True)
    lengths = torch.randint(int(length * 0.8), length + 1, (batch,), generator=generator)
    segment_ids[torch.arange(length)[None] >= lengths[:, None]] = -1
    segment_ids = segment_ids.to(device)
    num_slots = int(segment_ids.max()) + 1
    advantages = torch.randn(batch, num_slots, generator=generator).to(device)
    with torch.no_grad():
        logps = sk.token_logprobs(logits, completion_ids, backend="torch" if device.type == "cpu"
                                  else "triton")
    old_logps = logps + 0.05 * torch.randn(batch, length, generator=generator).to(device)
    ref_logps = logps + 0.05 * torch.randn(batch, length, generator=generator).to(device)
    return dict(logits=logits, completion_ids=completion_ids, segment_ids=segment_ids,
                advantages=advantages, old_logps=old_logps, ref_logps=ref_logps)


@functools.lru_cache(maxsize=None)
def provider_function(name: str):
    """A function ``(inputs, leaf) -> loss`` for each provider; ``leaf`` is ``leaf_of(name, inputs)``."""
    if name.startswith("reference"):
        config = LossConfig(beta=BETA)

        def eager(inputs, leaf):
            return reference.sentence_grpo_loss(leaf, inputs["completion_ids"], inputs["segment_ids"],
                                                inputs["advantages"], inputs["old_logps"], inputs["ref_logps"], config)
        return torch.compile(eager) if name == "reference-compiled" else eager
    if name.split("-")[0] in ("torch", "triton"):
        backend, inplace = name.split("-")[0], name.endswith("-inplace")

        def fused(inputs, leaf):
            return sk.sentence_grpo_loss(leaf, inputs["completion_ids"], inputs["segment_ids"],
                                         inputs["advantages"], inputs["old_logps"], inputs["ref_logps"], beta=BETA,
                                         backend=backend, inplace=inplace)
        return fused
    if name.startswith("liger"):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        inplace = name.endswith("-inplace")

        def liger(inputs, leaf):   # token level: the same traffic, one advantage per row
            mask = (inputs["segment_ids"] >= 0).float()
            loss, _ = triton_grpo_loss(leaf, inputs["old_logps"], inputs["ref_logps"], inputs["completion_ids"],
                                       inputs["advantages"].mean(1), mask, temperature=1.0, beta=BETA,
                                       eps_low=0.2, eps_high=0.2, inplace=inplace, loss_type="grpo", reduce=True)
            return loss
        return liger
    raise ValueError(f"unknown provider {name!r}")


def leaf_of(name: str, inputs: dict) -> torch.Tensor:
    """Liger scores ``[B, T + 1, V]`` logits (it drops the last position); the others ``[B, T, V]``."""
    if not name.startswith("liger"):
        return inputs["logits"]
    if "padded_logits" not in inputs:
        logits = inputs["logits"].detach()
        inputs["padded_logits"] = torch.cat([logits, torch.randn_like(logits[:, :1])], dim=1)
    return inputs["padded_logits"]


def provider_available(name: str, device: torch.device) -> str | None:
    """None if the provider can run here, else why not."""
    if name.startswith("liger"):
        try:
            import liger_kernel.transformers.grpo_loss  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
    if name.startswith("triton") and device.type != "cuda":
        return "Triton kernels need CUDA (the CPU interpreter is not a speed measurement)"
    return None


def time_provider(name: str, shape: Shape, inputs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    function = provider_function(name)
    leaf = leaf_of(name, inputs).requires_grad_()
    warmup = 3 if device.type == "cuda" else 1
    times = {}

    def forward(_):
        return function(inputs, leaf)

    def clear():
        leaf.grad = None

    def backward_prepared():
        clear()
        return function(inputs, leaf)

    def full(_):
        function(inputs, leaf).backward()

    times["forward"] = harness.median_time_ms(forward, lambda: clear(), device=device, repeats=repeats, warmup=warmup)
    times["backward"] = harness.median_time_ms(lambda loss: loss.backward(), backward_prepared, device=device,
                                               repeats=repeats, warmup=warmup)
    times["full"] = harness.median_time_ms(full, clear, device=device, repeats=repeats, warmup=warmup)
    clear()
    leaf.requires_grad_(False)
    return times


def peak_memory_in_process(name: str, inputs: dict, device: torch.device, mode: str) -> int:
    """Extra peak bytes above the inputs for one call (``mode`` "forward" or "full"), measured here."""
    function = provider_function(name)
    leaf = leaf_of(name, inputs).requires_grad_()
    leaf.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = harness.reset_cpu_peak()
    loss = function(inputs, leaf)
    if mode == "full":
        loss.backward()
    harness.synchronize(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else harness.cpu_peak_bytes()
    del loss
    leaf.grad = None
    leaf.requires_grad_(False)
    return peak - base


def memory_row(name: str, shape: Shape, inputs: dict, device: torch.device, mode: str, common: dict) -> harness.Row:
    """Extra peak memory of one call: in this process on GPU, in a fresh process on CPU."""
    try:
        if device.type == "cuda":
            extra = peak_memory_in_process(name, inputs, device, mode)
        else:
            result = harness.measure_in_fresh_process("benchmarks.bench_loss",
                                                      dict(provider=name, mode=mode, shape=shape.__dict__))
            if "error" in result:
                raise RuntimeError(result["error"])
            extra = result["extra_peak_bytes"]
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        return harness.Row(**common, mode=mode, metric="extra_peak_mib", value=None,
                           note="OOM" if isinstance(error, torch.cuda.OutOfMemoryError) else f"failed: {error}"[:80])
    return harness.Row(**common, mode=mode, metric="extra_peak_mib", value=extra / harness.MIB)


def child_main(arguments: dict) -> None:
    """Fresh-process CPU memory measurement: build the inputs, then measure one call."""
    torch.manual_seed(0)
    shape = Shape(**arguments["shape"])
    inputs = make_inputs(shape, torch.device("cpu"))
    if arguments["provider"] == "reference-compiled":   # compile outside the measured call
        leaf = inputs["logits"].requires_grad_()
        provider_function("reference-compiled")(inputs, leaf).backward()
        leaf.grad = None
    print(json.dumps({"extra_peak_bytes": peak_memory_in_process(arguments["provider"], inputs,
                                                                 torch.device("cpu"), arguments["mode"])}))


def run(preset: dict, providers: list[str], out_dir: str, repeats: int) -> list[harness.Row]:
    device = torch.device(preset["device"])
    bandwidth = harness.copy_bandwidth_gbps(device, 2048 if device.type == "cuda" else 512)
    print(f"device {device}: measured copy bandwidth {bandwidth:.1f} GB/s (read + write)", flush=True)
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    work = [(shape, name) for shape in preset["shapes"] for name in providers]
    progress = tqdm(work, desc="bench_loss", unit="run") if tqdm else work
    inputs, inputs_shape = None, None
    for shape, name in progress:
        if tqdm:
            progress.set_postfix_str(f"{name} N={shape.tokens}")
        common = dict(bench="loss", provider=name, device=str(device), dtype=shape.dtype, batch=shape.batch,
                      length=shape.length, vocab=shape.vocab, hidden=0, tokens=shape.tokens)
        floor_ms = 3 * shape.tokens * shape.vocab * torch.finfo(shape.torch_dtype).bits / 8 / (bandwidth * 1e9) * 1e3
        unavailable = provider_available(name, device)
        if unavailable:
            print(f"skip {name}: {unavailable}", flush=True)
            continue
        if inputs_shape != shape:
            inputs = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            inputs, inputs_shape = make_inputs(shape, device), shape
        try:
            times = time_provider(name, shape, inputs, device, repeats)
            for mode in MODES:
                rows.append(harness.Row(**common, mode=mode, metric="time_ms", value=times[mode], floor=floor_ms,
                                        ratio_to_floor=times[mode] / floor_ms))
        except torch.cuda.OutOfMemoryError:
            rows += [harness.Row(**common, mode=mode, metric="time_ms", value=None, note="OOM") for mode in MODES]
        for mode in preset["memory"]:
            rows.append(memory_row(name, shape, inputs, device, mode, common))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    harness.fill_reference_ratios(rows)
    harness.write_csv(rows, os.path.join(out_dir, "bench_loss.csv"))
    harness.plot(rows, os.path.join(out_dir, "bench_loss.png"),
                 f"sentence-level GRPO loss from logits, {device} ({bandwidth:.0f} GB/s copy)")
    table = harness.markdown_table(rows, "full")
    with open(os.path.join(out_dir, "bench_loss.md"), "w") as handle:
        handle.write(f"forward + backward; floor = 3·N·V·bytes / {bandwidth:.1f} GB/s measured copy bandwidth\n\n")
        handle.write(table + "\n")
    print(table)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="shapes, providers, device")
    parser.add_argument("--providers", nargs="+", help="override the preset's providers")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    parser.add_argument("--out", default="benchmarks/out", help="folder for the CSV, PNG and Markdown table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device")
    torch.manual_seed(0)
    run(preset, args.providers or preset["providers"], args.out, args.repeats or preset["repeats"])


if __name__ == "__main__":
    main()
