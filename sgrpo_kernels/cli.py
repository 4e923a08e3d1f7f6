"""The ``sgrpo`` command: supervised warm start, sentence-level GRPO, benchmarks.

    sgrpo sft   --task arith-small --drop-answer-line 0.6 --steps 500 --output-dir runs/sft
                # a tiny model + char tokenizer, supervised warm start on demonstrations that often omit the answer
    sgrpo train --task arith-small --model runs/sft --output-dir runs/grpo --steps 30 --prompts 16 --lr 1e-4
                # sentence-level GRPO from that checkpoint; prints held-out accuracy before and after
    sgrpo bench --preset quick
                # the benchmark suite (from a source checkout)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .config import RATIO_LEVELS
from .levels import DEFAULT_SENTENCE_RATIO_LEVEL, LEVELS

TASKS = ("arith", "arith-small", "chain")


def _task(args):
    """The task module of ``args.task`` and the keyword arguments of its ``make_dataset``."""
    if args.task == "chain":
        from .trainer.tasks import chain
        return chain, dict(length=args.chain_length, num_facts=args.chain_facts)
    if args.task in TASKS:
        from .trainer.tasks import arith
        return arith, arith.SIZES[args.task]
    raise ValueError(f"unknown task {args.task!r}; available: {', '.join(TASKS)}")


def _chain_config(args):
    """The chain task's configuration from the flags; a bad value ends the command with one line."""
    from .trainer.tasks import chain
    try:
        return chain.ChainConfig(length=args.chain_length, num_facts=args.chain_facts,
                                 mistaught=getattr(args, "mistaught", 0),
                                 error_rate=getattr(args, "mistaught_rate", 0.6))
    except ValueError as error:
        raise SystemExit(f"sgrpo {args.command}: {error}") from None


def _max_new_tokens(args) -> int:
    """Room for a whole solution: 64 characters for arith; a chain writes about 10 per step (``a: 7+1=8.``)."""
    return 64 if args.task != "chain" else 11 * args.chain_length + 16


def _datasets(args, train_size: int):
    """The task's JSONL files in ``args.data_dir`` (default ``data/<task>``, for the chain task
    ``data/chain-L<length>-F<facts>``; written on first use from a fixed seed), read back."""
    task, sizes = _task(args)
    data_dir, seed, eval_size = args.data_dir, args.seed, args.eval_size
    task_name = args.task if args.task != "chain" else f"chain-L{args.chain_length}-F{args.chain_facts}"
    data_dir = data_dir or os.path.join("data", task_name)
    os.makedirs(data_dir, exist_ok=True)
    paths = {split: os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "test")}
    if not all(os.path.exists(path) for path in paths.values()):
        task.write_jsonl(task.make_dataset(train_size, seed=seed, **sizes), paths["train"])
        task.write_jsonl(task.make_dataset(eval_size, seed=seed + 1, **sizes), paths["test"])
    return task.read_jsonl(paths["train"]), task.read_jsonl(paths["test"])


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="arith",
                        help="the problem set: arith (operands <= 20), arith-small (operands <= 9) or chain "
                             "(a running value mod 10 over labelled steps whose operands are facts to recall) "
                             "(default: arith)")
    parser.add_argument("--chain-length", type=int, default=6, help="chain task: steps per problem (default: 6)")
    parser.add_argument("--chain-facts", type=int, default=26, help="chain task: labels, each a fact (default: 26)")
    parser.add_argument("--data-dir", help="JSONL question/answer files, made if missing (default: data/<task>)")
    parser.add_argument("--output-dir", required=True, help="where the checkpoint, metrics and plots go")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out problems for greedy accuracy")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgrpo", description="Sentence-level GRPO with fused kernels.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{sft,train,bench}")

    sft = commands.add_parser("sft", help="supervised warm start of a tiny model on the task",
                              description="Build a tiny Qwen2-style model with a character tokenizer (or load "
                                          "--model) and teach it the solution format by supervised fine-tuning.")
    _common_arguments(sft)
    sft.add_argument("--model", help="a local model folder to start from (default: a new tiny model)")
    sft.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    sft.add_argument("--batch-size", type=int, default=64, help="problems per step (default: 64)")
    sft.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    sft.add_argument("--drop-answer-line", type=float, default=0.0, metavar="FRACTION",
                     help="share of demonstrations whose final 'Answer:' sentence is removed (default: 0)")
    sft.add_argument("--mistaught", type=int, default=0,
                     help="chain task: facts the demonstrations write wrongly at --mistaught-rate (default: 0)")
    sft.add_argument("--mistaught-rate", type=float, default=0.6,
                     help="chain task: how often a mis-taught fact is written wrongly (default: 0.6)")

    train = commands.add_parser("train", help="sentence-level GRPO from a checkpoint",
                                description="GRPO with per-sentence rewards (correctness, logic, format), group "
                                            "advantages and the fused loss; writes metrics.jsonl, plots and "
                                            "save_pretrained checkpoints.")
    _common_arguments(train)
    train.add_argument("--model", required=True, help="local model folder, e.g. the output of `sgrpo sft`")
    train.add_argument("--level", choices=LEVELS, default="sentence",
                       help="scale of rewards and ratios (default: sentence)")
    train.add_argument("--ratio-level", choices=RATIO_LEVELS, default=DEFAULT_SENTENCE_RATIO_LEVEL,
                       help="sentence level's ratio: exp of the sum of its token log-ratios or of their mean "
                            f"(default: {DEFAULT_SENTENCE_RATIO_LEVEL}; token level always sums, output level "
                            "always takes the mean)")
    train.add_argument("--advantage", choices=("sentence", "cumulative", "broadcast"), default="sentence",
                       help="sentence level: each sentence its own normalised reward, their sum from it to the end "
                            "(reward-to-go), or its answer's normalised mean reward (default: sentence)")
    train.add_argument("--output-ratio-level", choices=RATIO_LEVELS, default="mean",
                       help="output level's ratio: exp of the mean (GSPO) or of the sum of the answer's token "
                            "log-ratios (default: mean)")
    train.add_argument("--steps", type=int, default=40, help="GRPO steps (default: 40)")
    train.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt, G (default: 8)")
    train.add_argument("--prompts", type=int, default=8, help="prompts per step (default: 8)")
    train.add_argument("--beta", type=float, default=0.0, help="KL weight to the reference model (default: 0)")
    train.add_argument("--epsilon", type=float, default=0.2, help="clip range of the ratio (default: 0.2)")
    train.add_argument("--scale", choices=("std", "none"), default="std",
                       help="divide group-centred rewards by their std (GRPO) or not (Dr. GRPO) (default: std)")
    train.add_argument("--mu", type=int, default=1, help="updates per batch of rollouts (default: 1)")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    train.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    train.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (default: 10)")
    train.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only the end)")
    train.add_argument("--resume", help="a checkpoint folder of an earlier run to continue from")
    train.add_argument("--outcome-reward", action="store_true",
                       help="chain task: every sentence gets the answer's binary outcome instead of its local "
                            "step reward (the one-reward-per-answer baseline)")

    bench = commands.add_parser("bench", help="run the speed and memory benchmarks (source checkout)",
                                description="Run benchmarks/bench_loss.py and benchmarks/bench_fused_linear.py.")
    bench.add_argument("--preset", default="quick", help="quick, cpu or gpu (default: quick)")
    bench.add_argument("--out", default="benchmarks/out", help="folder for CSV, PNG and Markdown")
    return parser


def _threads(count: int) -> None:
    if count:
        torch.set_num_threads(count)


def run_sft(args) -> dict:
    from .trainer.sft import run_sft as sft
    from .trainer.tiny import char_tokenizer, load_pretrained, tiny_model

    _threads(args.threads)
    task, _ = _task(args)
    config = _chain_config(args) if args.task == "chain" else None     # checked before any data or model
    train, held_out = _datasets(args, 20000)
    if args.task == "chain":
        if args.drop_answer_line:
            raise SystemExit("sgrpo sft: --drop-answer-line applies to the arith tasks, not to chain")
        if args.mistaught:
            train = task.sloppy_demonstrations(train, config, seed=args.seed)
    elif args.mistaught:
        raise SystemExit("sgrpo sft: --mistaught applies to the chain task")
    elif args.drop_answer_line:
        train = task.drop_answer_lines(train, args.drop_answer_line, seed=args.seed)
    if args.model:
        model, tokenizer = load_pretrained(args.model)
    else:
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, seed=args.seed)
    accuracy = sft(model, tokenizer, train, held_out, task.is_correct, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, output_dir=args.output_dir, max_new_tokens=_max_new_tokens(args))
    summary = {"held_out_accuracy": accuracy, "output_dir": args.output_dir}
    print(json.dumps(summary))
    return summary


def run_train(args) -> dict:
    from .trainer.grpo import GRPOLoop, GRPOLoopConfig
    from .trainer.plots import plot_metrics
    from .trainer.tiny import load_pretrained

    _threads(args.threads)
    try:                                  # option combinations are checked before any data or model
        config = GRPOLoopConfig(level=args.level, ratio_level=args.ratio_level, advantage=args.advantage,
                                output_ratio_level=args.output_ratio_level, steps=args.steps,
                                prompts_per_step=args.prompts, group_size=args.group_size, mu=args.mu,
                                beta=args.beta, epsilon=args.epsilon, scale=args.scale, lr=args.lr,
                                temperature=args.temperature, eval_every=args.eval_every, save_every=args.save_every,
                                seed=args.seed, max_new_tokens=_max_new_tokens(args))
    except ValueError as error:
        raise SystemExit(f"sgrpo train: {error}") from None
    task, _ = _task(args)
    if args.outcome_reward and args.task != "chain":
        raise SystemExit("sgrpo train: --outcome-reward applies to the chain task")
    sentence_reward = (task.reward(_chain_config(args), outcome_only=args.outcome_reward) if args.task == "chain"
                       else task.reward())
    train, held_out = _datasets(args, 20000)
    model, tokenizer = load_pretrained(args.resume or args.model)
    loop = GRPOLoop(model, tokenizer, train, held_out, task.is_correct, sentence_reward, config, args.output_dir,
                    resume_from=args.resume)
    summary = loop.train()
    plot_metrics(os.path.join(args.output_dir, "metrics.jsonl"), os.path.join(args.output_dir, "training.png"),
                 title=f"sentence-level GRPO, level={args.level}")
    if "accuracy_before" in summary:
        print(f"held-out greedy accuracy ({len(held_out)} problems): {summary['accuracy_before']:.3f} before, "
              f"{summary['accuracy_after']:.3f} after {args.steps} GRPO steps")
    print(json.dumps(summary))
    return summary


def run_bench(args) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        sys.exit("sgrpo bench runs the benchmarks of a source checkout; benchmarks/ was not found next to the package")
    for script in ("bench_loss", "bench_fused_linear"):
        subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--preset", args.preset, "--out", args.out],
                       cwd=root, check=True)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    {"sft": run_sft, "train": run_train, "bench": run_bench}[args.command](args)


if __name__ == "__main__":
    main()
