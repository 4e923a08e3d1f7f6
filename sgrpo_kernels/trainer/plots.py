"""Training curves from a ``metrics.jsonl`` as one PNG, one panel per quantity the run measured.

A panel is drawn only when the run's records hold its quantity: the KL panel only with ``beta > 0`` (the loop
measures no KL without a reference model), the clip-fraction panel only when some step clipped (on-policy with
``mu = 1`` every ratio is exactly 1 and the fraction is identically 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Panel:
    """``series``: ``(metrics key, legend label)`` pairs drawn on one axis; ``nonzero``: drawn only when some value is
    not 0 (a quantity that is 0 by construction in some runs); ``marked``: keys measured now and then (evaluations),
    drawn with a marker at each measurement."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    nonzero: bool = False
    unit_interval: bool = False
    marked: tuple[str, ...] = ()

    def points(self, records: list[dict], key: str) -> list[tuple[float, float]]:
        return [(record["step"], record[key]) for record in records if record.get(key) is not None]

    def measured(self, records: list[dict]) -> bool:
        values = [value for key, _ in self.series for _, value in self.points(records, key)]
        return bool(values) and (not self.nonzero or any(value != 0 for value in values))


GRPO_PANELS = (
    Panel("training reward", "mean sentence reward (0 to 1)", (("reward", "sampled answers"),), unit_interval=True),
    Panel("accuracy", "fraction of answers correct",
          (("train_accuracy", "train_acc: sampled training answers"), ("eval_accuracy", "held-out, greedy"),
           ("eval_sampled_accuracy", "held-out, sampled")),
          unit_interval=True, marked=("eval_accuracy", "eval_sampled_accuracy")),
    Panel("KL to the reference", "KL (nats per token, k3)", (("kl_mean", "mean over tokens"),)),
    Panel("clipped ratios", "fraction of segments clipped", (("clip_fraction", "clip fraction, mean over updates"),
                                                             ("clip_fraction_last", "last update")), nonzero=True),
    Panel("answer length", "tokens per answer", (("completion_tokens", "mean over sampled answers"),)),
)
SFT_PANELS = (
    Panel("training loss", "cross-entropy (nats per token)", (("loss", "batch loss"),)),
    Panel("learning rate", "AdamW step size (lr)", (("lr", "schedule"),)),
)


def read_metrics(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def measured_panels(records: list[dict], panels=GRPO_PANELS) -> list[Panel]:
    return [panel for panel in panels if panel.measured(records)]


def plot_metrics(metrics_path: str, png_path: str, title: str = "", panels=GRPO_PANELS) -> list[str]:
    """Draw the panels of ``panels`` that the run measured; returns their titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    shown = measured_panels(records, panels) or [panels[0]]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], shown):
        for key, label in panel.series:
            points = panel.points(records, key)
            if points:
                axis.plot(*zip(*points), label=label, marker="o" if key in panel.marked or len(points) < 3 else None,
                          markersize=4)
        if len(panel.series) > 1:
            axis.legend(fontsize=8)
        if panel.unit_interval:
            axis.set_ylim(-0.03, 1.03)
        axis.set_title(panel.title, fontsize=10)
        axis.set(xlabel="step", ylabel=panel.ylabel)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return [panel.title for panel in shown]
