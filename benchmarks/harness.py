"""Measurement plumbing shared by the benchmark scripts: timers, peak memory, ceilings, CSV and plots.

Time: the median of repeated runs after warm-up (CUDA events on GPU, ``perf_counter`` on CPU).
Peak memory: ``torch.cuda.max_memory_allocated`` above the inputs on GPU; on CPU the peak resident
set of a fresh process above what it held once the inputs existed (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``). Ceilings (copy bandwidth, matmul rate): the best of samples taken before, between and
after the timed runs (:class:`Ceilings`); a time below the floor they give is a failed measurement
(:func:`judge_floor`), never a result.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

MIB = 2**20


@dataclass
class Row:
    """One CSV row: a (provider, shape, mode, metric) measurement and its ratios."""

    bench: str
    provider: str
    device: str
    dtype: str
    batch: int
    length: int
    vocab: int
    hidden: int
    tokens: int
    mode: str
    metric: str              # "time_ms" or "extra_peak_mib"
    value: float | None      # None: failed (see note)
    floor: float | None = None
    ratio_to_floor: float | None = None
    ratio_to_reference: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(run, prepare=None, *, device: torch.device, repeats: int, warmup: int,
                   statistic=statistics.median) -> float:
    """Median (or ``statistic``) milliseconds of ``run(state)``; ``state = prepare()`` runs untimed before each."""
    samples = []
    for index in range(warmup + repeats):
        state = prepare() if prepare else None
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            run(state)
            elapsed = (time.perf_counter() - begin) * 1e3
        if index >= warmup:
            samples.append(elapsed)
    return statistic(samples)


def copy_bandwidth_gbps(device: torch.device, megabytes: int, repeats: int = 10) -> float:
    """Measured device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    source = torch.randn(megabytes * MIB // 4, device=device)
    target = torch.empty_like(source)
    # a ceiling is the best the device does: the fastest of the runs, not their median
    milliseconds = median_time_ms(lambda _: target.copy_(source), device=device, repeats=repeats, warmup=3,
                                  statistic=min)
    return 2 * source.numel() * 4 / (milliseconds * 1e-3) / 1e9


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int | None = None) -> float:
    """Measured bf16 (GPU) or fp32 (CPU) matrix-product rate on random data (TFLOP/s)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    milliseconds = median_time_ms(lambda _: a @ b, device=device,
                                  repeats=repeats or (10 if device.type == "cuda" else 5),
                                  warmup=3 if device.type == "cuda" else 1, statistic=min)
    return 2 * size**3 / (milliseconds * 1e-3) / 1e12


class Ceilings:
    """The device's ceilings (copy bandwidth, matmul rate), sampled again and again; the best sample of each counts.

    A ceiling is the best the device can do. On a machine shared with other work a single measurement can come
    out low, and a low ceiling makes a floor that a provider seems to beat (a ratio below 1). So the runner
    samples the ceilings before, between and after its timed runs and keeps the highest sample of each.
    ``measure()`` returns one sample of every ceiling, ``{"copy_gbps": ..., "matmul_tflops": ...}``.
    """

    def __init__(self, measure):
        self._measure = measure
        self.samples: dict[str, list[float]] = {}

    def sample(self) -> dict[str, float]:
        """Measure every ceiling once more; returns this sample."""
        values = self._measure()
        for key, value in values.items():
            self.samples.setdefault(key, []).append(value)
        return values

    def best(self) -> dict[str, float]:
        return {key: max(values) for key, values in self.samples.items()}

    def text(self) -> str:
        """``copy_gbps 27.4 (best of 9, lowest 12.1)``: the ceilings as the tables and plots state them."""
        return ", ".join(f"{key} {max(values):.3g} (best of {len(values)}, lowest {min(values):.3g})"
                         for key, values in self.samples.items())

    def record(self) -> dict:
        return {key: dict(best=max(values), samples=values) for key, values in self.samples.items()}


FLOOR_FAILED = "floor measurement failed"


def judge_floor(row: Row, floor: float) -> None:
    """Fill ``row.floor`` and ``row.ratio_to_floor``; a time below its floor is not a result but a failed
    measurement (the ceiling behind the floor was measured low, or the timer was wrong): the ratio is then left
    out, the row's note says so and ``extra["ratio_below_floor"]`` keeps the impossible ratio."""
    row.floor = floor
    if row.value is None:
        return
    ratio = row.value / floor
    if ratio < 1:
        row.ratio_to_floor = None
        row.note = f"{FLOOR_FAILED} (ratio {ratio:.2f} < 1)"
        row.extra["ratio_below_floor"] = ratio
    else:
        row.ratio_to_floor = ratio


def floor_failures(rows: list[Row]) -> list[Row]:
    return [row for row in rows if "ratio_below_floor" in row.extra]


def write_json(rows: list[Row], ceilings: Ceilings, path: str, **fields) -> None:
    """The run's ceilings (every sample and the best), its failed measurements and every row, as JSON."""
    failed = [dict(provider=row.provider, batch=row.batch, length=row.length, vocab=row.vocab, hidden=row.hidden,
                   dtype=row.dtype, mode=row.mode, time_ms=row.value, floor_ms=row.floor, note=row.note)
              for row in floor_failures(rows)]
    record = dict(fields, ceilings=ceilings.record(), floor_failed=failed, rows=[asdict(row) for row in rows])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)


def _read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def reset_cpu_peak() -> int:
    """Reset the peak resident set to the current one; return the current resident set in bytes.

    Freed heap memory is handed back to the system first (``malloc_trim``): otherwise the measured call
    could reuse pages that still count as resident and look lighter than it is.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _read_status_kib("VmRSS") * 1024


def cpu_peak_bytes() -> int:
    return _read_status_kib("VmHWM") * 1024


def measure_in_fresh_process(module: str, arguments: dict, timeout_s: float = 600) -> dict:
    """Run ``python -m module --child JSON`` and return the JSON it prints last (a fresh process, for memory)."""
    command = [sys.executable, "-m", module, "--child", json.dumps(arguments)]
    # Large blocks straight from mmap and back on free: the resident set then follows live memory instead
    # of glibc's dynamic threshold, which keeps freed blocks resident and makes peaks depend on history.
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def fill_reference_ratios(rows: list[Row], reference_provider: str = "reference") -> None:
    """``ratio_to_reference`` = value / the reference provider's value at the same shape, mode and metric."""
    key = lambda row: (row.bench, row.dtype, row.batch, row.length, row.vocab, row.hidden, row.mode, row.metric)
    references = {key(row): row.value for row in rows if row.provider == reference_provider and row.value}
    for row in rows:
        base = references.get(key(row))
        if base and row.value is not None:
            row.ratio_to_reference = row.value / base


def write_csv(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    columns = [name for name in Row.__dataclass_fields__ if name != "extra"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            record = asdict(row)
            record.pop("extra")
            writer.writerow({name: _format(record[name]) for name in columns})


def _format(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot(rows: list[Row], path: str, title: str) -> None:
    """Two panels per mode: time (ms) and extra peak memory (MiB) against tokens, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("time_ms", "time (ms, median)"), ("extra_peak_mib", "extra peak memory (MiB)")]
    modes = sorted({row.mode for row in rows if row.metric == "time_ms"}, key=["forward", "backward", "full"].index)
    figure, axes = plt.subplots(1, len(modes) + 1, figsize=(4.5 * (len(modes) + 1), 4), squeeze=False)
    panels = [(mode, "time_ms") for mode in modes] + [("full", "extra_peak_mib")]
    for axis, (mode, metric) in zip(axes[0], panels):
        for provider in sorted({row.provider for row in rows}):
            points = sorted((row.tokens, row.value) for row in rows if row.provider == provider and row.mode == mode
                            and row.metric == metric and row.value is not None)
            if points:
                axis.plot(*zip(*points), marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens N = B·T")
        axis.set_title(f"{dict(metrics)[metric]}: {mode}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(rows: list[Row], mode: str = "full", baseline: str = "reference") -> str:
    """Providers × shapes for one mode: time, ratio to floor, ratio to ``baseline`` (the provider the rows'
    ``ratio_to_reference`` were filled against), extra peak memory."""
    shapes = sorted({(row.batch, row.length, row.vocab, row.hidden, row.dtype) for row in rows})
    lines = [f"| shape | provider | time (ms) | × floor | × {baseline} | extra peak (MiB) | × {baseline} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    index = {(row.batch, row.length, row.vocab, row.hidden, row.dtype, row.provider, row.metric): row
             for row in rows if row.mode == mode}
    for shape in shapes:
        for provider in dict.fromkeys(row.provider for row in rows):
            time_row = index.get((*shape, provider, "time_ms"))
            memory_row = index.get((*shape, provider, "extra_peak_mib"))
            if time_row is None and memory_row is None:
                continue
            batch, length, vocab, hidden, dtype = shape
            label = f"B={batch} T={length} V={vocab}" + (f" H={hidden}" if hidden else "") + f" {dtype}"
            lines.append(f"| {label} | {provider} | {_cell(time_row, 'value', '.1f')} | "
                         f"{_cell(time_row, 'ratio_to_floor', '.2f')} | {_cell(time_row, 'ratio_to_reference', '.2f')}"
                         f" | {_cell(memory_row, 'value', '.0f')} | {_cell(memory_row, 'ratio_to_reference', '.3f')} |")
    failed = [row for row in floor_failures(rows) if row.mode == mode]
    if failed:
        lines += ["", f"**{len(failed)} of these times fell below their floor: the {FLOOR_FAILED}, they are not "
                      "results** (a ceiling measured low on a busy machine; run again on an idle one)."]
    return "\n".join(lines)


def _cell(row, attribute, spec):
    if row is None:
        return "–"
    value = getattr(row, attribute)
    if attribute == "ratio_to_floor" and "ratio_below_floor" in row.extra:
        return f"**{FLOOR_FAILED}** ({row.extra['ratio_below_floor']:.2f} < 1)"
    if value is None:
        return row.note or "–" if attribute == "value" else "–"
    return format(value, spec)
