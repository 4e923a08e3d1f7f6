"""Registers, spills, shared memory and ``num_warps`` of every kernel the GPU benchmark presets launch, per target,
read from real builds (``triton.compile`` for sm_80, sm_90 and gfx942); no GPU needed.

    python -m benchmarks.compile_report          # writes benchmarks/results/compile/compile_report.{csv,md}

The launches are recorded, not run (``kernel_builds.recorded_launches(execute=False)``), from the drivers called
on ``meta`` tensors of the presets' exact shapes: the logits path of ``bench_loss --preset gpu`` (and the
``token_logprobs`` call that prepares its inputs) and one chunk of ``bench_fused_linear --preset gpu``.
cuda counts come from ``cuobjdump`` on the cubin (``REG``, stack frame, ``STL``/``LDL`` spill instructions in the
SASS), hip counts from the AMDGPU metadata of the code object (VGPRs, SGPRs, spill counts, scratch).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_fused_linear, bench_loss  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402
from sgrpo_kernels.ops import kernel_builds  # noqa: E402
from sgrpo_kernels.ops.common import run_sentence_grpo_loss, run_token_logprobs  # noqa: E402
from sgrpo_kernels.ops.fused_linear import GPU_CHUNK_BYTES_MAX  # noqa: E402
from sgrpo_kernels.ops.sentence_grpo import TRITON_PASSES  # noqa: E402
from sgrpo_kernels.ops.sentence_layout import SentenceLayout  # noqa: E402

OUT = os.path.join("benchmarks", "results", "compile")
COLUMNS = ("kernel", "launch", "integers", "presets", "target", "num_warps", "registers", "sgprs", "stack_bytes",
           "spill_stores", "spill_loads", "shared_bytes")


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def sentence_slots(length: int) -> int:
    """``S_max`` of the benchmark batches (sentences of at least 8 tokens)."""
    return max(length // 8, 1)


def logits_path_launches(shape) -> set:
    """What ``sk.sentence_grpo_loss(..., beta=BETA)`` launches at ``shape`` (new gradient buffer and in place)."""
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    slots = sentence_slots(length)
    ids = meta(batch, length, dtype=torch.int64)
    with kernel_builds.recorded_launches(execute=False) as launches:
        with torch.no_grad():
            run_token_logprobs(TRITON_PASSES, meta(batch, length, vocab, dtype=shape.torch_dtype), ids, 1.0, False)
        for inplace in (False, True):
            logits = meta(batch, length, vocab, dtype=shape.torch_dtype).requires_grad_()
            run_sentence_grpo_loss(TRITON_PASSES, logits, ids, ids, meta(batch, slots), meta(batch, length),
                                   meta(batch, length), LossConfig(beta=bench_loss.BETA), slots, inplace=inplace,
                                   return_metrics=False)
    return launches


def fused_linear_chunk_launches(shape) -> set:
    """The kernels of one chunk of ``run_fused_linear_loss`` on GPU (chunks at the 1 GiB cap of their logits)."""
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    chunk = min(GPU_CHUNK_BYTES_MAX // (vocab * shape.element_bytes), batch * length)
    slots = sentence_slots(length)
    passes, config = TRITON_PASSES, LossConfig(beta=bench_loss.BETA)
    rows = batch * length
    segment_ids, tokens = meta(batch, length, dtype=torch.int64), meta(chunk, dtype=torch.int64)
    old_logps, ref_logps = meta(batch, length), meta(batch, length)
    with kernel_builds.recorded_launches(execute=False) as launches:
        logits = meta(1, chunk, vocab, dtype=shape.torch_dtype)
        chunk_ids = meta(1, chunk, dtype=torch.int64)
        passes.logsumexp(logits, chunk_ids, config.temperature)
        logp = meta(rows)           # the driver copies each chunk's log-probs into flat [B*T] buffers
        layout = SentenceLayout(batch, length, slots, meta(batch * slots, dtype=torch.int32), meta(batch * slots))
        sums = meta(batch * slots, dtype=torch.float64), meta(batch * slots, dtype=torch.float64)
        passes.sentence_sums(logp, old_logps, ref_logps, segment_ids, slots, *sums, tokens)
        terms = passes.sentence_terms(layout, *sums, meta(batch, slots), config)
        coef = passes.token_coef(logp, ref_logps, segment_ids, slots, terms, tokens)
        passes.logits_grad(logits, chunk_ids, coef, meta(chunk), config.temperature, logits)
    return launches


def preset_launches() -> dict:
    """``Launch -> [preset names]`` for every GPU preset shape of both benchmarks."""
    where = {}
    for shape in bench_loss.PRESETS["gpu"]["shapes"]:
        for launch in logits_path_launches(shape):
            where.setdefault(launch, []).append(f"loss B={shape.batch} T={shape.length}")
    for shape in bench_fused_linear.PRESETS["gpu"]["shapes"]:
        for launch in fused_linear_chunk_launches(shape):
            where.setdefault(launch, []).append(f"fused B={shape.batch} T={shape.length}")
    return where


def report_rows(where: dict, results: list[dict]) -> list[dict]:
    """One row per built binary, with the presets whose launches compile to it."""
    rows = []
    for result in results:
        launches = [kernel_builds.Launch.from_json(item) for item in result["launches"]]
        presets = sorted({preset for launch in launches for preset in where[launch]}, key=_preset_order)
        resources = result.get("resources", {})
        integers = ", ".join(f"{name}={description[1]}" for name, description in launches[0].arguments
                             if description[0] == "int" and not name.isupper())
        rows.append({"kernel": result["kernel"].split(":")[1], "launch": launches[0].label(pointers=False),
                     "integers": integers, "presets": "; ".join(presets), "target": result["target"],
                     **{key: resources.get(key) for key in COLUMNS[5:]}, "error": result.get("error")})
    return sorted(rows, key=lambda row: (row["kernel"], row["launch"], row["presets"], row["target"]))


def _preset_order(preset: str):
    path, batch, length = preset.split()
    return path, int(batch[2:]), int(length[2:])


def markdown(rows: list[dict], versions: str) -> str:
    spills = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack_bytes"]]
    sm90_spills = [row for row in spills if row["target"] == "sm90"]
    lines = [
        "# Static resources of the kernels at the GPU benchmark presets",
        "",
        f"Built with the real Triton compiler ({versions}) on a machine without a GPU by "
        "`python -m benchmarks.compile_report`. Presets: `bench_loss --preset gpu` "
        f"({', '.join(f'B={s.batch} T={s.length}' for s in bench_loss.PRESETS['gpu']['shapes'])}, V=151936, bf16, "
        f"beta={bench_loss.BETA}) and one chunk of `bench_fused_linear --preset gpu` (chunk logits at the 1 GiB cap).",
        "Registers: per thread (sm_80/sm_90: `REG` of `cuobjdump -res-usage`; gfx942: VGPRs, SGPRs in their own "
        "column). Spills: `STL`/`LDL` instructions in the SASS (sm) or the spill counts of the code object (gfx942); "
        "stack: local memory (sm) or scratch (gfx942) bytes per thread. Shared: bytes Triton allocates. Rows that "
        "look alike are different binaries: Triton specialises integer arguments (equal to 1, divisible by 16, "
        "64-bit); the CSV lists the integer values of each.",
        "",
        "**Verdict**: " + ("no register spills and no stack on any target at these shapes."
                           if not spills else
                           f"{len(spills)} builds spill or use a stack ({len(sm90_spills)} of them on sm_90): "
                           "see the rows marked below."),
        "",
        "| kernel | launch | target | warps | regs | sgprs | stack B | spills (st/ld) | shared B | presets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["error"]:
            lines.append(f"| {row['kernel']} | {row['launch']} | {row['target']} | FAILED: {row['error'][:200]} |")
            continue
        spill = f"{row['spill_stores']}/{row['spill_loads'] if row['spill_loads'] is not None else '–'}"
        mark = " **(spills)**" if row in spills else ""
        lines.append(f"| {row['kernel']} | `{row['launch']}` | {row['target']}{mark} | "
                     f"{row['num_warps']} | {row['registers']} | {row['sgprs'] if row['sgprs'] is not None else '–'}"
                     f" | {row['stack_bytes']} | {spill} | {row['shared_bytes']} | {row['presets']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report builds kernels with the real compiler")
    import triton
    start = time.perf_counter()
    where = preset_launches()
    results = kernel_builds.build_all(where, kernel_builds.TARGETS, jobs=args.jobs, with_resources=True,
                                      progress=True)
    rows = report_rows(where, results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile_report.csv"), "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[*COLUMNS, "error"])
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, f"triton {triton.__version__}, torch {torch.__version__.split('+')[0]}")
    with open(os.path.join(args.out, "compile_report.md"), "w", encoding="utf-8") as file:
        file.write(text)
    print(text)
    print(f"{len(results)} builds in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
