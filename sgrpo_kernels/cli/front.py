"""The ``sgrpo`` command: supervised warm start, sentence-level GRPO, benchmarks.

    sgrpo sft   --task arith-small --drop-answer-line 0.6 --steps 500 --output-dir runs/sft
                # a tiny model + char tokenizer, supervised warm start on demonstrations that often omit the answer
    sgrpo train --task arith-small --model runs/sft --output-dir runs/grpo --steps 30 --prompts 16 --lr 1e-4
                # sentence-level GRPO from that checkpoint; prints held-out greedy accuracy before and after
    sgrpo bench --preset quick
                # the benchmark suite (from a source checkout)
"""

# This module is the command's front end: it parses and checks every argument with the standard library and the
# torch-free `sgrpo_kernels.choices` only, so that `sgrpo --help` and every mistake on the command line answer in a
# fraction of a second, with one line, before torch, transformers or a model is loaded (the package imports its
# public names on first use). The arrows (docs/design.md, "Layers and layout"), each one way: the console script
# `cli.console` -> this front end, and -> the commands `cli` (the package's __init__), which -> this front end (its
# parser, checks and data plan). This module imports neither of the two.

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys

from ..choices import (  # noqa: F401  (the command's names, defined once there)
    ADVANTAGE_BASELINES,
    ADVANTAGES,
    CHAIN_MAX_FACTS,
    CHAIN_MAX_LENGTH,
    CHAIN_MAX_OPERAND,
    CREDITS,
    DEFAULT_SENTENCE_RATIO_LEVEL,
    DEFAULT_STEP_SCORER_WEIGHT,
    LEVEL_AXES,
    LEVELS,
    RATIO_LEVELS,
    RATIOS,
    STEP_SCORER_KEYS,
    VERIFIER_MODES,
    parse_step_scorer,
)

TASKS = ("arith", "arith-small", "chain")
BENCH_PRESETS = ("quick", "cpu", "gpu", "options")
TRAIN_SIZE = 20000                       # problems in train.jsonl
# flags whose default stands only for the chain task (None: not given, so that giving one elsewhere is an error)
CHAIN_DEFAULTS = {"chain_length": 6, "chain_facts": 26, "chain_max_operand": 9, "chain_facts_seed": 0,
                  "mistaught_rate": 0.6}
STAMP = "stamp.json"
DATA_FILES = ("train.jsonl", "test.jsonl")


class UsageError(SystemExit):
    """A bad command line: exit status 2 and one line (``sgrpo train: error: ...``) on stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse prints the usage too; one line is enough
        raise UsageError(f"{self.prog}: error: {message}")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="arith",
                        help="the problem set: arith (operands <= 20), arith-small (operands <= 9) or chain "
                             "(a running value mod 10 over labelled steps whose operands are facts to recall) "
                             "(default: arith)")
    parser.add_argument("--chain-length", type=int, help="chain task: steps per problem, 1 to "
                        f"{CHAIN_MAX_LENGTH} (default: {CHAIN_DEFAULTS['chain_length']})")
    parser.add_argument("--chain-facts", type=int, help="chain task: labels, each a fact, 1 to "
                        f"{CHAIN_MAX_FACTS} (default: {CHAIN_DEFAULTS['chain_facts']})")
    parser.add_argument("--chain-max-operand", type=int, help="chain task: each fact an operand in [1, this], 1 to "
                        f"{CHAIN_MAX_OPERAND} (default: {CHAIN_DEFAULTS['chain_max_operand']})")
    parser.add_argument("--chain-facts-seed", type=int,
                        help="chain task: seed of the task instance: the facts' operands, which facts are mis-taught "
                             f"and their misconceptions, >= 0 (default: {CHAIN_DEFAULTS['chain_facts_seed']})")
    parser.add_argument("--data-dir", help="folder of train.jsonl and test.jsonl, written with stamp.json if "
                                           "missing; refused if its stamp disagrees with --task, --chain-*, "
                                           "--data-seed or --eval-size (default: data/<task>, for chain "
                                           "data/chain-L<length>-F<facts>[-O<max operand>][-S<facts seed>], a "
                                           "cache remade when the flags change)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the generated problems (test.jsonl: this seed + 1) (default: 0)")
    parser.add_argument("--output-dir", required=True, help="where the checkpoint, metrics and plots go (required)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the model and the sampling (default: 0)")
    parser.add_argument("--eval-size", type=int, default=300,
                        help="held-out problems for greedy accuracy (test.jsonl) (default: 300)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: 0, torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    checkout = source_checkout()
    epilog = __doc__ if checkout else __doc__.split("    sgrpo bench")[0]
    parser = _Parser(prog="sgrpo", description="Sentence-level GRPO with fused kernels.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{sft,train,bench}" if checkout else "{sft,train}")

    sft = commands.add_parser("sft", help="supervised warm start of a tiny model on the task",
                              description="Build a tiny Qwen2-style model with a character tokenizer (or load "
                                          "--model) and teach it the solution format by supervised fine-tuning; "
                                          "writes sft_metrics.jsonl, sft_loss.png and a save_pretrained checkpoint.")
    _common_arguments(sft)
    sft.add_argument("--model", help="a local model folder to start from (default: a new tiny model)")
    sft.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    sft.add_argument("--batch-size", type=int, default=64, help="problems per step (default: 64)")
    sft.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    sft.add_argument("--drop-answer-line", type=float, default=0.0, metavar="FRACTION",
                     help="arith tasks: share of demonstrations whose final 'Answer:' sentence is removed, 0 to 1 "
                          "(default: 0)")
    sft.add_argument("--mistaught", type=int, default=0,
                     help="chain task: facts the demonstrations write wrongly at --mistaught-rate (default: 0)")
    sft.add_argument("--mistaught-rate", type=float,
                     help="chain task: how often a mis-taught fact is written wrongly, 0 to 1 "
                          f"(default: {CHAIN_DEFAULTS['mistaught_rate']})")

    train = commands.add_parser("train", help="sentence-level GRPO from a checkpoint",
                                description="GRPO with per-sentence rewards (correctness, logic, format), group "
                                            "advantages and the fused loss; writes metrics.jsonl, training.png and "
                                            "save_pretrained checkpoints.")
    _common_arguments(train)
    train.add_argument("--model", required=True,
                       help="local model folder, e.g. the output of `sgrpo sft` (required)")
    train.add_argument("--level", choices=LEVELS, default="sentence",
                       help="scale of rewards and ratios (default: sentence)")
    train.add_argument("--credit", choices=CREDITS,
                       help="what gets an advantage: each sentence its own (sentence) or each answer one, from the "
                            "mean of its sentence rewards (answer); replaces the credit that --level stands for "
                            "(default: --level's: sentence for sentence, answer for token and output)")
    train.add_argument("--ratio", choices=RATIOS,
                       help="the segment whose importance ratio is clipped: each token, each sentence or the whole "
                            "output (GSPO); replaces the ratio that --level stands for (default: --level's own)")
    train.add_argument("--ratio-level", choices=RATIO_LEVELS, default=DEFAULT_SENTENCE_RATIO_LEVEL,
                       help="sentence level's ratio: exp of the sum of its token log-ratios or of their mean "
                            f"(default: {DEFAULT_SENTENCE_RATIO_LEVEL}; token level always sums, output level "
                            "always takes the mean)")
    train.add_argument("--advantage", choices=ADVANTAGES, default="sentence",
                       help="sentence level: each sentence its own normalised reward, their sum from it to the end "
                            "(reward-to-go), or its answer's normalised mean reward (default: sentence)")
    train.add_argument("--answer-mix", type=float, default=0.0,
                       help="sentence level, --advantage sentence: weight a in [0, 1] of the answer's normalised "
                            "mean reward fused into each sentence's advantage, (1-a)*sentence + a*answer "
                            "(default: 0, pure sentence credit; 1 is --advantage broadcast)")
    train.add_argument("--baseline", choices=ADVANTAGE_BASELINES, default="pooled",
                       help="sentence credit: one baseline over all sentences of the group (pooled, the seed) or the "
                            "last sentence of each answer normalised among the group's last sentences "
                            "(split_final: stopping is not systematically penalised) (default: pooled)")
    train.add_argument("--output-ratio-level", choices=RATIO_LEVELS,
                       help="output level's ratio: exp of the mean (GSPO) or of the sum of the answer's token "
                            "log-ratios (default: mean)")
    train.add_argument("--steps", type=int, default=40, help="GRPO steps (default: 40)")
    train.add_argument("--group-size", type=int, default=8,
                       help="answers sampled per prompt, G, at least 2 (default: 8)")
    train.add_argument("--prompts", type=int, default=8, help="prompts per step (default: 8)")
    train.add_argument("--beta", type=float, default=0.0, help="KL weight to the reference model (default: 0)")
    train.add_argument("--epsilon", type=float, default=0.2,
                       help="clip range of the ratio, in (0, 1) (default: 0.2)")
    train.add_argument("--scale", choices=("std", "none"), default="std",
                       help="divide group-centred rewards by their std (GRPO) or not (Dr. GRPO) (default: std)")
    train.add_argument("--mu", type=int, default=1, help="updates per batch of rollouts (default: 1)")
    train.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    train.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default: 1)")
    train.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (default: 10)")
    train.add_argument("--save-every", type=int, default=0,
                       help="steps between checkpoints (default: 0, only at the end)")
    train.add_argument("--resume", help="a checkpoint folder of an earlier run to continue from (default: none)")
    train.add_argument("--step-scorer", action="append", default=[], metavar="KIND=FOLDER[,KEY=VALUE...]",
                       help="add a local model folder as a reward term, once per KIND: verifier (P(yes) of a causal "
                            "LM after each step; keys mode, batch_size, yes, no) or prm (a process reward model read "
                            "at a tag after each sentence; keys step_tag, good_token, bad_token, label_ids=BAD:GOOD, "
                            f"batch_size); weight=W in (0, 1] (default {DEFAULT_STEP_SCORER_WEIGHT}) scales the "
                            "task's own terms by 1-W (default: none)")
    train.add_argument("--step-noise", type=float, default=0.0, metavar="P",
                       help="chain task: flip each step's score (not the answer line's) with probability P in [0, 1), "
                            "a noisy step scorer seeded by --seed (default: 0)")
    train.add_argument("--eval-samples", type=int, default=0, metavar="K",
                       help="also measure held-out accuracy over K answers per problem sampled at temperature 1 "
                            "(default: 0, greedy only)")
    train.add_argument("--outcome-reward", action="store_true",
                       help="chain task: every sentence gets the answer's binary outcome instead of its local "
                            "step reward, the one-reward-per-answer baseline (default: off)")

    if not checkout:        # an installed package has no benchmarks/: `sgrpo bench` is not offered (parse_arguments)
        return parser
    bench = commands.add_parser("bench", help="run the speed and memory benchmarks (source checkout)",
                                description="Run benchmarks/bench_loss.py and benchmarks/bench_fused_linear.py.")
    bench.add_argument("--preset", choices=BENCH_PRESETS, default="quick", help="(default: quick)")
    bench.add_argument("--out", default="benchmarks/out",
                       help="folder for CSV, PNG and Markdown (default: benchmarks/out)")
    return parser


# -- checks: standard library only ------------------------------------------------------------------------------
def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _require(condition: bool, args, message: str) -> None:
    if not condition:
        raise UsageError(f"sgrpo {args.command}: error: {message}")


def _at_least(args, dest: str, low: int) -> None:
    value = getattr(args, dest)
    _require(value >= low, args, f"{_flag(dest)} must be >= {low}, got {value}")


def _between(args, dest: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> None:
    value = getattr(args, dest)
    inside = math.isfinite(value) and (low < value if open_low else low <= value) and \
        (value < high if open_high else value <= high)
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    _require(inside, args, f"{_flag(dest)} must lie in {interval}, got {value:g}")


def _positive(args, dest: str) -> None:
    value = getattr(args, dest)
    _require(math.isfinite(value) and value > 0, args, f"{_flag(dest)} must be > 0, got {value:g}")


def _model_folder(args, dest: str, *, checkpoint: bool = False, path: str | None = None) -> None:
    """A folder that ``load_pretrained`` can read: config.json (valid JSON) and a tokenizer; for --resume also the
    trainer state that ``sgrpo train`` saves. ``path``: the folder when it is not the flag's whole value."""
    path, flag = getattr(args, dest) if path is None else path, _flag(dest)
    _require(os.path.exists(path), args, f"{flag} {path}: no such directory")
    _require(os.path.isdir(path), args, f"{flag} {path}: not a directory")
    config = os.path.join(path, "config.json")
    _require(os.path.isfile(config), args, f"{flag} {path}: not a model folder (no config.json); give the "
             "--output-dir of `sgrpo sft` or `sgrpo train`, or any save_pretrained folder")
    try:
        with open(config) as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        _require(False, args, f"{flag} {path}: config.json is not readable JSON ({error})")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    _require(any(os.path.isfile(os.path.join(path, name)) for name in tokenizer_files), args,
             f"{flag} {path}: holds a model but no tokenizer (none of {', '.join(tokenizer_files)})")
    if checkpoint:
        _require(os.path.isfile(os.path.join(path, "trainer_state.pt")), args,
                 f"{flag} {path}: not a checkpoint of `sgrpo train` (no trainer_state.pt)")


def _writable_folder(args, dest: str) -> None:
    """``path`` is a folder or can be made one: not a file, and its nearest existing parent is a writable folder."""
    path, flag = getattr(args, dest), _flag(dest)
    _require(not os.path.exists(path) or os.path.isdir(path), args, f"{flag} {path}: exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _require(os.path.isdir(parent), args, f"{flag} {path}: {parent} is not a directory")
    _require(os.access(parent, os.W_OK), args, f"{flag} {path}: {parent} is not writable")


def _check_chain(args) -> None:
    """The chain flags belong to --task chain; their defaults are filled in here."""
    names = ["chain_length", "chain_facts", "chain_max_operand", "chain_facts_seed"] + (
        ["mistaught_rate"] if args.command == "sft" else [])
    if args.task != "chain":
        for name in names:
            _require(getattr(args, name) is None, args, f"{_flag(name)} applies to --task chain, not {args.task}")
        return
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, CHAIN_DEFAULTS[name])
    _between(args, "chain_length", 1, CHAIN_MAX_LENGTH)
    _between(args, "chain_facts", 1, CHAIN_MAX_FACTS)
    _between(args, "chain_max_operand", 1, CHAIN_MAX_OPERAND)
    _at_least(args, "chain_facts_seed", 0)


def _check_sft(args) -> None:
    _at_least(args, "steps", 1)
    _at_least(args, "batch_size", 1)
    _positive(args, "lr")
    _between(args, "drop_answer_line", 0, 1)
    if args.model is not None:
        _model_folder(args, "model")
    if args.task == "chain":
        _require(args.drop_answer_line == 0, args, "--drop-answer-line applies to the arith tasks, not to chain")
        _between(args, "mistaught", 0, args.chain_facts)
        _require(not args.mistaught or args.chain_max_operand >= 2, args,
                 "--mistaught needs a wrong operand to write: --chain-max-operand must be >= 2")
        _between(args, "mistaught_rate", 0, 1)
    else:
        _require(args.mistaught == 0, args, f"--mistaught applies to --task chain, not {args.task}")


def _check_train(args) -> None:
    for dest, low in (("steps", 1), ("group_size", 2), ("prompts", 1), ("mu", 1), ("eval_every", 1),
                      ("save_every", 0)):
        _at_least(args, dest, low)
    _between(args, "beta", 0, math.inf, open_high=True)
    _between(args, "epsilon", 0, 1, open_low=True, open_high=True)
    _positive(args, "lr")
    _positive(args, "temperature")
    _require(args.advantage == "sentence" or args.level == "sentence", args,
             f"--advantage {args.advantage} is a sentence-level variant; --level is {args.level}")
    credit, ratio = LEVEL_AXES[args.level]
    _require(not (args.advantage == "broadcast" and args.credit == "sentence"), args,
             "--advantage broadcast gives every sentence its answer's advantage: it is --credit answer")
    credit = "answer" if args.advantage == "broadcast" else credit
    credit, ratio = args.credit or credit, args.ratio or ratio
    _require((credit, ratio) != ("sentence", "output"), args,
             "--credit sentence needs a ratio segment no longer than a sentence (--ratio token or sentence)")
    _require(args.advantage != "cumulative" or credit == "sentence", args,
             "--advantage cumulative sums sentence advantages: it needs --credit sentence")
    _between(args, "answer_mix", 0, 1)
    _require(not args.answer_mix or (credit == "sentence" and args.advantage == "sentence"), args,
             f"--answer-mix applies to --level sentence (or --credit sentence) with --advantage sentence, not "
             f"--credit {credit} --advantage {args.advantage}")
    _require(args.baseline == "pooled" or credit == "sentence", args,
             f"--baseline {args.baseline} splits the sentence baseline: it needs sentence credit, not --credit "
             f"{credit}")
    _between(args, "step_noise", 0, 1, open_high=True)
    _require(not args.step_noise or (args.task == "chain" and not args.outcome_reward), args,
             "--step-noise flips the chain task's step scores: it needs --task chain without --outcome-reward")
    _at_least(args, "eval_samples", 0)
    _require(args.output_ratio_level is None or args.level == "output", args,
             f"--output-ratio-level applies to --level output, not {args.level}")
    args.output_ratio_level = args.output_ratio_level or "mean"
    _require(not args.outcome_reward or args.task == "chain", args,
             f"--outcome-reward applies to --task chain, not {args.task}")
    _model_folder(args, "model")
    _check_step_scorers(args)
    if args.resume is not None:
        _model_folder(args, "resume", checkpoint=True)


def _check_step_scorers(args) -> None:
    """Each --step-scorer parses, names a model folder and a kind not given before; the weights leave room."""
    kinds = []
    for spec in args.step_scorer:
        try:
            kind, folder, _, _ = parse_step_scorer(spec)
        except ValueError as error:
            raise UsageError(f"sgrpo {args.command}: error: --step-scorer {error}") from None
        _require(kind not in kinds, args, f"--step-scorer {kind} is given twice")
        _model_folder(args, "step_scorer", path=folder)
        kinds.append(kind)


def check_arguments(args) -> None:
    """Every check of the command line that needs no torch; raises :class:`UsageError` with one line."""
    if args.command == "bench":
        _writable_folder(args, "out")
        return
    _at_least(args, "threads", 0)
    _at_least(args, "seed", 0)              # numpy's seed must be >= 0
    _at_least(args, "data_seed", 0)
    _at_least(args, "eval_size", 1)
    _check_chain(args)
    {"sft": _check_sft, "train": _check_train}[args.command](args)
    _writable_folder(args, "output_dir")
    if args.data_dir is not None:
        _require(not os.path.exists(args.data_dir) or os.path.isdir(args.data_dir), args,
                 f"--data-dir {args.data_dir}: exists and is not a directory")
    data_plan(args)                          # an explicit --data-dir that disagrees with the flags ends here


# -- the data cache ---------------------------------------------------------------------------------------------
def data_stamp(args) -> dict:
    """What the generated files depend on, by flag; ``sgrpo_kernels.cli`` adds the generator's own options."""
    stamp = {"task": args.task, "data_seed": args.data_seed, "train_size": TRAIN_SIZE, "eval_size": args.eval_size}
    if args.task == "chain":
        stamp.update(chain_length=args.chain_length, chain_facts=args.chain_facts,
                     chain_max_operand=args.chain_max_operand, chain_facts_seed=args.chain_facts_seed)
    return stamp


def default_data_dir(args) -> str:
    return os.path.join("data", chain_data_name(args) if args.task == "chain" else args.task)


def chain_data_name(args) -> str:
    """``chain-L<length>-F<facts>``, with ``-O<max operand>`` and ``-S<facts seed>`` when they are not the
    defaults."""
    name = f"chain-L{args.chain_length}-F{args.chain_facts}"
    if args.chain_max_operand != CHAIN_DEFAULTS["chain_max_operand"]:
        name += f"-O{args.chain_max_operand}"
    if getattr(args, "chain_facts_seed", 0) != CHAIN_DEFAULTS["chain_facts_seed"]:
        name += f"-S{args.chain_facts_seed}"
    return name


def read_stamp(data_dir: str) -> dict | None:
    try:
        with open(os.path.join(data_dir, STAMP)) as handle:
            stamp = json.load(handle)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stamp_difference(stamp: dict, expected: dict) -> str | None:
    """The first field of ``expected`` that ``stamp`` records otherwise, said with its flag; None when they agree."""
    for key, value in expected.items():
        if stamp.get(key) != value:
            flag = {"train_size": "the train set size"}.get(key, _flag(key))
            return f"{flag} {stamp.get(key, 'unrecorded')}, not {value}"
    return None


def data_plan(args) -> tuple[str, str]:
    """``(folder, action)`` for the task's JSONL files. ``action``: ``"use"`` (files and a matching stamp, or a
    user's own files without a stamp in an explicit --data-dir), ``"write"`` (generate and stamp), or
    ``"compare"`` (the default cache without a stamp, e.g. from an older version: regenerate, keeping the files
    when they come out the same). A default cache whose stamp differs is rewritten; an explicit --data-dir whose
    stamp differs, or that holds only one of the two files, is refused (nothing of the user's is overwritten)."""
    explicit = args.data_dir is not None
    data_dir = args.data_dir if explicit else default_data_dir(args)
    present = [os.path.isfile(os.path.join(data_dir, name)) for name in DATA_FILES]
    stamp, expected = read_stamp(data_dir), data_stamp(args)
    if not any(present):
        return data_dir, "write"
    if not all(present):
        missing = DATA_FILES[present.index(False)]
        _require(not explicit, args, f"--data-dir {data_dir}: has {DATA_FILES[present.index(True)]} but no {missing}")
        return data_dir, "write"
    if stamp is None:
        return data_dir, "use" if explicit else "compare"
    difference = stamp_difference(stamp, expected)
    if difference is None:
        return data_dir, "use"
    _require(not explicit, args, f"--data-dir {data_dir} was generated with {difference}; pass the flags it was "
             "made with or another --data-dir")
    return data_dir, "write"


# -- running ----------------------------------------------------------------------------------------------------
def _source_root() -> str:
    """The folder that holds the package: in a source checkout, the repository (with its ``benchmarks/``)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_checkout() -> bool:
    """Whether the package runs from a source checkout, whose ``benchmarks/`` ``sgrpo bench`` runs."""
    return os.path.isfile(os.path.join(_source_root(), "benchmarks", "bench_loss.py"))


def run_bench(args) -> None:
    for script in ("bench_loss", "bench_fused_linear"):
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--preset", args.preset, "--out",
                               args.out], cwd=_source_root())
        if done.returncode:
            raise SystemExit(f"sgrpo bench: benchmarks.{script} failed (exit status {done.returncode}; its output "
                             "is above)")


def parse_arguments(argv=None) -> argparse.Namespace:
    """The checked command line (defaults of the chain flags filled in); a bad one raises :class:`UsageError`."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["bench"] and not source_checkout():
        raise UsageError("sgrpo bench: error: runs the benchmarks of a source checkout (git clone the repository); "
                         "benchmarks/ was not found next to the package")
    args, unknown = build_parser().parse_known_args(argv)
    _require(not unknown, args, f"unrecognized arguments: {' '.join(unknown)}")     # said by the subcommand
    check_arguments(args)
    return args


@contextlib.contextmanager
def usage_errors_on_stderr():
    """A :class:`UsageError` raised inside (by the checks, or by a command about its data before it loads a model)
    is printed as its one line on stderr, then raised on (a ``SystemExit`` with status 2)."""
    try:
        yield
    except UsageError as error:
        print(error, file=sys.stderr)
        raise
