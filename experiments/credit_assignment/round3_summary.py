"""Round 3's tables and plot from its records (``round3.py summarise``): what the protocol fixed, nothing else.

Writes ``round3/summary.md`` (the learning-rate sweeps, the primary measure per regime and method with the paired
intervals against GSPO and the difference the design could detect, the secondary measures, the noisy scorer's
question, the long chains) and ``round3/sampled_accuracy.png`` (held-out sampled accuracy against answers sampled,
one panel per regime). Runs that have not finished yet are left out and counted.
"""

from __future__ import annotations

import math
import os
import statistics

import compare_levels
import round3
from round3 import BASELINE, BUDGET, L16, L16_RERUN, L16_SEEDS, L16_VARIANTS, LR_GRID, METHODS_OF, REGIMES, SEEDS

T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879}
ROUND2 = os.path.join(round3.HERE, "round2", "L16")


def paired(first: list[float], second: list[float]) -> dict | None:
    """Mean, 95 % t-interval, wins and the difference detectable with 80 % power of ``first − second``."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    if len(differences) < 2:
        return None
    count = len(differences)
    mean, error = statistics.mean(differences), statistics.stdev(differences) / math.sqrt(count)
    t975 = compare_levels.T_975.get(count - 1, 1.96)
    return dict(mean=mean, low=mean - t975 * error, high=mean + t975 * error, wins=sum(d > 0 for d in differences),
                count=count, detectable=(t975 + T_80.get(count - 1, 0.84)) * error)


def described(result: dict | None) -> str:
    if result is None:
        return "–"
    return (f"{result['mean']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}] "
            f"({result['wins']}/{result['count']} higher; detectable ±{result['detectable']:.3f})")


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def seed_records(regime: str, method: str) -> dict[int, list[dict]]:
    """The finished comparison runs of a cell, by seed (at the rate its sweep chose)."""
    lr = round3.chosen_lr(regime, method)
    if lr is None:
        return {}
    found = {seed: round3.read_records(round3.record_path(regime, method, lr, seed)) for seed in SEEDS}
    return {seed: records for seed, records in found.items() if records is not None}


def area_of(records: list[dict], regime: str, key: str) -> float:
    return round3.area(round3.sampled_curve(records, REGIMES[regime].answers_per_step, key))


def answers_to(records: list[dict], regime: str, target: float = 0.5) -> float:
    """Answers sampled until the held-out sampled accuracy first reaches ``target`` (inf: never)."""
    curve = round3.sampled_curve(records, REGIMES[regime].answers_per_step)
    return next((answers for answers, value in sorted(curve) if value >= target), math.inf)


def mean_over_steps(records: list[dict], key: str) -> float:
    values = [record[key] for record in records if key in record and record[key] is not None]
    return statistics.mean(values) if values else float("nan")


def sweep_table() -> list[str]:
    lines = ["| regime | method | " + " | ".join(f"rate {index + 1}" for index in range(2)) + " | chosen |",
             "| --- | --- | --- | --- | ---: |"]
    for regime, settings in REGIMES.items():
        for method in METHODS_OF[regime]:
            cells = []
            for lr in LR_GRID[settings.mu]:
                records = round3.read_records(round3.record_path(regime, method, lr, round3.SWEEP_SEED))
                cells.append(f"{lr:g}: " + ("–" if records is None else f"{round3.primary(records, settings):.3f}"))
            chosen = round3.chosen_lr(regime, method)
            shown = "–" if chosen is None else f"{chosen:g}"
            lines.append(f"| {regime} | {method} | " + " | ".join(cells) + f" | {shown} |")
    return lines


def primary_table() -> tuple[list[str], dict]:
    """Per regime and method: the primary measure over seeds and the paired difference to GSPO."""
    lines = ["| regime | method | lr | seeds | primary: sampled accuracy, area over 0–1 600 answers | − gspo, 95 % CI "
             "(seeds higher; detectable at 80 % power) |", "| --- | --- | ---: | ---: | ---: | --- |"]
    areas = {}
    for regime in REGIMES:
        base = seed_records(regime, BASELINE)
        for method in METHODS_OF[regime]:
            runs = seed_records(regime, method)
            areas[regime, method] = {seed: round3.primary(records, REGIMES[regime]) for seed, records in runs.items()}
            shared = sorted(set(runs) & set(base))
            difference = None if method == BASELINE else paired(
                [areas[regime, method][seed] for seed in shared],
                [round3.primary(base[seed], REGIMES[regime]) for seed in shared])
            lr = round3.chosen_lr(regime, method)
            lines.append(f"| {regime} | {method} | {'–' if lr is None else f'{lr:g}'} | {len(runs)} | "
                         f"{spread(list(areas[regime, method].values()))} | {described(difference)} |")
    return lines, areas


def secondary_table() -> list[str]:
    lines = ["| regime | method | greedy accuracy, area | sampled accuracy at 1 600 | answers to 0.5 sampled "
             "(per seed) | mis-taught facts' sampled error, area | clip fraction (mean; last update) | ratio mean "
             "(last update) | median grad norm | training CPU s |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for regime in REGIMES:
        for method in METHODS_OF[regime]:
            runs = list(seed_records(regime, method).values())
            if not runs:
                continue
            greedy = [area_of(records, regime, "eval_accuracy") for records in runs]
            final = [round3.sampled_curve(records, REGIMES[regime].answers_per_step)[-1][1] for records in runs]
            reached = ", ".join("never" if math.isinf(value) else f"{value:.0f}"
                                for value in (answers_to(records, regime) for records in runs))
            errors = [area_of(records, regime, "eval_error_mistaught") for records in runs]
            clip = [mean_over_steps(records, "clip_fraction") for records in runs]
            clip_last = [mean_over_steps(records, "clip_fraction_last") for records in runs
                         if any("clip_fraction_last" in record for record in records)]
            ratio_last = [mean_over_steps(records, "ratio_mean_last") for records in runs
                          if any("ratio_mean_last" in record for record in records)]
            norms = statistics.median(record["grad_norm"] for records in runs for record in records
                                      if "grad_norm" in record)
            cpu = [sum(record.get("cpu_seconds", 0.0) for record in records) for records in runs]
            lines.append(f"| {regime} | {method} | {spread(greedy)} | {spread(final)} | {reached} | {spread(errors)} | "
                         f"{spread(clip, 4)}; {spread(clip_last, 4)} | {spread(ratio_last, 4)} | {norms:.3g} | "
                         f"{spread(cpu, 0)} |")
    return lines


def noise_lines(areas: dict) -> list[str]:
    """Does the noisy scorer cost sentence credit more than answer credit: (method − gspo) noisy minus clean."""
    lines = ["| method | (method − gspo) with noisy step scores − (method − gspo) with exact ones, 95 % CI |",
             "| --- | --- |"]
    for method in ("seed", "process", "grpo"):
        noisy, clean = areas.get(("b16-mu4-noise", method), {}), areas.get(("b16-mu4", method), {})
        noisy_base, clean_base = areas.get(("b16-mu4-noise", BASELINE), {}), areas.get(("b16-mu4", BASELINE), {})
        shared = sorted(set(noisy) & set(clean) & set(noisy_base) & set(clean_base))
        lines.append(f"| {method} | " + described(paired([noisy[s] - noisy_base[s] for s in shared],
                                                         [clean[s] - clean_base[s] for s in shared])) + " |")
    return lines


def long_chain_lines() -> list[str]:
    """The remedy at L = 16 under round 2's protocol, paired with round 2's records of the same seeds."""
    variants = {f"{variant} (round 3)": (os.path.join(round3.OUT, L16), variant, round3.chosen_lr(L16, variant))
                for variant in L16_VARIANTS}
    variants |= {"sentence (round 2)": (ROUND2, "sentence", 3e-4), "output (round 2)": (ROUND2, "output", 3e-4),
                 "mix (round 2)": (ROUND2, "mix", 3e-4)}
    runs = {}
    for name, (folder, variant, lr) in variants.items():
        if lr is None:
            continue
        found = {seed: round3.read_records(os.path.join(folder, f"{round3.run_name(variant, lr, seed)}.metrics.jsonl"))
                 for seed in L16_SEEDS}
        runs[name] = {seed: records for seed, records in found.items() if records is not None}
    if not runs:
        return ["(no run yet)"]
    base = runs.get("output (round 2)", {})
    lines = ["| variant | seeds | mean greedy accuracy, steps 5–50 | − output, 95 % CI | mean answer length at step 50 "
             "(tokens) | seeds at the length limit | sampled error, mis-taught facts, at 50 |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, seeds in runs.items():
        accuracy = {seed: compare_levels.mean_accuracy(records) for seed, records in seeds.items()}
        shared = sorted(set(accuracy) & set(base))
        difference = None if name.startswith("output") else paired(
            [accuracy[seed] for seed in shared], [compare_levels.mean_accuracy(base[seed]) for seed in shared])
        lengths = [[record for record in records if "completion_tokens" in record][-1]["completion_tokens"]
                   for records in seeds.values()]
        errors = [next(record["sampled_error_mistaught"] for record in reversed(records)
                       if "sampled_error_mistaught" in record) for records in seeds.values()]
        lines.append(f"| {name} | {len(seeds)} | {spread(list(accuracy.values()))} | {described(difference)} | "
                     f"{spread(lengths, 0)} | {sum(length >= 185 for length in lengths)} | {spread(errors)} |")
    rerun = round3.read_records(round3.record_path(L16, *L16_RERUN))
    original = round3.read_records(os.path.join(ROUND2, f"{round3.run_name(*L16_RERUN)}.metrics.jsonl"))
    if rerun and original:
        pairs = [(a["eval_accuracy"], b["eval_accuracy"]) for a, b in zip(
            [r for r in rerun if "eval_accuracy" in r], [r for r in original if "eval_accuracy" in r])]
        lines += ["", f"Round 2's `sentence` at seed 4 run again: held-out greedy accuracy at steps 0, 5, …, 50 "
                      f"{', '.join(f'{a:.3f}' for a, _ in pairs)} against round 2's "
                      f"{', '.join(f'{b:.3f}' for _, b in pairs)}."]
    return lines


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(REGIMES), figsize=(4.3 * len(REGIMES), 4.2), sharey=True)
    for axis, (regime, settings) in zip(axes, REGIMES.items()):
        drawn = 0
        for method in METHODS_OF[regime]:
            curves = [round3.sampled_curve(records, settings.answers_per_step)
                      for records in seed_records(regime, method).values()]
            if not curves:
                continue
            length = min(map(len, curves))
            answers = [answers for answers, _ in curves[0][:length]]
            columns = list(zip(*([value for _, value in curve[:length]] for curve in curves)))
            axis.plot(answers, [statistics.mean(column) for column in columns], label=f"{method} ({len(curves)})",
                      marker=".")
            axis.fill_between(answers, [min(column) for column in columns], [max(column) for column in columns],
                              alpha=0.12)
            drawn += 1
        noise = f", step scores flipped at {settings.step_noise:g}" if settings.step_noise else ", exact step scores"
        axis.set_title(f"{regime}\n{settings.answers_per_step} answers/step, mu={settings.mu}{noise}", fontsize=9)
        axis.set(xlabel="training answers sampled", xlim=(0, BUDGET), ylim=(0, 1))
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize=8, title="method (seeds)", title_fontsize=8)
        else:
            axis.text(BUDGET / 2, 0.5, "no run finished yet", ha="center", va="center", color="gray")
    axes[0].set_ylabel("held-out accuracy, 4 samples/problem at T=1")
    figure.suptitle("Round 3, chain task L=10: held-out sampled accuracy (mean over seeds, band: min–max)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise() -> str:
    finished = sum(round3.read_records(round3.record_path(*run)) is not None
                   for run in round3.queue() if run[2] is not None)
    table, areas = primary_table()
    sections = ["# Round 3: results", "",
                f"From the records beside this file ({finished} of {len(round3.queue())} runs finished); the protocol "
                "is `protocol.md`. Primary measure: the held-out sampled accuracy (100 problems × 4 samples at "
                "temperature 1) averaged over the rollout budget (trapezoid area over 0–1 600 answers / 1 600); "
                "paired differences by seed with Student's t; 'detectable' is the difference the design detects with "
                "80 % power at the observed spread.", "",
                "## Learning rates (seed 0, primary measure; the higher is kept)", "", *sweep_table(), "",
                "## Primary measure", "", *table, "",
                "## Secondary measures (mean ± sd over seeds)", "", *secondary_table(), "",
                "## Noisy step scores (b16-mu4 with each step's score flipped at 0.2)", "", *noise_lines(areas), "",
                "## Long chains (L = 16): the split final baseline under round 2's protocol", "", *long_chain_lines(),
                ""]
    text = "\n".join(sections)
    with open(os.path.join(round3.OUT, "summary.md"), "w") as handle:
        handle.write(text)
    plot(os.path.join(round3.OUT, "sampled_accuracy.png"))
    return text + f"\nplot: {os.path.join(round3.OUT, 'sampled_accuracy.png')}"
