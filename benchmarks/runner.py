"""The loop every benchmark script shares: providers × shapes → time and memory rows, CSV, plot, table, CLI.

A script describes itself as a :class:`Suite` (inputs, providers, floor) and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import harness

MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Shape:
    """``B`` rows of ``T`` tokens, vocabulary ``V``, hidden size ``H`` (0 for the logits path)."""

    batch: int
    length: int
    vocab: int
    dtype: str
    hidden: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_bytes(self) -> int:
        return torch.finfo(self.torch_dtype).bits // 8


@dataclass(frozen=True)
class Suite:
    """What one benchmark script defines.

    ``provider(name)`` returns ``f(inputs) -> loss``; ``leaves(name, inputs)`` the tensors that get
    ``requires_grad`` for that provider; ``unavailable(name, device)`` says why a provider cannot run here
    (or None); ``floor_ms(shape, ceilings)`` is the floor of one forward + backward given the measured
    ``ceilings``; ``warm_before_memory(name)``: run once before a memory measurement (compiled providers).
    """

    name: str
    module: str
    title: str
    floor_text: str
    make_inputs: Callable
    provider: Callable
    leaves: Callable
    unavailable: Callable
    floor_ms: Callable
    warm_before_memory: Callable = lambda name: False
    needs_matmul_rate: bool = False


def measure_ceilings(device: torch.device, with_matmul: bool) -> dict:
    """One sample of the copy bandwidth (GB/s, read + write) and, if asked, the matmul rate (TFLOP/s) of this
    device. Short (a few fastest-of-5 runs): the runner takes many samples and keeps the best."""
    ceilings = {"copy_gbps": harness.copy_bandwidth_gbps(device, 2048 if device.type == "cuda" else 512, repeats=5)}
    if with_matmul:
        ceilings["matmul_tflops"] = harness.matmul_tflops(device, 8192 if device.type == "cuda" else 2048,
                                                          repeats=5 if device.type == "cuda" else 3)
    return ceilings


def _set_leaves(leaves, requires_grad: bool) -> None:
    for leaf in leaves:
        leaf.grad = None
        leaf.requires_grad_(requires_grad)


def time_provider(suite: Suite, name: str, inputs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median time of forward (with gradients enabled, as in training), backward, and both."""
    function = suite.provider(name)
    leaves = suite.leaves(name, inputs)
    _set_leaves(leaves, True)
    warmup = 3 if device.type == "cuda" else 1

    def clear():
        _set_leaves(leaves, True)

    def prepared_loss():
        clear()
        return function(inputs)

    def timed(run, prepare):
        return harness.median_time_ms(run, prepare, device=device, repeats=repeats, warmup=warmup)

    times = {"forward": timed(lambda _: function(inputs), clear),
             "backward": timed(lambda loss: loss.backward(), prepared_loss),
             "full": timed(lambda _: function(inputs).backward(), clear)}
    _set_leaves(leaves, False)
    return times


def peak_memory_in_process(suite: Suite, name: str, inputs: dict, device: torch.device, mode: str) -> int:
    """Extra peak bytes above the inputs of one call (``mode`` "forward" or "full"), in this process."""
    function = suite.provider(name)
    leaves = suite.leaves(name, inputs)
    _set_leaves(leaves, True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = harness.reset_cpu_peak()
    loss = function(inputs)
    if mode == "full":
        loss.backward()
    harness.synchronize(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else harness.cpu_peak_bytes()
    del loss
    _set_leaves(leaves, False)
    return peak - base


def child_main(suite: Suite, arguments: dict) -> None:
    """Fresh-process CPU memory measurement: build the inputs, warm up if needed, measure one call."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    inputs = suite.make_inputs(Shape(**arguments["shape"]), device)
    name = arguments["provider"]
    if suite.warm_before_memory(name):
        leaves = suite.leaves(name, inputs)
        _set_leaves(leaves, True)
        suite.provider(name)(inputs).backward()
        _set_leaves(leaves, False)
    print(json.dumps({"extra_peak_bytes": peak_memory_in_process(suite, name, inputs, device, arguments["mode"])}))


def memory_row(suite: Suite, name: str, shape: Shape, inputs: dict, device: torch.device, mode: str,
               common: dict) -> harness.Row:
    """Extra peak memory of one call: in this process on GPU, in a fresh process on CPU."""
    try:
        if device.type == "cuda":
            extra = peak_memory_in_process(suite, name, inputs, device, mode)
        else:
            result = harness.measure_in_fresh_process(suite.module,
                                                      dict(provider=name, mode=mode, shape=shape.__dict__))
            if "error" in result:
                raise RuntimeError(result["error"])
            extra = result["extra_peak_bytes"]
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        return harness.Row(**common, mode=mode, metric="extra_peak_mib", value=None,
                           note="OOM" if isinstance(error, torch.cuda.OutOfMemoryError) else f"failed: {error}"[:80])
    return harness.Row(**common, mode=mode, metric="extra_peak_mib", value=extra / harness.MIB)


def run(suite: Suite, preset: dict, providers: list[str], out_dir: str, repeats: int) -> list[harness.Row]:
    """Every provider at every shape of the preset; writes ``bench_<name>.{csv,png,md,json}`` into ``out_dir``.

    The ceilings behind the floors are sampled before the first timed run, after every provider's timed runs and
    once more at the end (:class:`harness.Ceilings`); the floor of every forward + backward (mode ``full``) is then
    computed from the best samples, and a time below it is reported as a failed measurement
    (:func:`harness.judge_floor`)."""
    device = torch.device(preset["device"])
    ceilings = harness.Ceilings(lambda: measure_ceilings(device, suite.needs_matmul_rate))
    first = ceilings.sample()
    print(f"device {device}: " + ", ".join(f"{key} {value:.3g}" for key, value in first.items())
          + " (first sample; sampled again between the timed runs, the best counts)", flush=True)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    work = [(shape, name) for shape in preset["shapes"] for name in providers]
    progress = tqdm(work, desc=f"bench_{suite.name}", unit="run") if tqdm else work
    rows, timed, inputs, inputs_shape = [], [], None, None
    for shape, name in progress:
        if tqdm:
            progress.set_postfix_str(f"{name} N={shape.tokens}")
        why_not = suite.unavailable(name, device)
        if why_not:
            print(f"skip {name}: {why_not}", flush=True)
            continue
        if inputs_shape != shape:
            inputs = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            inputs, inputs_shape = suite.make_inputs(shape, device), shape
        common = dict(bench=suite.name, provider=name, device=str(device), dtype=shape.dtype, batch=shape.batch,
                      length=shape.length, vocab=shape.vocab, hidden=shape.hidden, tokens=shape.tokens)
        try:
            times = time_provider(suite, name, inputs, device, repeats)
            time_rows = [harness.Row(**common, mode=mode, metric="time_ms", value=times[mode]) for mode in MODES]
            rows += time_rows
            # the floor is that of forward + backward: a fused backend computes the gradient in its forward, so
            # neither half alone can be held to it
            timed += [(shape, row) for row in time_rows if row.mode == "full"]
        except torch.cuda.OutOfMemoryError:
            rows += [harness.Row(**common, mode=mode, metric="time_ms", value=None, note="OOM") for mode in MODES]
        ceilings.sample()                      # between the timed runs (and after the last)
        for mode in preset["memory"]:
            rows.append(memory_row(suite, name, shape, inputs, device, mode, common))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    inputs = None
    ceilings.sample()                          # once more when nothing else of this run holds memory
    best = ceilings.best()
    for shape, row in timed:
        harness.judge_floor(row, suite.floor_ms(shape, best))
    # option presets compare every variant with the plain backend of the same run, and keep their own files
    baseline = preset.get("baseline", "reference")
    harness.fill_reference_ratios(rows, baseline)
    stem = os.path.join(out_dir, f"bench_{suite.name}{preset.get('suffix', '')}")
    ceiling_text = ceilings.text()
    paths = [f"{stem}.{extension}" for extension in ("csv", "png", "md", "json")]
    harness.write_csv(rows, paths[0])
    harness.plot(rows, paths[1], f"{suite.title}, {device}\n({ceiling_text})")
    table = harness.markdown_table(rows, "full", baseline)
    with open(paths[2], "w") as handle:
        handle.write(f"forward + backward; {suite.floor_text}; measured {ceiling_text}\n\n{table}\n")
    harness.write_json(rows, ceilings, paths[3], bench=suite.name, device=str(device), floor=suite.floor_text)
    print(table)
    print(f"ceilings: {ceiling_text}")
    failed = harness.floor_failures(rows)
    for row in failed:
        print(f"FAILED: {row.provider} B={row.batch} T={row.length} {row.dtype} {row.mode}: {row.value:.1f} ms, "
              f"{row.note}", flush=True)
    if failed:
        print(f"{len(failed)} time(s) below the floor: not results; run again on an idle machine")
    print("wrote " + " ".join(paths), flush=True)
    return rows


def main(suite: Suite, presets: dict, description: str, argv=None) -> None:
    """The command line of a benchmark script: ``--preset``, ``--providers``, ``--repeats``, ``--out``."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=description)
    parser.add_argument("--preset", choices=sorted(presets), default="quick", help="shapes, providers, device")
    parser.add_argument("--providers", nargs="+", help="override the preset's providers")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median)")
    parser.add_argument("--out", default="benchmarks/out", help="folder for the CSV, PNG and Markdown table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(suite, json.loads(args.child))
        return
    preset = presets[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device")
    torch.manual_seed(0)
    run(suite, preset, args.providers or preset["providers"], args.out, args.repeats or preset["repeats"])
