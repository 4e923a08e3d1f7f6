"""Every kernel specialisation the public API can launch compiles with the real Triton compiler for sm_80, sm_90
and gfx942 (no GPU needed; the interpreter that runs the other tests accepts code the compiler rejects).

The launches come from (1) a dry run of the public API over its options, every dtype and a few shapes, (2) every
launch the rest of this test session made (``conftest.py`` records them, in every pytest-xdist worker), each with
(3) every launch configuration the launchers' own choice functions can pick and 64-bit integer variants
(``kernel_builds.expand``). They are built in separate processes without ``TRITON_INTERPRET``: the public API's
set first (it needs no other test, so a parallel run overlaps it with the rest), then, after every other test, what
the suite launched beyond it (usually nothing new: Triton's cache holds every binary already built).
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch
from cases import KERNEL_DEVICE
from covering import covering_array

import sgrpo_kernels as sk
from sgrpo_kernels.ops import library
from tools import kernel_builds
from tools.kernel_builds import Launch, expand, recorded_launches

pytest.importorskip("triton", reason="building Triton kernels needs triton")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (B, T, V): odd sizes, sizes divisible by 16, and sizes equal to 1 (Triton specialises integers on these)
SHAPES = ((2, 3, 5), (2, 16, 32), (1, 1, 1))
BUILD_SECONDS = 1800     # a guard against a hung build; a loaded two-core machine needs several minutes


def run_builder(arguments, **options) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a build command in a session of its own: on a timeout its worker processes (a process
    pool, which outlives a killed parent) are killed with it."""
    with subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **options) as process:
        try:
            stdout, stderr = process.communicate(timeout=BUILD_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(arguments, process.returncode, stdout, stderr)


def loss_inputs(batch, length, vocab, dtype, *, per_row_advantages=False, sliced=False, index_dtype=torch.int64):
    """Small loss inputs on the kernel device; ``sliced`` gives ``logits[:, 1:]`` (strided, unaligned start)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length + sliced, vocab, generator=generator).to(dtype)
    logits = logits[:, 1:] if sliced else logits
    segment_ids = torch.arange(length).repeat(batch, 1) // 2
    segment_ids[0, -1] = -1
    num_slots = int(segment_ids.max()) + 1
    logps = torch.randn(batch, length, generator=generator)
    advantages = torch.randn((batch,) if per_row_advantages else (batch, num_slots), generator=generator)
    tensors = dict(logits=logits, completion_ids=torch.randint(0, vocab, (batch, length), generator=generator),
                   segment_ids=segment_ids.to(index_dtype), advantages=advantages, old_logps=logps - 0.1,
                   ref_logps=logps + 0.1)
    return {name: value.to(KERNEL_DEVICE) for name, value in tensors.items()}


LOSS_OPTIONS = dict(per_row_advantages=[False, True], beta=[0.0, 0.1], with_old=[False, True], delta=[None, 1.5],
                    ratio_level=["sum", "mean"], kl_reduction=["mean", "sum"], return_metrics=[False, True],
                    requires_grad=[False, True], inplace=[False, True])
FUSED_OPTIONS = LOSS_OPTIONS | dict(bias=[False, True], chunk_size=[None, 1], inplace=[False])
# Each kernel's specialisation (what Triton compiles: its source with the constexprs, the argument types and
# the integers' alignment) is a function of the dtype and at most three of these options (measured over the full
# product: pass B's sums of beta, with_old and, fused, chunk_size; its coefficients of beta, requires_grad and
# chunk_size; the rest of one option or none, as their other options are runtime flags). So every dtype crossed
# with all 4-way combinations of the options (44 calls instead of 1024 for the fused path) launches every
# specialisation the full product does; the two gave the same set of builds when this was introduced.
OPTION_STRENGTH = 4


def option_grid(options: dict):
    """Every ``OPTION_STRENGTH``-way combination of the options' values (a covering array, not the product)."""
    return covering_array(options, OPTION_STRENGTH)


def call_loss(inputs, *, fused=False, per_row_advantages, with_old, requires_grad, inplace, bias=False,
              chunk_size=None, **options):
    old_logps = inputs["old_logps"] if with_old else None
    ref_logps = inputs["ref_logps"] if options["beta"] > 0 else None
    ids, segments, advantages = inputs["completion_ids"], inputs["segment_ids"], inputs["advantages"]
    if not fused:
        logits = inputs["logits"].detach().clone().requires_grad_(requires_grad)
        loss = sk.sentence_grpo_loss(logits, ids, segments, advantages, old_logps, ref_logps, inplace=inplace,
                                     backend="triton", **options)
        backward(loss, options)
        return
    batch, length, vocab = inputs["logits"].shape
    hidden = torch.randn(batch, length, 8, dtype=inputs["logits"].dtype, device=KERNEL_DEVICE)
    weight = torch.randn(vocab, 8, dtype=hidden.dtype, device=KERNEL_DEVICE)
    bias = torch.randn(vocab, dtype=hidden.dtype, device=KERNEL_DEVICE) if bias else None
    for tensor in (hidden, weight) + ((bias,) if bias is not None else ()):
        tensor.requires_grad_(requires_grad)
    loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, ids, segments, advantages, old_logps, ref_logps,
                                              bias=bias, chunk_size=chunk_size, inplace=inplace, backend="triton",
                                              **options)
    backward(loss, options)


def backward(loss, options):
    """Backward scales the finished gradients (by 2: not skipped), as on CUDA: with the Triton kernel."""
    if options["return_metrics"]:
        loss = loss[0]
    if loss.requires_grad:
        with mock.patch.object(library, "_scaled_on_device", lambda gradient: gradient.is_contiguous()):
            (2 * loss).backward()


# (return_entropy, requires_grad, entropy_grad): the entropy's gradient only exists with both of the others
LOGPROB_OPTIONS = [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                   (True, True, True)]


def call_logprobs(inputs, *, fused, return_entropy, requires_grad, entropy_grad):
    logits, ids = inputs["logits"].detach().clone().requires_grad_(requires_grad), inputs["completion_ids"]
    if fused:
        hidden = torch.randn(*ids.shape, 8, dtype=logits.dtype, device=KERNEL_DEVICE).requires_grad_(requires_grad)
        weight = torch.randn(logits.shape[-1], 8, dtype=logits.dtype, device=KERNEL_DEVICE)
        result = sk.fused_linear_token_logprobs(hidden, weight, ids, return_entropy=return_entropy, chunk_size=2,
                                                backend="triton")
    else:
        result = sk.token_logprobs(logits, ids, return_entropy=return_entropy, backend="triton")
    if requires_grad:
        logp, entropy = result if return_entropy else (result, None)
        total = logp.sum() + (entropy.sum() if entropy_grad and entropy is not None else 0)
        total.backward()


@functools.cache
def public_api_launches() -> frozenset[Launch]:
    """Dry run (kernels recorded, not run) of every public entry point over its options, dtypes and shapes."""
    with recorded_launches(execute=False) as launches:
        for dtype, options in itertools.product(DTYPES, option_grid(LOSS_OPTIONS)):
            inputs = loss_inputs(2, 3, 5, dtype, per_row_advantages=options["per_row_advantages"])
            call_loss(inputs, **options)
        for dtype, options in itertools.product(DTYPES, option_grid(FUSED_OPTIONS)):
            inputs = loss_inputs(2, 3, 5, dtype, per_row_advantages=options["per_row_advantages"])
            call_loss(inputs, fused=True, **options)
        # objectives and KL estimators are runtime flags; cispo/vespo also sum logp per sentence, geo_mean its
        # clipped log-ratios (the GEO constexpr), and token weights add two sums and a per-token factor
        for dtype, objective, fused, weighted in itertools.product(DTYPES, ["cispo", "sapo", "geo_mean", "vespo"],
                                                                   [False, True], [False, True]):
            inputs = loss_inputs(2, 3, 5, dtype, per_row_advantages=False)
            is_weights = torch.rand(2, 3, dtype=dtype, device=KERNEL_DEVICE) if weighted else None
            call_loss(inputs, fused=fused, per_row_advantages=False, with_old=True, requires_grad=True,
                      inplace=False, beta=0.1, return_metrics=True, objective=objective, kl_estimator="abs",
                      kl_importance_weighting=True, is_weights=is_weights)
        for dtype, shape, sliced, index_dtype, fused in itertools.product(
                DTYPES, SHAPES, [False, True], [torch.int64, torch.int32], [False, True]):
            inputs = loss_inputs(*shape, dtype, sliced=sliced, index_dtype=index_dtype)
            call_loss(inputs, fused=fused, per_row_advantages=False, with_old=True, requires_grad=True,
                      inplace=False, beta=0.1, return_metrics=True)
            if index_dtype != torch.int64:
                continue                   # the log-prob functions take no segment ids: the same calls again
            for return_entropy, requires_grad, entropy_grad in LOGPROB_OPTIONS:
                call_logprobs(inputs, fused=fused, return_entropy=return_entropy, requires_grad=requires_grad,
                              entropy_grad=entropy_grad)
        for dtype, (batch, num_slots), weighting, scale, mode, baseline in itertools.product(
                DTYPES, [(4, 3), (2, 40), (1, 1)], ["output", "sentence"], ["std", "none"], ["sentence", "cumulative"],
                ["pooled", "split_final"]):
            rewards = torch.rand(batch, num_slots, dtype=dtype, device=KERNEL_DEVICE)
            counts = torch.full((batch,), num_slots, dtype=torch.int32, device=KERNEL_DEVICE)
            sk.group_sentence_advantages(rewards, counts, batch // 2 or 1, weighting=weighting, scale=scale, mode=mode,
                                         baseline=baseline, backend="triton")
    return frozenset(launches)


def build_in_subprocess(launches, tmp_path) -> dict:
    launches_file, results_file = tmp_path / "launches.json", tmp_path / "results.json"
    kernel_builds.save_launches(launches, str(launches_file))
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = run_builder(
        [sys.executable, "-m", "tools.kernel_builds", str(launches_file), "--results",
         str(results_file), "--jobs", str(max(2, os.cpu_count() or 1))], env=environment)
    print(completed.stdout[-4000:])
    assert results_file.exists(), f"the build process wrote no results:\n{completed.stdout}\n{completed.stderr}"
    return json.loads(results_file.read_text()) | {"returncode": completed.returncode, "stdout": completed.stdout}


def test_public_api_launches_cover_every_option():
    """The dry run reaches every kernel with both values of every constexpr flag (else the matrix is stale)."""
    launches = public_api_launches()
    flags = {}
    for launch in launches:
        for name, description in launch.arguments:
            if name.isupper() and description[0] == "bool":
                flags.setdefault((launch.kernel, name), set()).add(description[1])
    assert not kernel_builds.unbuilt_kernels({launch.kernel for launch in launches})
    one_sided = {key: values for key, values in flags.items() if values != {False, True}}
    assert not one_sided, f"flags the public API dry run sets one way only: {one_sided}"


def assert_every_launch_built(launches, tmp_path) -> None:
    outcome = build_in_subprocess(launches, tmp_path)
    failures = [f"{result['target']} {result['label']}: {result['error'][:600]}"
                for result in outcome["results"] if not result["ok"]]
    assert not failures, f"{len(failures)} builds failed:\n" + "\n".join(failures[:20])
    assert not outcome["unbuilt"], f"jit functions that no built kernel reaches: {outcome['unbuilt']}"
    built = {(result["kernel"], result["target"]) for result in outcome["results"]}
    kernels = {launch.kernel for launch in launches}
    assert built == {(kernel, target) for kernel in kernels for target in kernel_builds.TARGETS}
    assert {Launch.from_json(item) for result in outcome["results"] for item in result["launches"]} == launches
    assert outcome["returncode"] == 0, outcome["stdout"]


@pytest.mark.first
def test_every_public_api_launch_builds_for_real_targets(tmp_path):
    """The public API's launches: the long part of the builds, started first (no other test is needed for it)."""
    assert_every_launch_built(expand(public_api_launches()), tmp_path)


@pytest.mark.build
def test_every_launch_builds_for_real_targets(every_worker_launches, tmp_path):
    """The public API's launches and every launch of the other tests: what the test above built comes from
    Triton's cache (keyed by the kernel's source, its specialisation and the target), so this builds only what
    the other tests launched beyond it."""
    assert_every_launch_built(expand(public_api_launches() | every_worker_launches), tmp_path)


REPORT_TARGETS = {"sm90": {"_logsumexp_kernel": 10.0, "_logits_grad_kernel": 12.0}}   # instructions per logit, bf16


@pytest.mark.first
def test_compile_report_at_the_gpu_presets(tmp_path):
    """The static report builds what the GPU presets launch, reads the binaries, and the kernels hold the limits
    of docs/design.md ("Kernels on GPUs"): no spills, vectorised vocabulary loops (odd V and sliced rows too) without
    divisions, one exponential per logit (pass A: plus one per vector), pass A ≤ 10 and pass C ≤ 12 SASS
    instructions per bf16 logit on sm_90, no fp32→fp64 widening in fp64 kernels."""
    from benchmarks import compile_report
    where = compile_report.preset_launches(dtypes=("bfloat16",))
    kernels = {launch.kernel.split(":")[1] for launch in where}
    assert kernels == {"_logsumexp_kernel", "_sentence_sums_kernel", "_sentence_terms_kernel", "_token_coef_kernel",
                       "_logits_grad_kernel", "group_advantages_kernel"}
    logits_launches = [launch for launch in where if launch.kernel.endswith("_logsumexp_kernel")]
    assert {dict(launch.arguments)["logits_ptr"][1] for launch in logits_launches} == {"bfloat16"}
    assert {dict(launch.arguments)["BLOCK_V"][1] for launch in logits_launches} == {4096}

    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = run_builder([sys.executable, "-m", "benchmarks.compile_report", "--out", str(tmp_path), "--jobs", "2"],
                            env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(tmp_path / "compile_report.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {row["target"] for row in rows} == set(kernel_builds.TARGETS)
    assert {row["kernel"] for row in rows} == kernels
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16", "float16", "float64"}
    assert any("odd V" in row["presets"] for row in rows) and any("sliced" in row["presets"] for row in rows)
    for row in rows:
        where_ = f"{row['kernel']} {row['dtype']} {row['target']} ({row['presets']})"
        assert 8 <= int(row["registers"]) <= 255 and int(row["num_warps"]) in (4, 8, 16), where_
        assert int(row["spill_stores"]) == 0 and int(row["stack_bytes"]) == 0, f"spills: {where_}"
        if row["spill_loads"]:
            assert int(row["spill_loads"]) == 0, f"spills: {where_}"
        if row["dtype"] == "float64":
            assert int(row["fp64_widenings"]) == 0, f"an fp32 value widened in an fp64 kernel: {where_}"
        if row["kernel"] not in compile_report.VOCAB_KERNELS:
            continue
        assert int(row["loop_wide_loads"]) > 0, f"vocabulary loop without 128-bit loads: {where_}"
        assert int(row["loop_narrow_loads"]) == 0, f"narrow loads in the vocabulary loop: {where_}"
        if row["dtype"] == "float64":
            continue                   # fp64 exp2 is a libdevice polynomial (no MUFU), see docs/design.md
        assert int(row["loop_divisions"]) == 0, f"division in the vocabulary loop: {where_}"
        vector = 16 // getattr(torch, row["dtype"]).itemsize
        exps = 1 + 1 / vector if row["kernel"] == "_logsumexp_kernel" else 1
        assert float(row["exps_per_element"]) == pytest.approx(exps), where_
        limit = REPORT_TARGETS.get(row["target"], {}).get(row["kernel"])
        if limit is not None and row["dtype"] == "bfloat16":
            assert float(row["instructions_per_element"]) <= limit, f"{where_}: {row['instructions_per_element']}"
    assert "**Verdict**" in (tmp_path / "compile_report.md").read_text()


BROKEN_KERNEL = '''
import triton
import triton.language as tl

SCALE: tl.constexpr = 2.0      # accepted by the interpreter, refused by the compiler


@triton.jit
def scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)
'''


def test_a_kernel_the_compiler_refuses_fails_the_build(tmp_path):
    (tmp_path / "broken_kernels.py").write_text(BROKEN_KERNEL)
    launch = Launch("broken_kernels:scale_kernel", (("x_ptr", ("tensor", "float32", True)), ("n", ("int", 7)),
                                                   ("BLOCK", ("int", 8))), ())
    kernel_builds.save_launches([launch], str(tmp_path / "launches.json"))
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd(), environment.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, "-m", "tools.kernel_builds", "launches.json",
                                "--targets", "sm90", "gfx942", "--jobs", "1"], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=BUILD_SECONDS)
    assert completed.returncode == 1
    assert "2 failed" in completed.stdout
    assert "FAILED sm90 scale_kernel(" in completed.stdout and "FAILED gfx942 scale_kernel(" in completed.stdout
    assert "Cannot access global variable SCALE" in completed.stdout


def test_a_kernel_no_launch_reaches_is_reported():
    kernels = set(kernel_builds.package_kernels())
    launched = {name for name in kernels if not name.endswith(("_listed_tokens", "_tile"))}
    assert kernel_builds.unbuilt_kernels(launched) == []
    missing = "sgrpo_kernels.ops.triton.sentence_grpo:_token_coef_kernel"
    assert kernel_builds.unbuilt_kernels(launched - {missing}) == [missing]
    # a helper counts as built only through a built kernel that calls it
    assert "sgrpo_kernels.ops.triton.group_advantages:_tile" in kernel_builds.unbuilt_kernels(
        launched - {"sgrpo_kernels.ops.triton.group_advantages:group_advantages_kernel"})
