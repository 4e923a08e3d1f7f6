"""Training curves from ``metrics.jsonl`` as one PNG: reward, held-out accuracy, KL, clip fraction."""

from __future__ import annotations

import json

PANELS = (("reward", "reward (mean over sentences)"), ("eval_accuracy", "held-out accuracy (greedy)"),
          ("kl_mean", "KL to the reference (k3)"), ("clip_fraction", "clip fraction"))


def read_metrics(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for axis, (key, label) in zip(axes, PANELS):
        points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="o" if key == "eval_accuracy" else None, markersize=3)
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
