"""Summarise a GPU suite run: device, versions, ceilings, and each target of the issues with its measured ratio.

    python -m benchmarks.gpu_summary OUT_DIR     # reads environment.json, tests.txt, bench_*.csv there
"""

from __future__ import annotations

import csv
import json
import os
import sys

TARGET_SHAPE = dict(batch="8", length="2048", vocab="151936", dtype="bfloat16")   # N = 16384


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def pick(rows, provider, mode, metric, **shape):
    for row in rows:
        if (row["provider"], row["mode"], row["metric"]) == (provider, mode, metric) and all(
                row[key] == value for key, value in shape.items()):
            return float(row["value"]) if row["value"] else None, row
    return None, None


def loss_targets(rows: list[dict]) -> list[str]:
    """Issue 3: N=16384, V=151936, bf16, forward+backward."""
    lines = []
    for provider in ("triton", "triton-inplace"):
        time_ms, row = pick(rows, provider, "full", "time_ms", **TARGET_SHAPE)
        if time_ms is None:
            lines.append(f"- {provider}: no measurement")
            continue
        if not row["ratio_to_floor"]:
            lines.append(f"- {provider}: {time_ms:.2f} ms, {row['note']}: not judged")
            continue
        ratio = float(row["ratio_to_floor"])
        lines.append(f"- {provider}: {time_ms:.2f} ms = {ratio:.2f}× floor (target ≤ 1.3×): "
                     f"{'met' if ratio <= 1.3 else 'MISSED'}")
        peer = "liger-inplace" if provider.endswith("inplace") else "liger"
        peer_ms, _ = pick(rows, peer, "full", "time_ms", **TARGET_SHAPE)
        if peer_ms:
            lines.append(f"  - vs {peer}: {peer_ms:.2f} ms, ours {time_ms / peer_ms:.2f}× its time "
                         f"({'faster' if time_ms < peer_ms else 'SLOWER'})")
    extra_mib, _ = pick(rows, "triton-inplace", "full", "extra_peak_mib", **TARGET_SHAPE)
    if extra_mib is not None:
        logits_mib = 8 * 2048 * 151936 * 2 / 2**20
        share = extra_mib / logits_mib
        lines.append(f"- triton-inplace extra peak memory: {extra_mib:.0f} MiB = {100 * share:.2f}% of the logits "
                     f"(target ≤ 5%): {'met' if share <= 0.05 else 'MISSED'}")
    return lines


FUSED_SHAPE = dict(batch="8", length="2048", vocab="151936", hidden="4096", dtype="bfloat16")   # N = 16384


def fused_linear_targets(rows: list[dict]) -> list[str]:
    """Issue 4: N=16384, H=4096, V=151936, bf16, forward+backward."""
    time_ms, row = pick(rows, "triton", "full", "time_ms", **FUSED_SHAPE)
    if time_ms is None:
        return ["- triton: no measurement"]
    if not row["ratio_to_floor"]:
        lines = [f"- triton: {time_ms:.1f} ms, {row['note']}: not judged"]
    else:
        ratio = float(row["ratio_to_floor"])
        lines = [f"- triton: {time_ms:.1f} ms = {ratio:.2f}× floor (target ≤ 1.5×): "
                 f"{'met' if ratio <= 1.5 else 'MISSED'}"]
    extra_mib, _ = pick(rows, "triton", "full", "extra_peak_mib", **FUSED_SHAPE)
    if extra_mib is not None:
        gradients_mib = (8 * 2048 + 151936) * 4096 * 2 / 2**20     # grad of hidden and of the weight, bf16
        beyond = extra_mib - gradients_mib
        lines.append(f"- triton extra peak beyond the gradients: {beyond:.0f} MiB (target ≤ 1536): "
                     f"{'met' if beyond <= 1536 else 'MISSED'}")
    for metric, label in (("time_ms", "time"), ("extra_peak_mib", "extra peak memory")):
        ours, _ = pick(rows, "triton", "full", metric, **FUSED_SHAPE)
        peer, _ = pick(rows, "liger", "full", metric, **FUSED_SHAPE)
        if ours is not None and peer:
            lines.append(f"- {label} vs LigerFusedLinearGRPOLoss: ours {ours:.1f}, Liger {peer:.1f} "
                         f"({'better' if ours < peer else 'WORSE'})")
    return lines


def main(out_dir: str) -> None:
    environment_path = os.path.join(out_dir, "environment.json")
    environment = json.load(open(environment_path)) if os.path.exists(environment_path) else {}
    print("# GPU suite summary\n")
    for key in ("device", "torch", "triton", "liger_kernel", "copy_bandwidth_gbps", "bf16_matmul_tflops"):
        value = environment.get(key)
        print(f"- {key}: {value:.1f}" if isinstance(value, float) else f"- {key}: {value}")
    tests_path = os.path.join(out_dir, "tests.txt")
    if os.path.exists(tests_path):
        lines = [line for line in open(tests_path).read().splitlines() if line.strip()]
        print(f"- tests: {' | '.join(lines[-2:])}")
    print("\n## Loss from logits (issue 3), N=16384, V=151936, bf16, forward+backward\n")
    print("\n".join(loss_targets(read_rows(os.path.join(out_dir, "bench_loss.csv")))))
    print("\n## Fused linear path (issue 4), N=16384, H=4096, V=151936, bf16, forward+backward\n")
    print("\n".join(fused_linear_targets(read_rows(os.path.join(out_dir, "bench_fused_linear.csv")))))
    for name in ("bench_loss.md", "bench_fused_linear.md"):
        table_path = os.path.join(out_dir, name)
        if os.path.exists(table_path):
            print(f"\n### {name}\n\n" + open(table_path).read())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out/gpu")
