"""Token vs sentence vs output level GRPO on the toy task, same compute budget, several seeds.

    python examples/compare_levels.py --model runs/sft --steps 60 --seeds 0 1 2

Every variant starts from the same checkpoint and gets the same number of steps, prompts and samples.
Writes ``compare_levels.png`` (reward and held-out accuracy, mean ± std over seeds), ``compare_levels.md``
(final accuracy per variant) and a copy of each run's ``metrics.jsonl`` into ``--out``; checkpoints go to
``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics

import torch

from sgrpo_kernels.trainer.grpo import GRPOLoop, GRPOLoopConfig
from sgrpo_kernels.trainer.tasks import arith
from sgrpo_kernels.trainer.tiny import load_pretrained

VARIANTS = {"token": ("token", "sum"), "sentence-sum": ("sentence", "sum"), "sentence-mean": ("sentence", "mean"),
            "output": ("output", "mean")}


def run_variant(name: str, seed: int, args) -> list[dict]:
    level, ratio_level = VARIANTS[name]
    model, tokenizer = load_pretrained(args.model)
    torch.manual_seed(seed)
    config = GRPOLoopConfig(level=level, ratio_level=ratio_level, steps=args.steps, prompts_per_step=args.prompts,
                            group_size=args.group_size, lr=args.lr, eval_every=args.eval_every, seed=seed)
    output_dir = os.path.join(args.work_dir, f"{name}-seed{seed}")       # checkpoints stay out of --out
    train = arith.read_jsonl(os.path.join(args.data_dir, "train.jsonl"))
    held_out = arith.read_jsonl(os.path.join(args.data_dir, "test.jsonl"))
    reward = arith.reward(chained=args.chained_correctness)
    GRPOLoop(model, tokenizer, train, held_out, arith.is_correct, reward, config, output_dir).train()
    shutil.copy(os.path.join(output_dir, "metrics.jsonl"), os.path.join(args.out, f"{name}-seed{seed}.metrics.jsonl"))
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    lines = ["| variant | held-out accuracy before | after (mean ± std over seeds) | final reward |",
             "| --- | ---: | ---: | ---: |"]
    for name, seeds in runs.items():
        for key, axis, window in (("reward", reward_axis, 5), ("eval_accuracy", accuracy_axis, 1)):
            curves = [[record[key] for record in records if record.get(key) is not None] for records in seeds]
            steps = [record["step"] for record in seeds[0] if record.get(key) is not None]
            length = min(map(len, curves))
            smooth = [[statistics.mean(curve[max(0, index - window + 1):index + 1]) for index in range(length)]
                      for curve in curves]
            mean = [statistics.mean(column) for column in zip(*smooth)]
            std = [statistics.stdev(column) if len(column) > 1 else 0.0 for column in zip(*smooth)]
            axis.plot(steps[:length], mean, label=name)
            axis.fill_between(steps[:length], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              alpha=0.2)
        before = spread([records[0]["eval_accuracy"] for records in seeds])
        after = spread([[r["eval_accuracy"] for r in records if "eval_accuracy" in r][-1] for records in seeds])
        reward = spread([statistics.mean(r["reward"] for r in records[-10:] if "reward" in r) for records in seeds])
        lines.append(f"| {name} | {before[0]:.3f} | {after[0]:.3f} ± {after[1]:.3f} "
                     f"| {reward[0]:.3f} ± {reward[1]:.3f} |")
    reward_axis.set_title("training reward (mean over sentences, 5-step average)")
    accuracy_axis.set_title("held-out greedy accuracy")
    for axis in (reward_axis, accuracy_axis):
        axis.set_xlabel("GRPO step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "compare_levels.png"), dpi=100)
    table = "\n".join(lines)
    with open(os.path.join(args.out, "compare_levels.md"), "w") as handle:
        handle.write(f"{len(next(iter(runs.values())))} seeds, {args.steps} steps × {args.prompts} prompts × "
                     f"{args.group_size} answers, lr {args.lr}, from {args.model}"
                     f"{', chained step correctness' if args.chained_correctness else ''}\n\n{table}\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the SFT checkpoint every run starts from")
    parser.add_argument("--data-dir", default="data/arith", help="train.jsonl / test.jsonl (made by `sgrpo sft`)")
    parser.add_argument("--out", default="examples/results/compare_levels",
                        help="plot, table and per-run metrics.jsonl copies")
    parser.add_argument("--work-dir", default="runs/compare_levels", help="per-run checkpoints and logs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--chained-correctness", action="store_true",
                        help="the older step-correctness rule (a step after a slip scores 0), as in the first table")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = {name: [run_variant(name, seed, args) for seed in args.seeds] for name in args.variants}
    print(summarise(runs, args))


if __name__ == "__main__":
    main()
