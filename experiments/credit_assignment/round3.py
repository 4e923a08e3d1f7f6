"""Round 3 of the credit-assignment experiment: credit × ratio cells under several updates per batch, two batch
sizes at an equal rollout budget, a noisy step scorer, and long chains with a stopping-bias remedy.

    python experiments/credit_assignment/round3.py work --lane 0     # one run of the queue (a lane repeats it)
    python experiments/credit_assignment/round3.py lanes 2           # two background lanes, one thread each
    python experiments/credit_assignment/round3.py status            # what is finished, claimed, waiting
    python experiments/credit_assignment/round3.py summarise         # tables and plots of what is finished

The protocol (round3/protocol.md) fixes everything below before any run. A run's record (every step's
``metrics.jsonl`` line, then a last line with the commit of the code that ran it) lands in
``<records>/<regime>/<run>.metrics.jsonl`` when it finishes and is never run again; a run interrupted half-way
starts over. Lanes take the first run of the queue that is neither finished nor claimed by a live process (claims
live under ``--work-dir``; a claim of another boot or of a dead process is void), and a seed run only once its
cell's learning-rate sweep has finished.

Every run of a round must come from the same code, while the package goes on changing: ``lanes`` runs the code of
a git worktree at a fixed commit (``--code``, made with ``git worktree add``), and its records land in this
checkout's ``round3/`` (``--records``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                       # compare_levels.py, round 2's harness, beside this file
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.environ.get("SGRPO_ROUND3_RECORDS", os.path.join(HERE, "round3"))
NOTHING_LEFT, WAITING = 10, 11           # exit codes of `work` besides 0 (a run done) and 1 (an error)
WARM_STARTS = os.path.join(HERE, "warm-starts")

# (credit, ratio, the sentence ratio's level) of each method: the seed's (its sentence ratio length-normalised, the
# trainer's default, as in round 2; "seed-sum": the product of the token ratios, the seed's own formula),
# DeepSeekMath's process supervision, GSPO and GRPO
METHODS = {"seed": ("sentence", "sentence", "mean"), "process": ("sentence", "token", "mean"),
           "gspo": ("answer", "output", "mean"), "grpo": ("answer", "token", "mean"),
           "seed-sum": ("sentence", "sentence", "sum")}
BASELINE = "gspo"
LENGTH = 10                       # steps per chain in the main grid (the L = 10 warm start of round 2)
BUDGET = 1600                     # sampled training answers per run
EVAL_AT = (64, 128, 192, 256, 384, 512, 768, 1024, 1280, 1600)   # answers sampled when the held-out set is read
EVAL_PROBLEMS, EVAL_SAMPLES = 100, 4
WARMUP_ANSWERS = 128
GROUP_SIZE = 8
LR_GRID = {1: (1e-4, 3e-4), 4: (3e-5, 1e-4)}      # by updates per batch (4 full-batch updates ~ a 4x step)
SWEEP_SEED, SEEDS = 0, tuple(range(1, 9))


@dataclass(frozen=True)
class Regime:
    prompts: int                  # prompts per step (× GROUP_SIZE answers)
    mu: int                       # full-batch updates per batch
    step_noise: float = 0.0

    @property
    def answers_per_step(self) -> int:
        return self.prompts * GROUP_SIZE

    @property
    def steps(self) -> int:
        return BUDGET // self.answers_per_step


# in the order the lanes run them
REGIMES = {"b16-mu4": Regime(2, 4), "b16-mu1": Regime(2, 1), "b64-mu4": Regime(8, 4), "b64-mu1": Regime(8, 1),
           "b16-mu4-noise": Regime(2, 4, step_noise=0.2)}
MAIN_METHODS = ("seed", "process", "gspo", "grpo")
# the seed's product ratio only where several updates make the ratio act (at mu = 1 it is 1)
METHODS_OF = {name: MAIN_METHODS + (("seed-sum",) if regime.mu > 1 and not regime.step_noise else ())
              for name, regime in REGIMES.items()}

# Long chains (L = 16): the stopping-bias remedy under round 2's protocol (compare_levels.py: 50 steps x 8 prompts x
# 8 answers, mu = 1, greedy accuracy on 300 held-out problems every 5 steps), paired with round 2's records of the
# same seeds; "sentence" seed 4 is round 2's run again, for its checkpoint's samples (stopping_bias.py)
L16 = "L16"
# the remedies, in the order they were added (protocol.md, "Changes after the first run"): the split final baseline,
# then the same with each answer's last sentence scored as the answer's outcome
L16_VARIANTS, L16_RATES, L16_SEEDS = ("sentence-split", "sentence-split-outcome"), (3e-4, 6e-4), (0, 1, 2, 3, 4)
L16_VARIANT = L16_VARIANTS[0]
L16_RERUN = ("sentence", 3e-4, 4)


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def record_path(regime: str, method: str, lr: float, seed: int) -> str:
    return os.path.join(OUT, regime, f"{run_name(method, lr, seed)}.metrics.jsonl")


def read_records(path: str) -> list[dict] | None:
    """The records of a finished run (its last line is the final step's), or ``None``."""
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# -- the primary measure ---------------------------------------------------------------------------------------
def sampled_curve(records: list[dict], answers_per_step: int, key: str = "eval_sampled_accuracy"):
    """``(answers sampled, value)`` at each evaluation of ``key``."""
    return [(record["step"] * answers_per_step, record[key]) for record in records if record.get(key) is not None]


def area(points: list[tuple[float, float]], budget: int = BUDGET) -> float:
    """Trapezoid area under ``points`` over ``[0, budget]`` divided by ``budget``: the mean of the curve."""
    points = sorted(points)
    if not points or points[0][0] != 0 or points[-1][0] != budget:
        raise ValueError(f"a curve over [0, {budget}] needs points at both ends, got {points[:1]}…{points[-1:]}")
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:])) / budget


def primary(records: list[dict], regime: Regime) -> float:
    """Area under the held-out sampled accuracy over the rollout budget (the protocol's primary measure)."""
    return area(sampled_curve(records, regime.answers_per_step))


# -- the queue -------------------------------------------------------------------------------------------------
def chosen_lr(regime_name: str, method: str) -> float | None:
    """The sweep's rate with the higher primary measure on the sweep seed (ties: the lower), once both ran."""
    if regime_name == L16:
        return l16_chosen_lr(method)
    regime = REGIMES[regime_name]
    scores = {}
    for lr in LR_GRID[regime.mu]:
        records = read_records(record_path(regime_name, method, lr, SWEEP_SEED))
        if records is None:
            return None
        scores[lr] = primary(records, regime)
    return max(sorted(scores), key=lambda lr: scores[lr])


def queue() -> list[tuple[str, str, float | None, int]]:
    """Every run in the protocol's order: per regime, the sweep runs of every method, then the seeds (their rate is
    ``None`` until the sweep has chosen it)."""
    runs = []
    for variant in L16_VARIANTS:
        runs += [(L16, variant, lr, L16_SEEDS[0]) for lr in L16_RATES]
        runs += [(L16, variant, l16_chosen_lr(variant), seed) for seed in L16_SEEDS[1:]]
        if variant == L16_VARIANTS[0]:
            runs.append((L16, L16_RERUN[0], L16_RERUN[1], L16_RERUN[2]))
    for regime_name, regime in REGIMES.items():
        methods = METHODS_OF[regime_name]
        runs += [(regime_name, method, lr, SWEEP_SEED) for method in methods for lr in LR_GRID[regime.mu]]
        for seed in SEEDS:
            runs += [(regime_name, method, chosen_lr(regime_name, method), seed) for method in methods]
    return runs


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def claim_path(work_dir: str, regime: str, method: str, seed: int, lr: float | None) -> str:
    return os.path.join(work_dir, "claims", f"{regime}--{run_name(method, lr or 0.0, seed)}.claim")


def claimed(path: str) -> bool:
    """Whether ``path`` is the claim of a live process of this boot."""
    try:
        with open(path) as handle:
            claim = json.load(handle)
    except (OSError, ValueError):
        return False
    if claim.get("boot") != boot_id():
        return False
    try:
        os.kill(claim["pid"], 0)
    except (OSError, KeyError, TypeError):
        return False
    return True


def try_claim(path: str) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and not claimed(path):
        os.remove(path)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"pid": os.getpid(), "boot": boot_id(), "since": time.time()}, handle)
    return True


def work(args) -> int:
    """Run the first runnable run: 0 after a run, :data:`WAITING` when the rest waits on a sweep another lane is
    running, :data:`NOTHING_LEFT` when nothing is left (an error exits with 1, as Python does)."""
    waiting = False
    for regime, method, lr, seed in queue():
        if lr is None:
            waiting = True
            continue
        if os.path.exists(record_path(regime, method, lr, seed)):
            continue
        claim = claim_path(args.work_dir, regime, method, seed, lr)
        if not try_claim(claim):
            continue
        try:
            print(f"lane {args.lane}: {regime} {run_name(method, lr, seed)}", flush=True)
            run(regime, method, lr, seed, args)
        finally:
            os.remove(claim)
        return 0
    return WAITING if waiting else NOTHING_LEFT


# -- one run ---------------------------------------------------------------------------------------------------
def chain_config(mistaught: int = 0, length: int = LENGTH):
    from sgrpo_kernels.trainer.tasks import chain

    return chain.ChainConfig(length=length, mistaught=mistaught)


def problems(length: int = LENGTH):
    """The chain task's training and held-out problems, as ``sgrpo`` generates them (train seed 0, held-out seed
    1, the default instance)."""
    from sgrpo_kernels.trainer.tasks import chain

    options = dict(length=length, num_facts=26, max_operand=9, facts_seed=0)
    return chain.make_dataset(20000, seed=0, **options), chain.make_dataset(300, seed=1, **options)


def make_loop(regime_name: str, method: str, lr: float, seed: int, output_dir: str):
    import torch

    from sgrpo_kernels.trainer.grpo import GRPOLoop, GRPOLoopConfig
    from sgrpo_kernels.trainer.tasks import chain
    from sgrpo_kernels.trainer.tiny import load_pretrained

    regime = REGIMES[regime_name]
    credit, ratio, ratio_level = METHODS[method]
    per_step = regime.answers_per_step
    config = GRPOLoopConfig(credit=credit, ratio=ratio, ratio_level=ratio_level, steps=regime.steps,
                            prompts_per_step=regime.prompts,
                            group_size=GROUP_SIZE, mu=regime.mu, lr=lr, warmup_steps=WARMUP_ANSWERS // per_step,
                            max_grad_norm=math.inf, max_new_tokens=11 * LENGTH + 16, eval_every=regime.steps,
                            eval_steps=tuple(answers // per_step for answers in EVAL_AT), eval_samples=EVAL_SAMPLES,
                            seed=seed)
    train, held_out = problems()
    mistaught = chain_config(mistaught=8)

    def fact_errors(questions, sentences):
        return {f"error_{group}": rate for group, rate in chain.fact_error_rates(questions, sentences,
                                                                                 mistaught).items()}

    model, tokenizer = load_pretrained(os.path.join(WARM_STARTS, f"L{LENGTH}"))
    reward = chain.reward(chain_config(), step_noise=regime.step_noise, noise_seed=seed)
    loop = GRPOLoop(model, tokenizer, train, held_out[:EVAL_PROBLEMS], chain.is_correct, reward, config, output_dir,
                    eval_extra=fact_errors)
    torch.manual_seed(seed)
    return loop


def run(regime: str, method: str, lr: float, seed: int, args) -> None:
    if regime == L16:
        return run_l16(method, lr, seed, args)
    output_dir = os.path.join(args.work_dir, regime, run_name(method, lr, seed))
    shutil.rmtree(output_dir, ignore_errors=True)                 # an interrupted run starts over
    loop = make_loop(regime, method, lr, seed, output_dir)
    loop.train(progress=args.progress)
    publish(os.path.join(output_dir, "metrics.jsonl"), record_path(regime, method, lr, seed), regime)


def code_commit() -> str:
    """The commit of the code that runs (``HEAD`` of this file's checkout, ``+changes`` when it has any)."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=HERE, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def publish(metrics: str, target: str, regime: str) -> None:
    """Copy a finished run's ``metrics.jsonl`` to its record, with a last line naming the code's commit."""
    steps = 50 if regime == L16 else REGIMES[regime].steps
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(metrics, target + ".partial")
    with open(target + ".partial", "a") as handle:
        handle.write(json.dumps({"step": steps, "code": code_commit()}) + "\n")
    os.replace(target + ".partial", target)


# -- long chains: round 2's harness ----------------------------------------------------------------------------
def l16_arguments(work_dir: str) -> argparse.Namespace:
    """``compare_levels.py``'s arguments for round 2's L = 16 protocol (its commands in round2/protocol.md)."""
    from sgrpo_kernels.cli.front import chain_data_name

    args = argparse.Namespace(task="chain", chain_length=16, chain_facts=26, chain_max_operand=9,
                              chain_facts_seed=0, mistaught=8, steps=50, prompts=8, group_size=8, eval_every=5,
                              max_grad_norm=math.inf, model=os.path.join(WARM_STARTS, "L16"), target=0.9,
                              out=os.path.join(OUT, L16), work_dir=os.path.join(work_dir, L16), snr_pairs=0)
    args.data_dir = os.path.join(ROOT, "data", chain_data_name(args))
    return args


def l16_chosen_lr(variant: str) -> float | None:
    """Round 2's rule: the rate with the higher mean held-out greedy accuracy over steps 5-50 on seed 0 (ties: the
    one that reaches 0.9 first, then the lower)."""
    import compare_levels

    records = {lr: read_records(os.path.join(OUT, L16, f"{run_name(variant, lr, L16_SEEDS[0])}.metrics.jsonl"))
               for lr in L16_RATES}
    if any(value is None for value in records.values()):
        return None

    def score(lr):
        reached = compare_levels.steps_to(records[lr], 0.9)
        return (-compare_levels.mean_accuracy(records[lr]), reached if reached is not None else math.inf, lr)
    return min(L16_RATES, key=score)


def run_l16(variant: str, lr: float, seed: int, args) -> None:
    import compare_levels

    from sgrpo_kernels.trainer.tasks import chain

    options = l16_arguments(args.work_dir)
    if not all(os.path.exists(os.path.join(options.data_dir, name)) for name in ("train.jsonl", "test.jsonl")):
        os.makedirs(options.data_dir, exist_ok=True)
        train, held_out = problems(length=16)
        chain.write_jsonl(train, os.path.join(options.data_dir, "train.jsonl"))
        chain.write_jsonl(held_out, os.path.join(options.data_dir, "test.jsonl"))
    options.out = os.path.join(args.work_dir, L16, "copies")          # compare_levels' own copy of the record
    os.makedirs(options.out, exist_ok=True)
    compare_levels.run_variant(variant, seed, lr, options)
    publish(os.path.join(options.out, f"{run_name(variant, lr, seed)}.metrics.jsonl"),
            record_path(L16, variant, lr, seed), L16)


# -- lanes and status ------------------------------------------------------------------------------------------
def lanes(args) -> None:
    """Start ``count`` background lanes (``nohup``; each repeats ``work`` of the code at ``--code`` until the queue
    is empty, waits a minute when the rest waits on a sweep, and stops after three errors in a row), logging to
    ``--work-dir``/lane<k>.log; records go to ``--records``."""
    code = os.path.abspath(args.code)
    script_path = os.path.join(code, "experiments", "credit_assignment", "round3.py")
    if not os.path.exists(script_path):
        raise SystemExit(f"--code {code}: no experiments/credit_assignment/round3.py (make it with git worktree add)")
    os.makedirs(args.work_dir, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": code,
                                "SGRPO_ROUND3_RECORDS": os.path.abspath(args.records)}
    for lane in range(args.count):
        log = os.path.join(args.work_dir, f"lane{lane}.log")
        script = (f"errors=0; while [ $errors -lt 3 ]; do {sys.executable} {script_path} work --lane {lane} "
                  f"--work-dir {os.path.abspath(args.work_dir)}; status=$?; "
                  f"[ $status -eq {NOTHING_LEFT} ] && break; [ $status -eq {WAITING} ] && sleep 60; "
                  "[ $status -eq 0 ] && errors=0; "
                  f"[ $status -ne 0 ] && [ $status -ne {WAITING} ] && errors=$((errors + 1)) && sleep 5; done")
        subprocess.Popen(["nohup", "bash", "-c", script], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                         cwd=code, start_new_session=True, env=environment)
        print(f"lane {lane}: code {code}, log {log}")


def status(args) -> None:
    finished = claimed_now = waiting = pending = 0
    for regime, method, lr, seed in queue():
        if lr is None:
            waiting += 1
        elif os.path.exists(record_path(regime, method, lr, seed)):
            finished += 1
        elif claimed(claim_path(args.work_dir, regime, method, seed, lr)):
            claimed_now += 1
            print(f"running: {regime} {run_name(method, lr, seed)}")
        else:
            pending += 1
    print(f"finished {finished}, running {claimed_now}, ready {pending}, waiting on a sweep {waiting}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("work", help="run the first runnable run of the queue")
    one.add_argument("--lane", type=int, default=0)
    one.add_argument("--progress", action="store_true", help="show the run's progress bar")
    many = commands.add_parser("lanes", help="start background lanes")
    many.add_argument("count", type=int)
    many.add_argument("--code", required=True, help="a git worktree of this repository at the round's commit")
    many.add_argument("--records", default=OUT, help="where the records land (default: round3/ beside this file)")
    commands.add_parser("status")
    commands.add_parser("summarise")
    for command in commands.choices.values():
        command.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "round3"),
                             help="checkpoints, logs and claims (default: runs/round3)")
    args = parser.parse_args(argv)
    if args.command == "work":
        import torch

        torch.set_num_threads(1)
        return work(args)
    if args.command == "lanes":
        lanes(args)
    elif args.command == "status":
        status(args)
    else:
        from round3_summary import summarise

        print(summarise())
    return 0


if __name__ == "__main__":
    sys.exit(main())
