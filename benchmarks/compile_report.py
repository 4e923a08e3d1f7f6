"""What the GPU would run: registers, spills, shared memory, warps, and the vocabulary loop's instructions per
logit, of every kernel the GPU benchmark presets launch, per target and dtype, read from real builds
(``triton.compile`` for sm_80, sm_90 and gfx942); no GPU needed.

    python -m benchmarks.compile_report          # writes benchmarks/results/compile/compile_report.{csv,md}

The launches are recorded, not run (``kernel_builds.recorded_launches(execute=False)``), from the drivers called
on ``meta`` tensors of exact shapes: the logits path of ``bench_loss --preset gpu`` (and the ``token_logprobs``
call that prepares its inputs) and one chunk of ``bench_fused_linear --preset gpu``, each in fp32, bf16, fp16 and
fp64; passes A and C on rows that start off a 16-byte boundary (GPT-2's V = 50 257, and logits sliced to a
tokenizer's 151 665 of 151 936 entries); the group advantage kernel at each of its tile shapes.
Facts come from ``tools/compiled_code.py``; ``tests/test_kernel_builds.py`` holds them as limits.
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
from benchmarks.runner import Shape  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402
from sgrpo_kernels.ops import triton as TRITON_PASSES  # noqa: E402  (the Triton backend: an ops.passes.Passes)
from sgrpo_kernels.ops.driver import run_sentence_grpo_loss  # noqa: E402
from sgrpo_kernels.ops.fused_linear import GPU_CHUNK_BYTES_MAX  # noqa: E402
from sgrpo_kernels.ops.layout import SentenceLayout, SentenceSums  # noqa: E402
from sgrpo_kernels.ops.request import LossRequest  # noqa: E402
from sgrpo_kernels.ops.rows import RowInputs  # noqa: E402
from sgrpo_kernels.ops.triton.group_advantages import MAX_SLOTS, group_advantages  # noqa: E402
from sgrpo_kernels.ops.triton.logprobs import LOAD_BYTES  # noqa: E402
from tools import kernel_builds  # noqa: E402

OUT = os.path.join("benchmarks", "results", "compile")
DTYPES = ("float32", "bfloat16", "float16", "float64")
VOCAB_KERNELS = ("_logsumexp_kernel", "_logits_grad_kernel")
RESOURCE_COLUMNS = ("num_warps", "registers", "sgprs", "stack_bytes", "spill_stores", "spill_loads", "shared_bytes")
LOOP_COLUMNS = ("instructions_per_element", "exps_per_element", "loop_divisions", "loop_wide_loads",
                "loop_narrow_loads", "fp64_widenings")
COLUMNS = ("kernel", "dtype", "launch", "integers", "presets", "target", *RESOURCE_COLUMNS, *LOOP_COLUMNS)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def sentence_slots(length: int) -> int:
    """``S_max`` of the benchmark batches (sentences of at least 8 tokens)."""
    return max(length // 8, 1)


def accumulator(shape: Shape) -> torch.dtype:
    return torch.float64 if shape.dtype == "float64" else torch.float32


def logits_path_launches(shape: Shape, logits: torch.Tensor | None = None) -> set:
    """What ``sk.sentence_grpo_loss(..., beta=BETA)`` launches at ``shape`` (new gradient buffer and in place)."""
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    slots, floats = sentence_slots(length), accumulator(shape)
    ids = meta(batch, length, dtype=torch.int64)
    with kernel_builds.recorded_launches(execute=False) as launches:
        with torch.no_grad():
            TRITON_PASSES.token_scores(meta(batch, length, vocab, dtype=shape.torch_dtype), ids, 1.0)
        for inplace in (False, True):
            logits = meta(batch, length, vocab, dtype=shape.torch_dtype)
            old, ref = meta(batch, length, dtype=floats), meta(batch, length, dtype=floats)
            request = LossRequest(old_logps=old, ref_logps=ref, config=LossConfig(beta=bench_loss.BETA),
                                  backend="triton")
            rows = RowInputs(ids, ids, meta(batch, slots, dtype=floats), old, ref, None, None, slots)
            run_sentence_grpo_loss(TRITON_PASSES, logits, rows, request,
                                   gradient_out=logits if inplace else torch.empty_like(logits))
    return launches


def fused_linear_chunk_launches(shape: Shape) -> set:
    """The kernels of one chunk of ``run_fused_linear_loss`` on GPU (chunks at the 1 GiB cap of their logits)."""
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    chunk = min(GPU_CHUNK_BYTES_MAX // (vocab * shape.element_bytes), batch * length)
    slots, floats = sentence_slots(length), accumulator(shape)
    passes, config = TRITON_PASSES, LossConfig(beta=bench_loss.BETA)
    rows = batch * length
    segment_ids, tokens = meta(batch, length, dtype=torch.int64), meta(chunk, dtype=torch.int64)
    old_logps, ref_logps = meta(batch, length, dtype=floats), meta(batch, length, dtype=floats)
    with kernel_builds.recorded_launches(execute=False) as launches:
        logits = meta(1, chunk, vocab, dtype=shape.torch_dtype)
        chunk_ids = meta(1, chunk, dtype=torch.int64)
        passes.token_scores(logits, chunk_ids, config.temperature)
        logp = meta(rows, dtype=floats)   # the driver copies each chunk's log-probs into flat [B*T] buffers
        layout = SentenceLayout(batch, length, slots, meta(batch * slots, dtype=torch.int32),
                                meta(batch * slots, dtype=floats))
        sums = SentenceSums(meta(batch * slots, dtype=torch.float64), meta(batch * slots, dtype=torch.float64), None)
        passes.sentence_sums(logp, old_logps, ref_logps, segment_ids, slots, sums, config, tokens)
        terms = passes.sentence_terms(layout, sums, meta(batch, slots, dtype=floats), config)
        coef = passes.token_coefficients(logp, ref_logps, segment_ids, slots, terms, config, tokens)
        passes.logits_gradient(logits, chunk_ids, coef, meta(chunk, dtype=floats), config.temperature, logits)
    return launches


def unaligned_row_launches(dtype: str) -> dict:
    """Passes A and C on rows that start off a 16-byte boundary: ``label -> launches``."""
    cases = {}
    gpt2 = Shape(8, 1024, 50257, dtype)                       # odd V: every other row starts unaligned
    cases["odd V=50257"] = logits_path_launches(gpt2)
    sliced = Shape(8, 1024, 151665, dtype)                    # logits[..., :151665] of a 151 936-wide head
    with kernel_builds.recorded_launches(execute=False) as launches:
        full = meta(sliced.batch, sliced.length, 151936, dtype=sliced.torch_dtype)
        view = full[..., :sliced.vocab]
        ids = meta(sliced.batch, sliced.length, dtype=torch.int64)
        logp, lse, _ = TRITON_PASSES.token_scores(view, ids, 1.0)
        TRITON_PASSES.logits_gradient(view, ids, logp, lse, 1.0, view)
    cases["sliced V=151665 of 151936"] = launches
    return cases


def group_launches() -> dict:
    """The group advantage kernel at every tile shape its launcher picks (groups of 16 answers)."""
    cases = {}
    slots = 1
    while slots <= MAX_SLOTS:
        with kernel_builds.recorded_launches(execute=False) as launches:
            group_advantages(meta(64, slots), meta(64, dtype=torch.int64), 16, 1e-4, "output", "std", "sentence")
        cases[f"group S={slots}"] = launches
        slots = max(slots * 2, 16)
    return cases


def preset_launches(dtypes=DTYPES) -> dict:
    """``Launch -> [labels]``: every launch the report builds, with where it comes from."""
    where = {}

    def add(label, launches):
        for launch in launches:
            where.setdefault(launch, []).append(label)
    for dtype in dtypes:
        for base in bench_loss.PRESETS["gpu"]["shapes"]:
            add(f"loss B={base.batch} T={base.length}", logits_path_launches(Shape(base.batch, base.length,
                                                                                   base.vocab, dtype)))
        for base in bench_fused_linear.PRESETS["gpu"]["shapes"]:
            shape = Shape(base.batch, base.length, base.vocab, dtype, base.hidden)
            add(f"fused B={base.batch} T={base.length}", fused_linear_chunk_launches(shape))
        for label, launches in unaligned_row_launches(dtype).items():
            add(label, launches)
    for label, launches in group_launches().items():
        add(label, launches)
    return where


def _first_dtype(launch) -> str:
    """The dtype of the launch's first floating-point tensor (the logits, or the accumulator in pass B)."""
    return next(description[1] for _, description in launch.arguments
                if description[0] == "tensor" and description[1].startswith(("float", "bfloat")))


def loop_facts(launch, loop, widenings) -> dict:
    """Per-logit counts of the vocabulary loop (passes A and C), and fp32→fp64 widenings in fp64 kernels."""
    facts = {key: None for key in LOOP_COLUMNS}
    dtype = _first_dtype(launch)
    if widenings is not None and "float64" in dtype:
        facts["fp64_widenings"] = widenings
    if loop is None or launch.kernel.split(":")[1] not in VOCAB_KERNELS:
        return facts
    elements = loop.wide_loads * LOAD_BYTES // getattr(torch, dtype).itemsize + loop.narrow_loads
    facts |= {"instructions_per_element": round(loop.instructions / elements, 2),
              "exps_per_element": round(loop.exps / elements, 3), "loop_divisions": loop.divisions,
              "loop_wide_loads": loop.wide_loads, "loop_narrow_loads": loop.narrow_loads}
    return facts


def report_rows(where: dict, results: list[dict]) -> list[dict]:
    """One row per built binary, with the labels of the launches that compile to it."""
    rows = []
    for result in results:
        launches = [kernel_builds.Launch.from_json(item) for item in result["launches"]]
        labels = sorted({label for launch in launches for label in where[launch]})
        integers = ", ".join(f"{name}={description[1]}" for name, description in launches[0].arguments
                             if description[0] == "int" and not name.isupper())
        resources = result.get("resources", {})
        loop = result.get("loop")
        facts = loop_facts(launches[0], None if loop is None else _loop(loop), result.get("fp64_widenings"))
        rows.append({"kernel": result["kernel"].split(":")[1], "dtype": _first_dtype(launches[0]),
                     "launch": launches[0].label(pointers=False), "integers": integers, "presets": "; ".join(labels),
                     "target": result["target"], **{key: resources.get(key) for key in RESOURCE_COLUMNS}, **facts,
                     "error": result.get("error")})
    return sorted(rows, key=lambda row: (row["kernel"], DTYPES.index(row["dtype"]) if row["dtype"] in DTYPES else 9,
                                         row["launch"], row["presets"], row["target"]))


def _loop(values: dict):
    from tools.compiled_code import LoopCode
    return LoopCode(**values)


def _cell(value) -> str:
    return "–" if value is None or value == "" else str(value)


def markdown(rows: list[dict], versions: str) -> str:
    spills = [row for row in rows if row["spill_stores"] or row["spill_loads"] or row["stack_bytes"]]
    vocab_rows = [row for row in rows if row["instructions_per_element"] is not None]
    worst = {}
    for row in vocab_rows:
        key = (row["kernel"], row["target"])
        worst[key] = max(worst.get(key, 0), row["instructions_per_element"])
    lines = [
        "# The kernels as a GPU would run them",
        "",
        f"Built with the real Triton compiler ({versions}) on a machine without a GPU by "
        "`python -m benchmarks.compile_report`. Launches: `bench_loss --preset gpu` "
        f"({', '.join(f'B={s.batch} T={s.length}' for s in bench_loss.PRESETS['gpu']['shapes'])}, V=151936, "
        f"beta={bench_loss.BETA}) and one chunk of `bench_fused_linear --preset gpu` (chunk logits at the 1 GiB cap), "
        "each in fp32, bf16, fp16 and fp64; passes A and C on rows that start off a 16-byte boundary (V=50257; "
        "V=151665 sliced from 151936); the group advantage kernel at each tile shape.",
        "",
        "Registers: per thread (sm: `REG` of `cuobjdump -res-usage`; gfx942: VGPRs, SGPRs in their own column). "
        "Spills: `STL`/`LDL` in the SASS (sm) or the spill counts of the code object (gfx942); stack: local memory "
        "or scratch bytes per thread. Vocabulary loop (passes A and C): SASS/AMDGCN instructions and exponentials "
        "per logit in one iteration, divisions or reciprocals in it, 128-bit and narrower global loads. "
        "Widenings: `cvt.f64.f32` in the PTX of fp64 kernels (a scalar argument passed as fp32 would show here). "
        "Rows that look alike differ in integer specialisation (values in the CSV).",
        "",
        "**Verdict**: " + ("no register spills and no stack on any target." if not spills else
                           f"{len(spills)} builds spill or use a stack: see the rows marked below.") + " "
        "Most instructions per logit in the vocabulary loop: "
        + "; ".join(f"{kernel} {target} {value}" for (kernel, target), value in sorted(worst.items())) + ".",
        "",
        "| kernel | dtype | launch | target | warps | regs | sgprs | stack B | spills st/ld | shared B "
        "| instr/logit | exp/logit | div | loads 128b/narrow | widenings | from |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["error"]:
            lines.append(f"| {row['kernel']} | {row['dtype']} | {row['launch']} | {row['target']} | FAILED: "
                         f"{row['error'][:200]} |")
            continue
        mark = " **(spills)**" if row in spills else ""
        loads = (f"{row['loop_wide_loads']}/{row['loop_narrow_loads']}" if row["loop_wide_loads"] is not None
                 else "–")
        launch = ", ".join(part for part in row["launch"].split(", ")[1:])
        lines.append(f"| {row['kernel']} | {row['dtype']} | `{launch}` | {row['target']}{mark} | {row['num_warps']} | "
                     f"{row['registers']} | {_cell(row['sgprs'])} | {row['stack_bytes']} | "
                     f"{row['spill_stores']}/{_cell(row['spill_loads'])} | {row['shared_bytes']} | "
                     f"{_cell(row['instructions_per_element'])} | {_cell(row['exps_per_element'])} | "
                     f"{_cell(row['loop_divisions'])} | {loads} | {_cell(row['fp64_widenings'])} | {row['presets']} |")
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
