"""The benchmark harness measures what it claims: ratios, tables, a real run end to end (CPU, small)."""

import csv
import json
import math

import pytest
import torch

from benchmarks import bench_loss, harness, runner


def row(provider, value, metric="time_ms", mode="full"):
    return harness.Row(bench="loss", provider=provider, device="cpu", dtype="float32", batch=1, length=8, vocab=10,
                       hidden=0, tokens=8, mode=mode, metric=metric, value=value)


def test_reference_ratios_and_table():
    rows = [row("reference", 10.0), row("torch", 4.0), row("reference", 100.0, "extra_peak_mib"),
            row("torch", 25.0, "extra_peak_mib"), row("torch", None, "extra_peak_mib", mode="forward")]
    harness.fill_reference_ratios(rows)
    assert rows[1].ratio_to_reference == 0.4 and rows[3].ratio_to_reference == 0.25
    assert rows[4].ratio_to_reference is None
    table = harness.markdown_table(rows)
    assert "| B=1 T=8 V=10 float32 | torch | 4.0 | – | 0.40 | 25 | 0.250 |" in table


def test_cpu_peak_memory_sees_an_allocation():
    before = harness.reset_cpu_peak()
    block = torch.ones(64 * 2**20 // 4)
    assert harness.cpu_peak_bytes() - before >= 60 * 2**20
    del block


def test_small_run_end_to_end(tmp_path):
    preset = dict(device="cpu", shapes=[runner.Shape(1, 1024, 16000, "float32")], repeats=1, memory=("full",))
    rows = runner.run(bench_loss.SUITE, preset, ["reference", "torch-inplace"], str(tmp_path), repeats=1)
    with open(tmp_path / "bench_loss.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(rows) == 2 * (3 + 1)
    assert (tmp_path / "bench_loss.png").stat().st_size > 10_000
    assert all(float(record["value"]) > 0 for record in records)
    memory = {record["provider"]: float(record["value"]) for record in records if record["metric"] == "extra_peak_mib"}
    # the reference materialises several [N, V] fp32 tensors (64 MB each here); in place needs almost none
    assert memory["reference"] > 128 and memory["torch-inplace"] < 0.5 * memory["reference"]
    # nothing beats reading the logits twice and writing the gradient once (the eager backends' backward
    # alone only hands over a gradient, so only forward + backward is held to the floor)
    full = [record for record in records if record["metric"] == "time_ms" and record["mode"] == "full"]
    assert len(full) == 2 and all(float(record["ratio_to_floor"]) > 1 for record in full)


def test_gpu_summary_judges_targets(tmp_path, capsys):
    from benchmarks import gpu_summary

    def gpu_row(bench, provider, metric, value, ratio=None, **shape):
        record = harness.Row(bench=bench, provider=provider, device="cuda", dtype="bfloat16", batch=8, length=2048,
                             vocab=151936, hidden=shape.get("hidden", 0), tokens=16384, mode="full", metric=metric,
                             value=value, ratio_to_floor=ratio)
        return record
    harness.write_csv([gpu_row("loss", "triton", "time_ms", 6.0, 1.2), gpu_row("loss", "liger", "time_ms", 9.0),
                       gpu_row("loss", "triton-inplace", "time_ms", 7.0, 1.4),
                       gpu_row("loss", "triton-inplace", "extra_peak_mib", 100.0)], str(tmp_path / "bench_loss.csv"))
    harness.write_csv([gpu_row("fused_linear", "triton", "time_ms", 50.0, 1.1, hidden=4096)],
                      str(tmp_path / "bench_fused_linear.csv"))
    gpu_summary.main(str(tmp_path))
    text = capsys.readouterr().out
    assert "triton: 6.00 ms = 1.20× floor (target ≤ 1.3×): met" in text
    assert "vs liger: 9.00 ms, ours 0.67× its time (faster)" in text
    assert "triton-inplace: 7.00 ms = 1.40× floor (target ≤ 1.3×): MISSED" in text
    assert "2.11% of the logits (target ≤ 5%): met" in text
    assert "triton: 50.0 ms = 1.10× floor (target ≤ 1.5×): met" in text


def test_option_variants_run_and_compare_with_the_plain_backend(tmp_path):
    """Every option variant of ``benchmarks/options.py`` builds a loss that runs (on a tiny shape) and differs from
    the plain one; the options preset writes its own files with ratios to the plain backend."""
    from benchmarks import bench_fused_linear, options

    shape = runner.Shape(2, 48, 300, "float64", 16)
    inputs = bench_fused_linear.make_inputs(shape, torch.device("cpu"))
    plain = bench_fused_linear.provider("torch")(inputs).item()
    for variant in options.VARIANTS:
        value = bench_fused_linear.provider(f"torch:{variant}")(inputs).item()
        assert value == value, variant
        if variant != "dual_clip":                  # it acts only where ρ > 3 and Â < 0: not at this drift
            assert value != plain, variant
    preset = dict(bench_loss.PRESETS["options"], shapes=[runner.Shape(1, 64, 500, "float32")])
    rows = runner.run(bench_loss.SUITE, preset, ["torch", "torch:geo_mean"], str(tmp_path), repeats=1)
    assert (tmp_path / "bench_loss_options.md").exists() and not (tmp_path / "bench_loss.md").exists()
    ratios = [row.ratio_to_reference for row in rows if row.provider == "torch:geo_mean" and row.metric == "time_ms"
              and row.mode == "full"]
    assert len(ratios) == 1 and ratios[0] > 0
    assert "× torch" in (tmp_path / "bench_loss_options.md").read_text()


def test_matmuls_provider_computes_the_three_products():
    """The ``matmuls`` floor of the fused-linear benchmark does the path's products (chunked, over a chunk size
    smaller than the batch): its gradients are ``(h Wᵀ) W`` and ``(h Wᵀ)ᵀ h``."""
    from benchmarks import bench_fused_linear

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 300, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50000, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    bench_fused_linear.provider("matmuls")(dict(hidden=hidden, weight=weight)).backward()
    logits = hidden.detach() @ weight.detach().T
    torch.testing.assert_close(hidden.grad, logits @ weight.detach())
    torch.testing.assert_close(weight.grad, logits.reshape(-1, 50000).T @ hidden.detach().reshape(-1, 8))


def test_reward_benchmark_counts_one_forward_per_batch_in_one_pass(tmp_path, monkeypatch):
    from benchmarks import bench_rewards

    preset = dict(device="cpu", threads=0, hidden=32, layers=1, heads=2, answers=5, batch_size=2,
                  shapes=[(40, 4), (64, 8)], repeats=1, skip={64: ("batched",)})
    monkeypatch.setitem(bench_rewards.PRESETS, "tiny", preset)
    paths = bench_rewards.main(["--preset", "tiny", "--out", str(tmp_path)])
    with open(paths[0]) as handle:
        records = list(csv.DictReader(handle))
    calls = {(record["provider"], record["length"]): record["note"] for record in records}
    assert calls[("one_pass", "40")] == calls[("prm", "64")] == "3 forwards"          # ceil(5 answers / 2)
    assert calls[("cache", "40")] == f"{5 * (4 + 1)} forwards" and calls[("batched", "40")] == "10 forwards"
    assert calls[("batched", "64")] == "not timed"
    assert all(float(record["value"]) > 0 for record in records if record["note"] != "not timed")
    assert "| 64 | 8 | batched | not timed | – | 20 (planned) |" in open(paths[2]).read()


def fake_suite(floor_per_gbps: float = 100.0):
    """A suite whose providers do nothing: the runner's floors and judgements are then all there is to test."""
    return runner.Suite(name="fake", module="benchmarks.bench_loss", title="fake", floor_text="floor = 100 / copy_gbps",
                        make_inputs=lambda shape, device: {}, provider=lambda name: None, leaves=lambda name, x: [],
                        unavailable=lambda name, device: None,
                        floor_ms=lambda shape, ceilings: floor_per_gbps / ceilings["copy_gbps"])


def test_floors_take_the_best_ceiling_sampled_between_the_timed_runs(tmp_path, monkeypatch, capsys):
    """The ceilings are sampled before, between and after the timed runs; the floor uses the best sample, so a
    provider timed while the machine was busy is held to the fastest the machine was seen to copy."""
    events, bandwidths = [], iter([10.0, 20.0, 50.0, 25.0])       # GB/s: low first, best in the middle
    monkeypatch.setattr(runner, "measure_ceilings",
                        lambda device, with_matmul: events.append("ceiling") or {"copy_gbps": next(bandwidths)})
    monkeypatch.setattr(runner, "time_provider", lambda suite, name, inputs, device, repeats: events.append(name)
                        or {"forward": 3.0, "backward": 4.0, "full": 5.0})
    preset = dict(device="cpu", shapes=[runner.Shape(1, 8, 10, "float32")], memory=())
    rows = runner.run(fake_suite(), preset, ["a", "b"], str(tmp_path), repeats=1)
    assert events == ["ceiling", "a", "ceiling", "b", "ceiling", "ceiling"]
    full = {row.provider: row for row in rows if row.mode == "full"}
    assert full["a"].floor == full["b"].floor == 2.0              # 100 / 50, not 100 / 10 (the first sample)
    assert full["a"].ratio_to_floor == 2.5
    # the floor is that of forward + backward: neither half is held to it (nor fails it)
    assert all(row.floor is None and row.ratio_to_floor is None for row in rows if row.mode != "full")
    assert not harness.floor_failures(rows)
    record = json.loads((tmp_path / "bench_fake.json").read_text())
    assert record["ceilings"]["copy_gbps"] == {"best": 50.0, "samples": [10.0, 20.0, 50.0, 25.0]}
    assert record["floor_failed"] == []
    assert "copy_gbps 50 (best of 4, lowest 10)" in (tmp_path / "bench_fake.md").read_text()
    wrote = capsys.readouterr().out.strip().splitlines()[-1]      # every file, named at the end
    assert wrote == "wrote " + " ".join(str(tmp_path / f"bench_fake.{ext}") for ext in ("csv", "png", "md", "json"))


def test_a_time_below_its_floor_is_a_failed_measurement(tmp_path, monkeypatch, capsys):
    """A provider cannot beat the floor: a ratio below 1 is reported as a failed floor measurement in the table,
    the CSV and the JSON, and never as a ratio."""
    monkeypatch.setattr(runner, "measure_ceilings", lambda device, with_matmul: {"copy_gbps": 10.0})   # floor 10 ms
    monkeypatch.setattr(runner, "time_provider", lambda suite, name, inputs, device, repeats:
                        {"forward": 4.0, "backward": 6.0, "full": 8.0 if name == "fast" else 12.0})
    preset = dict(device="cpu", shapes=[runner.Shape(1, 8, 10, "float32")], memory=())
    rows = runner.run(fake_suite(), preset, ["fast", "slow"], str(tmp_path), repeats=1)
    full = {row.provider: row for row in rows if row.mode == "full"}
    assert full["fast"].ratio_to_floor is None and full["fast"].note == "floor measurement failed (ratio 0.80 < 1)"
    assert full["slow"].ratio_to_floor == 1.2 and full["slow"].note == ""
    table = (tmp_path / "bench_fake.md").read_text()
    assert "| fast | 8.0 | **floor measurement failed** (0.80 < 1) |" in table and "0.80 |" not in table
    assert "| slow | 12.0 | 1.20 |" in table and "1 of these times fell below their floor" in table
    with open(tmp_path / "bench_fake.csv") as handle:
        records = {(record["provider"], record["mode"]): record for record in csv.DictReader(handle)}
    assert records["fast", "full"]["ratio_to_floor"] == "" and "failed" in records["fast", "full"]["note"]
    assert records["slow", "forward"]["note"] == "" and records["slow", "backward"]["note"] == ""   # 4, 6 ms: halves
    failed = json.loads((tmp_path / "bench_fake.json").read_text())["floor_failed"]
    assert [(entry["provider"], entry["mode"], entry["time_ms"], entry["floor_ms"]) for entry in failed] == [
        ("fast", "full", 8.0, 10.0)]
    printed = capsys.readouterr().out
    assert "FAILED: fast B=1 T=8 float32 full: 8.0 ms, floor measurement failed (ratio 0.80 < 1)" in printed
    assert "1 time(s) below the floor: not results" in printed


def test_gpu_summary_does_not_judge_a_failed_floor(tmp_path, capsys):
    from benchmarks import gpu_summary

    record = harness.Row(bench="loss", provider="triton", device="cuda", dtype="bfloat16", batch=8, length=2048,
                         vocab=151936, hidden=0, tokens=16384, mode="full", metric="time_ms", value=6.0)
    harness.judge_floor(record, 7.5)
    harness.write_csv([record], str(tmp_path / "bench_loss.csv"))
    harness.write_csv([], str(tmp_path / "bench_fused_linear.csv"))
    gpu_summary.main(str(tmp_path))
    assert "triton: 6.00 ms, floor measurement failed (ratio 0.80 < 1): not judged" in capsys.readouterr().out


def test_bench_long_fused_points_and_liger_at_the_same_answers():
    """The fused linear path on the skewed batch, packed (ours) and padded (Liger's, eager here), and Liger on one
    long row: each point counts its tokens and measures a positive time and memory."""
    pytest.importorskip("liger_kernel", reason="Liger-Kernel is a peer installed by the dev extra")
    from benchmarks import bench_long

    common = dict(device="cpu", dtype="float32", vocab=2000, hidden=32, compiled=False)
    fused = {layout: bench_long.skew_point(dict(common, kind="skew", layout=layout, answers=4, longest=400))
             for layout in ("fused-packed", "liger-fused-padded")}
    assert fused["fused-packed"]["tokens"] == 400 + 3 * 40 and fused["liger-fused-padded"]["tokens"] == 4 * 400
    assert all(point["seconds"] > 0 and point["extra_bytes"] > 0 for point in fused.values())
    liger = bench_long.liger_long_point(dict(common, kind="liger", length=1000))
    assert liger["tokens"] == 1000 and liger["seconds"] > 0 and liger["extra_bytes"] > 0


def test_bench_long_points_measure_packed_below_padded():
    """bench_long's points at toy sizes, in this process: the long answer's numbers and its slice's gradients
    accounted for, and the skewed batch packed holding fewer tokens and less memory than padded."""
    from benchmarks import bench_long

    common = dict(device="cpu", dtype="float32", vocab=2000, hidden=32)
    long = bench_long.long_point(dict(common, kind="long", length=3000))
    assert long["tokens"] == 3000 and long["seconds"] > 0
    assert long["extra_bytes"] - long["beyond_gradients_bytes"] == 3000 * 32 * 4 + 2000 * 32 * 4
    skew = {layout: bench_long.skew_point(dict(common, kind="skew", layout=layout, answers=8, longest=1000))
            for layout in ("packed", "padded")}
    assert skew["packed"]["tokens"] == 1000 + 7 * 100 and skew["padded"]["tokens"] == 8 * 1000
    assert skew["packed"]["extra_bytes"] * 2 < skew["padded"]["extra_bytes"]
    assert [point["kind"] for point in bench_long.points(bench_long.PRESETS["cpu"])] == [
        "long", "long", "sp", "sp", "sp", "skew", "skew", "skew", "skew", "liger", "liger"]
    assert "| one answer of 3000 tokens | 3000 |" in bench_long.markdown([dict(
        long, point=bench_long.describe(dict(kind="long", length=3000)))])


def test_bench_trainers_trains_every_trainer_on_the_same_fixed_completions(tmp_path, monkeypatch):
    """bench_trainers end to end at a tiny shape, in this process: real ``train()`` steps of stock TRL and of the
    drop-in at its three levels (Liger skipped on the CPU, with its reason), the one fixed batch of completions (with
    several sentences each) handed to every trainer's loss at every step, and the four files with every point."""
    pytest.importorskip("trl", reason="the trainers are TRL's (the trl extra)")
    pytest.importorskip("datasets", reason="TRL trains on a datasets.Dataset")
    from benchmarks import bench_trainers
    from sgrpo_kernels.segmentation import Segmenter

    preset = dict(device="cpu", threads=1, hidden=32, layers=1, heads=2, batch=4, prompt=8, sentence=8, warmup=1,
                  steps=1, shapes=[(1000, 32)], isolate="none")
    monkeypatch.setitem(bench_trainers.PRESETS, "tiny", preset)
    results = bench_trainers.main(["--preset", "tiny", "--out", str(tmp_path)])
    ran = {result["point"]["trainer"]: result for result in results if "step_s" in result}
    assert set(ran) == {"trl", "token", "output", "sentence"}
    assert [(result["point"]["trainer"], bool(result["skipped"])) for result in results if "skipped" in result] == [
        ("trl-liger", True)]
    fixed = {result["completions_checksum"] for result in ran.values()}
    assert len(fixed) == 1 and all(result["loss_checksums"] == list(fixed) for result in ran.values())
    for result in ran.values():
        assert result["rollout_calls"] == 2 and math.isfinite(result["training_loss"])
        assert result["step_s"] >= result["loss_backward_s"] > result["forward_loss_s"] > 0
        assert result["train_added_mib"] > 0 and result["peak_mib"] > result["train_added_mib"]
    point = bench_trainers.Point(**ran["sentence"]["point"])
    _, completions = bench_trainers.fixed_completions(point)
    assert Segmenter(bench_trainers.word_tokenizer(1000))(completions).num_sentences.min() >= 2

    record = json.loads((tmp_path / "bench_trainers.json").read_text())
    assert record["same_completions"] == {"B=4 T=32 V=1000 H=32": True}
    assert "rollout_func" in record["generation"] and len(record["targets"]) == 4
    assert all(line.split(":")[0] in ("PASS", "FAIL") for line in record["targets"])
    with open(tmp_path / "bench_trainers.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 5 * len(bench_trainers.METRICS)
    ratios = {record["provider"]: record["ratio_to_reference"] for record in records
              if record["metric"] == "loss_backward_s"}
    assert ratios["trl"] == "1" and ratios["trl-liger"] == "" and float(ratios["sentence"]) > 0
    table = (tmp_path / "bench_trainers.md").read_text()
    assert table.count("| B=4 T=32 V=1000 H=32 |") == 5 and "| trl-liger | skipped: " in table
    assert (tmp_path / "bench_trainers.png").stat().st_size > 10_000
