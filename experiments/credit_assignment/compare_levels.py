"""Sentence-level GRPO against its baselines on the same task, same budget, several seeds, resumable.

    python experiments/credit_assignment/compare_levels.py --model runs/chain-sft --task chain --chain-length 6 \
        --steps 40 --seeds 0 1 2
    python experiments/credit_assignment/compare_levels.py --model runs/sft --task arith-small \
        --variants sentence output                                       # the toy task

Variants (each from the same checkpoint, with the same steps, prompts and samples):

- ``sentence``: sentence rewards, advantages and ratios (length-normalised sentence ratio; ``sentence-sum``: the
  product of its token ratios);
- ``output``: one reward per answer, the mean of the same sentence rewards (GSPO's ratio);
- ``output-sum``: the same with the product of the token ratios, so that the step size is not what differs;
- ``broadcast``: the sentence loss and ratios, every sentence given its answer's advantage (credit assignment
  without the token weighting);
- ``mix``: each sentence ``0.5 · its own advantage + 0.5 · its answer's`` (``answer_mix=0.5``, the seed's
  multi-scale fusion of sentence and answer credit);
- ``sentence-split``: the sentence level with each answer's last sentence normalised among the group's last
  sentences (``baseline="split_final"``, the remedy for the stopping bias of round 2 at 16 steps);
- ``sentence-split-outcome``: the same with each answer's last sentence scored as the answer's outcome
  (``chain.reward(final_outcome=True)``: a step or a cut sentence at the end states no answer and scores 0);
- ``cumulative``: each sentence the reward-to-go of the normalised sentence rewards;
- ``outcome``: the binary outcome of the answer on every sentence, output level (the R1 baseline; chain task);
- ``token-mu2``: token level with two updates per batch (with one update, on-policy, the token level's gradient
  is exactly the output level's: there is nothing to compare).

A run whose ``metrics.jsonl`` copy in ``--out`` already reaches ``--steps`` is not run again, so the comparison can
be run in parts (``--variants``, ``--seeds``) and resumed. Learning rates: ``--sweep 1e-4 2e-4 4e-4`` first runs
every variant at each rate on the first seed and keeps, per variant, the rate with the higher mean held-out accuracy
over the run's evaluations (ties: the one that reaches ``--target`` first), written to ``lr_sweep.md``; ``--lr-for
name=value`` sets one variant's rate by hand. Gradient clipping is off by default (``--max-grad-norm``), so that the
variants' different gradient scales (a sentence-level gradient is ~15× an output-level one) are absorbed by AdamW
alone. ``--snr-pairs K`` measures, at the starting checkpoint, the cosine between the gradients of two independent
batches (the same ``K`` pairs of batches for every variant): with ``g = μ + noise``, ``E[cos] ≈ |μ|² / (|μ|² +
E|noise|²)``, a per-batch signal-to-noise ratio ``cos / (1 − cos)``. With ``--mistaught`` (chain task) each run ends
by measuring how often the trained policy recalls the mis-taught and the other facts wrongly. Writes
``compare_levels.png`` (held-out greedy accuracy and gradient norm per step, mean and range over seeds),
``compare_levels.md`` (steps to ``--target`` accuracy, accuracy at fixed budgets, final reward, gradient cosine,
fact errors) and every run's ``metrics.jsonl`` into ``--out``; checkpoints go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics

import torch

from sgrpo_kernels.trainer.grpo import GRPOLoop, GRPOLoopConfig
from sgrpo_kernels.trainer.tasks import arith, chain
from sgrpo_kernels.trainer.tiny import load_pretrained

# name -> (GRPOLoopConfig options, reward options)
VARIANTS = {
    "sentence": (dict(level="sentence"), {}),
    "sentence-sum": (dict(level="sentence", ratio_level="sum"), {}),
    "output": (dict(level="output"), {}),
    "output-sum": (dict(level="output", output_ratio_level="sum"), {}),
    "broadcast": (dict(level="sentence", advantage="broadcast"), {}),
    "mix": (dict(level="sentence", answer_mix=0.5), {}),
    "sentence-split": (dict(level="sentence", baseline="split_final"), {}),
    "sentence-split-outcome": (dict(level="sentence", baseline="split_final"), dict(final_outcome=True)),
    "cumulative": (dict(level="sentence", advantage="cumulative"), {}),
    "outcome": (dict(level="output"), dict(outcome_only=True)),
    "token-mu2": (dict(level="token", mu=2), {}),
}


def task_of(args):
    """``(task module, reward, max_new_tokens)`` for ``args.task``."""
    if args.task == "chain":
        config = chain_config(args, mistaught=0)
        return chain, (lambda **options: chain.reward(config, **options)), 11 * args.chain_length + 16
    return arith, (lambda **options: arith.reward(chained=args.chained_correctness)), 64


def chain_config(args, mistaught: int) -> chain.ChainConfig:
    return chain.ChainConfig(length=args.chain_length, num_facts=args.chain_facts,
                             max_operand=args.chain_max_operand, facts_seed=args.chain_facts_seed,
                             mistaught=mistaught)


def finished(path: str, steps: int) -> list[dict] | None:
    """The records of a complete earlier run at ``path``, or ``None``."""
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return records if records and records[-1].get("step") == steps else None


def fact_errors(model, tokenizer, problems, args) -> dict:
    """Chain task: the share of sampled (temperature 1) and greedy steps that recall a fact wrongly, on the
    mis-taught facts and on the others (``chain.fact_error_rates``), over the held-out problems; per fact, the
    sampled ``[wrong, written]`` counts (``per_fact_sampled``)."""
    from sgrpo_kernels import Segmenter
    from sgrpo_kernels.trainer.common import generate

    config = chain_config(args, mistaught=args.mistaught)
    questions = [problem.question for problem in problems]
    result = {}
    model.eval()
    with torch.no_grad():
        for mode in ("sampled", "greedy"):
            _, _, ids, mask = generate(model, tokenizer, questions, max_new_tokens=11 * args.chain_length + 16,
                                       greedy=mode == "greedy")
            texts = Segmenter(tokenizer, "sentence")(ids, mask).texts
            rates = chain.fact_error_rates(questions, texts, config)
            result |= {f"{mode}_error_{group}": rate for group, rate in rates.items()}
            if mode == "sampled":
                result["per_fact_sampled"] = chain.per_fact_error_rates(questions, texts, config)
    return result


def make_loop(name: str, seed: int, lr: float, output_dir: str, args) -> GRPOLoop:
    """A fresh :class:`GRPOLoop` for variant ``name`` from ``args.model``."""
    options, reward_options = VARIANTS[name]
    task, reward, max_new_tokens = task_of(args)
    if reward_options and args.task != "chain":
        raise SystemExit(f"variant {name!r} needs the chain task's binary outcome reward")
    model, tokenizer = load_pretrained(args.model)
    config = GRPOLoopConfig(**options, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
                            lr=lr, eval_every=args.eval_every, seed=seed, max_new_tokens=max_new_tokens,
                            max_grad_norm=args.max_grad_norm)
    train = task.read_jsonl(os.path.join(args.data_dir, "train.jsonl"))
    held_out = task.read_jsonl(os.path.join(args.data_dir, "test.jsonl"))
    return GRPOLoop(model, tokenizer, train, held_out, task.is_correct, reward(**reward_options), config, output_dir)


def run_name(name: str, lr: float, seed: int) -> str:
    return f"{name}-lr{lr:g}-seed{seed}"


def run_variant(name: str, seed: int, lr: float, args) -> list[dict]:
    copy = os.path.join(args.out, f"{run_name(name, lr, seed)}.metrics.jsonl")
    records = finished(copy, args.steps)
    if records is not None:
        return records
    output_dir = os.path.join(args.work_dir, run_name(name, lr, seed))   # checkpoints stay out of --out
    if os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
        os.remove(os.path.join(output_dir, "metrics.jsonl"))           # an interrupted run starts over
    loop = make_loop(name, seed, lr, output_dir, args)
    torch.manual_seed(seed)
    model, tokenizer, held_out = loop.model, loop.tokenizer, loop.held_out
    loop.train()
    if args.task == "chain" and args.mistaught:       # a last record: the fact errors of the trained policy
        torch.manual_seed(seed)
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": args.steps, **fact_errors(model, tokenizer, held_out, args)}) + "\n")
    shutil.copy(os.path.join(output_dir, "metrics.jsonl"), copy)
    return finished(copy, args.steps)


def gradient_cosines(name: str, args) -> list[float]:
    """The cosine between the policy gradients of two independent batches at ``args.model``, for
    ``args.snr_pairs`` pairs; pair ``k`` uses the same two batches (prompts and samples) for every variant."""
    path = os.path.join(args.out, f"{name}.gradient_cosine.json")
    if os.path.exists(path):
        with open(path) as handle:
            cached = json.load(handle)
        if len(cached) >= args.snr_pairs:
            return cached[:args.snr_pairs]
    loop = make_loop(name, 0, args.lr, os.path.join(args.work_dir, f"{name}-gradients"), args)
    parameters = [parameter for parameter in loop.model.parameters() if parameter.requires_grad]

    def gradient(batch_seed: int) -> torch.Tensor:
        torch.manual_seed(batch_seed)
        loop.generator.manual_seed(batch_seed)
        batch = loop.rollout()
        segment_ids, advantages = loop.advantages(batch)
        loss, _ = loop.policy_loss(batch, segment_ids, advantages, loop._logprobs(loop.model, batch), None)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                          for g, p in zip(grads, parameters)])

    cosines = [torch.nn.functional.cosine_similarity(gradient(10_000 + 2 * k), gradient(10_001 + 2 * k),
                                                     dim=0).item() for k in range(args.snr_pairs)]
    with open(path, "w") as handle:
        json.dump(cosines, handle)
    return cosines


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def steps_to(records: list[dict], target: float) -> int | None:
    """The first evaluated step whose held-out accuracy reaches ``target`` (``None``: never)."""
    return next((step for step, value in zip(*curve(records, "eval_accuracy")) if value >= target), None)


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def described(step: int | None) -> str:
    return "never" if step is None else str(step)


def mean_accuracy(records: list[dict]) -> float:
    """Held-out accuracy averaged over the evaluations after step 0 (the area under the curve)."""
    values = [value for step, value in zip(*curve(records, "eval_accuracy")) if step > 0]
    return statistics.mean(values) if values else 0.0


def choose_learning_rates(args) -> dict[str, float]:
    """``--sweep``: every variant at every rate on the first seed; per variant the rate with the higher primary
    measure (held-out accuracy averaged over the run's evaluations; ties: reaches ``--target`` first). Writes
    ``lr_sweep.md``."""
    from tqdm import tqdm

    seed, rates = args.seeds[0], sorted(args.sweep)
    work = [(name, lr) for name in args.variants for lr in rates if name not in args.lrs]
    results = {(name, lr): run_variant(name, seed, lr, args) for name, lr in tqdm(work, desc="lr sweep", unit="run")}
    chosen = dict(args.lrs)
    lines = [f"Learning-rate sweep, seed {seed}, {args.steps} steps, clipping "
             f"{'off' if math.isinf(args.max_grad_norm) else f'at {args.max_grad_norm:g}'}: steps to "
             f"{args.target:.2f} held-out greedy accuracy / mean accuracy over the run (the primary measure, "
             "which chooses).\n",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "| --- | " + " | ".join("---:" for _ in rates) + " | ---: |"]
    for name in args.variants:
        if name in args.lrs:
            continue

        def score(lr, name=name):                 # the primary measure decides, its ties the steps to target
            reached = steps_to(results[name, lr], args.target)
            return (-mean_accuracy(results[name, lr]), reached if reached is not None else math.inf)

        chosen[name] = min(rates, key=score)
        cells = [f"{described(steps_to(results[name, lr], args.target))} / {mean_accuracy(results[name, lr]):.3f}"
                 for lr in rates]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen[name]:g} |")
    with open(os.path.join(args.out, "lr_sweep.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return chosen


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(first: list[float], second: list[float]) -> str:
    """``mean [low, high] (k/n higher)`` of ``first[i] − second[i]`` over paired seeds: the 95 % confidence
    interval of Student's t with ``n − 1`` degrees of freedom (``–`` with fewer than two pairs)."""
    differences = [a - b for a, b in zip(first, second, strict=True)]
    if len(differences) < 2:
        return "–"
    mean, error = statistics.mean(differences), statistics.stdev(differences) / math.sqrt(len(differences))
    half = T_975.get(len(differences) - 1, 1.96) * error
    wins = sum(value > 0 for value in differences)
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] ({wins}/{len(differences)} higher)"


def paired_table(runs: dict, baseline: str = "output") -> str:
    """Each variant minus ``baseline`` in the primary measure, seed by seed (the runs of one seed share prompts and
    sampling seeds)."""
    if baseline not in runs or len(runs[baseline]) < 2:
        return ""
    base = [mean_accuracy(records) for records in runs[baseline]]
    lines = [f"| paired difference, variant − {baseline} | mean held-out accuracy over the run, 95 % CI (t, "
             f"{len(base) - 1} df) |", "| --- | --- |"]
    for name, seeds in runs.items():
        if name != baseline and len(seeds) == len(base):
            lines.append(f"| {name} − {baseline} | {paired_difference([mean_accuracy(r) for r in seeds], base)} |")
    return "\n".join(lines)


def per_fact_table(runs: dict, args) -> str:
    """Chain task: per fact, in how many final checkpoints of each variant its sampled recall is wrong more often
    than right (and the mean error rate), for the mis-taught facts and any other fact wrong in some checkpoint;
    then the facts that stay wrong in the majority of final checkpoints of every variant (a ceiling of the task)."""
    last = {name: [next((r["per_fact_sampled"] for r in reversed(records) if "per_fact_sampled" in r), None)
                   for records in seeds] for name, seeds in runs.items()}
    if any(table is None for tables in last.values() for table in tables):
        return ""
    mistaught = chain.misconceptions(chain_config(args, mistaught=args.mistaught))

    def rate(table, label):
        wrong, total = table.get(label, (0, 0))
        return wrong / total if total else 0.0

    facts = chain.facts(chain_config(args, mistaught=0))      # a label outside the table is a format error
    labels = sorted({label for tables in last.values() for table in tables for label in table
                     if label in facts and (label in mistaught or rate(table, label) > 0.5)})
    names = list(last)
    lines = ["| fact | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    stuck = []
    for label in labels:
        counts = {name: sum(rate(table, label) > 0.5 for table in last[name]) for name in names}
        cells = [f"{counts[name]}/{len(last[name])} ({statistics.mean(rate(t, label) for t in last[name]):.2f})"
                 for name in names]
        taught = f" (taught {mistaught[label]})" if label in mistaught else ""
        lines.append(f"| {label}{taught} | " + " | ".join(cells) + " |")
        if all(2 * counts[name] > len(last[name]) for name in names):
            stuck.append(label)
    verdict = (f"Facts wrong in the majority of final checkpoints of every variant: {', '.join(stuck)}."
               if stuck else "No fact stays wrong in the majority of final checkpoints of every variant.")
    return ("Per fact: final checkpoints whose sampled recall of the fact is wrong more often than right / "
            "checkpoints (mean sampled error rate); mis-taught facts with their misconception.\n\n"
            + "\n".join(lines) + f"\n\n{verdict}")


def compute_curve(records: list[dict]) -> tuple[list[float], list[float]]:
    """Held-out accuracy against the cumulative CPU seconds of training (rollout, rewards, update; the wall time
    where CPU time was not recorded) up to each evaluation."""
    spent, total = {0: 0.0}, 0.0
    for record in records:
        if "loss" in record:
            total += record.get("cpu_seconds", record.get("seconds", 0.0))
            spent[record["step"]] = total
    steps, values = curve(records, "eval_accuracy")
    return [spent.get(step, total) for step in steps], values


def summarise(runs: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, compute_axis, norm_axis) = plt.subplots(1, 3, figsize=(17, 4.4))
    grid = args.eval_every                  # budgets on the evaluation grid (and the last step, always evaluated)
    budgets = sorted({args.steps // 4 // grid * grid, args.steps // 2 // grid * grid, args.steps} - {0})
    errors = args.task == "chain" and args.mistaught > 0
    cosine = args.snr_pairs > 0
    lines = [f"| variant | lr | mean accuracy over the run | steps to {args.target:.2f} (per seed) | "
             + " | ".join(f"accuracy at {budget}" for budget in budgets) + " | final reward | median grad norm |"
             + (" gradient cosine (SNR) |" if cosine else "")
             + (" sampled error, mis-taught facts | other facts |" if errors else ""),
             "| --- | ---: | ---: | --- | " + " | ".join("---:" for _ in budgets) + " | ---: | ---: |"
             + (" ---: |" if cosine else "") + (" ---: | ---: |" if errors else "")]
    for name, seeds in runs.items():
        for key, axis in (("eval_accuracy", accuracy_axis), ("grad_norm", norm_axis)):
            curves = [curve(records, key) for records in seeds]
            length = min(len(values) for _, values in curves)
            steps = curves[0][0][:length]
            columns = list(zip(*(values[:length] for _, values in curves)))
            axis.plot(steps, [statistics.mean(column) for column in columns], label=name)
            axis.fill_between(steps, [min(column) for column in columns], [max(column) for column in columns],
                              alpha=0.15)
        paired = [compute_curve(records) for records in seeds]
        length = min(len(values) for _, values in paired)
        compute_axis.plot([statistics.mean(column) for column in zip(*(x[:length] for x, _ in paired))],
                          [statistics.mean(column) for column in zip(*(y[:length] for _, y in paired))],
                          label=name, marker=".")
        reached = [steps_to(records, args.target) for records in seeds]
        accuracy = []
        for budget in budgets:
            values = [dict(zip(*curve(records, "eval_accuracy"))).get(budget) for records in seeds]
            accuracy.append(spread([value for value in values if value is not None]))
        reward = spread([statistics.mean(record["reward"] for record in records[-5:] if "reward" in record)
                         for records in seeds])
        norm = statistics.median(record["grad_norm"] for records in seeds for record in records
                                 if "grad_norm" in record)
        row = (f"| {name} | {args.lrs.get(name, args.lr):g} | {spread([mean_accuracy(r) for r in seeds])} | "
               f"{', '.join(map(described, reached))} | "
               + " | ".join(accuracy) + f" | {reward} | {norm:.3g} |")
        if cosine:
            values = gradient_cosines(name, args)
            mean = statistics.mean(values)
            row += f" {spread(values)} ({mean / (1 - mean):.2f}) |"
        if errors:
            last = [next((r for r in reversed(records) if "sampled_error_mistaught" in r), {}) for records in seeds]
            row += "".join(f" {spread([r[key] for r in last if key in r])} |"
                           for key in ("sampled_error_mistaught", "sampled_error_other"))
        lines.append(row)
    seeds = len(next(iter(runs.values())))
    over_seeds = " (mean, range over seeds)" if seeds > 1 else ""
    accuracy_axis.set(title=f"held-out greedy accuracy{over_seeds}", xlabel="GRPO step",
                      ylabel="accuracy (fraction correct)")
    norm_axis.set(title=f"gradient norm before clipping{over_seeds}", xlabel="GRPO step", ylabel="L2 norm",
                  yscale="log")
    compute_axis.set(title="held-out accuracy per compute (mean over seeds)",
                     xlabel="training CPU seconds (rollout, rewards, update)", ylabel="accuracy (fraction correct)")
    for axis in (accuracy_axis, compute_axis, norm_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    clip = "no clipping" if math.isinf(args.max_grad_norm) else f"clipped at {args.max_grad_norm:g}"
    figure.suptitle(f"{args.task}" + (f", {args.chain_length} steps" if args.task == "chain" else "")
                    + f": {args.prompts} prompts × {args.group_size} answers per step, {clip}, "
                    f"{seeds} seed{'s' if seeds > 1 else ''}")
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "compare_levels.png"), dpi=100)
    caveat = ("One run per variant (one seed): an illustration, not evidence; runs of the same variant differ by "
              "several points of accuracy, so a difference this size says nothing about the levels. The "
              "multi-seed paired comparison is experiments/credit_assignment/.") if seeds == 1 else ""
    table = "\n\n".join(part for part in (caveat, "\n".join(lines), paired_table(runs),
                                             per_fact_table(runs, args) if errors else "") if part)
    with open(os.path.join(args.out, "compare_levels.md"), "w") as handle:
        handle.write(f"{args.task}, {seeds} seed{'s' if seeds > 1 else ''}, {args.steps} steps × {args.prompts} "
                     f"prompts × {args.group_size} answers, gradient clipping "
                     f"{'off' if math.isinf(args.max_grad_norm) else f'at {args.max_grad_norm:g}'}, from "
                     f"{args.model}\n\n{table}\n")
    return table


def finished_runs(args) -> dict[str, list[list[dict]]]:
    """``--runs NAME=DIR``: the records of finished ``sgrpo train`` runs; their configuration (steps, prompts, group
    size, learning rate, clipping) replaces the command line's."""
    runs, configs = {}, {}
    for pair in args.runs:
        name, _, folder = pair.partition("=")
        paths = [os.path.join(folder, file) for file in ("metrics.jsonl", "grpo_config.json")]
        if not name or not all(os.path.exists(path) for path in paths):
            raise SystemExit(f"--runs takes NAME=DIR with DIR holding a finished run's metrics.jsonl and "
                             f"grpo_config.json, got {pair!r}")
        with open(paths[0]) as handle:
            runs[name] = [[json.loads(line) for line in handle if line.strip()]]
        with open(paths[1]) as handle:
            configs[name] = json.load(handle)
    first = next(iter(configs.values()))
    args.steps, args.prompts, args.group_size = first["steps"], first["prompts_per_step"], first["group_size"]
    args.eval_every, args.max_grad_norm, args.snr_pairs = first["eval_every"], first["max_grad_norm"], 0
    args.lrs = {name: config["lr"] for name, config in configs.items()}
    args.model = ", ".join(folder.partition("=")[2] for folder in args.runs)
    return runs


def learning_rates(pairs: list[str]) -> dict[str, float]:
    rates = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in VARIANTS or not value:
            raise SystemExit(f"--lr-for takes variant=value with a variant of {', '.join(VARIANTS)}, got {pair!r}")
        rates[name] = float(value)
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="the SFT checkpoint every run starts from")
    parser.add_argument("--runs", nargs="+", metavar="NAME=DIR",
                        help="only tabulate and plot finished `sgrpo train` runs (their metrics.jsonl and "
                             "grpo_config.json in DIR) under the given names; runs nothing")
    parser.add_argument("--task", choices=("arith", "arith-small", "chain"), default="chain")
    parser.add_argument("--chain-length", type=int, default=6, help="chain task: steps per problem")
    parser.add_argument("--chain-facts", type=int, default=26, help="chain task: labels")
    parser.add_argument("--chain-max-operand", type=int, default=9, help="chain task: facts' operands in [1, this]")
    parser.add_argument("--chain-facts-seed", type=int, default=0,
                        help="chain task: the task instance (facts, mis-taught facts, misconceptions), as given to "
                             "`sgrpo sft`")
    parser.add_argument("--mistaught", type=int, default=0,
                        help="chain task: the facts mis-taught in the SFT checkpoint (as given to `sgrpo sft`), to "
                             "report the error rate on them after each run")
    parser.add_argument("--data-dir", help="train.jsonl / test.jsonl (made by `sgrpo sft`; default: sgrpo's own)")
    parser.add_argument("--out", default="runs/compare_levels", help="plot, table, metrics copies")
    parser.add_argument("--work-dir", default="runs/compare_levels", help="per-run checkpoints and logs")
    parser.add_argument("--variants", nargs="+", default=["sentence", "output", "broadcast"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of every variant without --lr-for")
    parser.add_argument("--lr-for", nargs="*", default=[], metavar="VARIANT=LR", help="per-variant learning rates")
    parser.add_argument("--sweep", nargs="*", type=float, default=[], metavar="LR",
                        help="choose each variant's learning rate among these on the first seed")
    parser.add_argument("--max-grad-norm", type=float, default=math.inf, help="gradient clipping (inf: off)")
    parser.add_argument("--snr-pairs", type=int, default=0,
                        help="pairs of independent batches whose gradient cosine is measured per variant")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.9, help="held-out accuracy whose first step is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: 0, torch's choice); 1 lets two runs share two cores")
    parser.add_argument("--chained-correctness", action="store_true",
                        help="arith tasks: the older step-correctness rule (a step after a slip scores 0)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.runs:
        return print(summarise(finished_runs(args), args) + f"\nplot: {os.path.join(args.out, 'compare_levels.png')}")
    if args.model is None:
        raise SystemExit("compare_levels.py: --model (the SFT checkpoint) is required unless --runs is given")
    args.lrs = learning_rates(args.lr_for)
    if args.snr_pairs < 0 or args.steps < 1 or not args.max_grad_norm > 0 or any(lr <= 0 for lr in args.sweep):
        raise SystemExit("--snr-pairs must be >= 0, --steps >= 1, --max-grad-norm and --sweep rates > 0")
    if args.threads < 0:
        raise SystemExit("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_dir is None:
        from sgrpo_kernels.cli.front import chain_data_name

        args.data_dir = os.path.join("data", chain_data_name(args) if args.task == "chain" else args.task)
    from tqdm import tqdm

    if args.sweep:
        args.lrs = choose_learning_rates(args)
    work = [(name, seed) for name in args.variants for seed in args.seeds]
    runs: dict = {name: [] for name in args.variants}
    for name, seed in tqdm(work, desc="runs", unit="run"):
        runs[name].append(run_variant(name, seed, args.lrs.get(name, args.lr), args))
    print(summarise(runs, args) + f"\nplot: {os.path.join(args.out, 'compare_levels.png')}")


if __name__ == "__main__":
    main()
