"""The `sgrpo` command line: every argument is checked before torch, transformers or a model is loaded, and a bad
one ends the command with one line and exit status 2; `--help` is fast and shows every default; the data cache
carries a stamp of the generator's arguments and never silently disagrees with the flags."""

import ast
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from sgrpo_kernels.cli import console, front

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT = re.search(r'^sgrpo = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M).groups()
# the console script's own code (what pip writes for pyproject.toml's entry point), under -X importtime so that the
# test sees every module the command imported before it stopped
CONSOLE_SCRIPT = "import sys; from {} import {}; sys.exit({}())".format(*ENTRY_POINT, ENTRY_POINT[1])
HEAVY = ("torch", "transformers")
# what of the package the command may import before it runs a command: the package (its public names load on first
# use), the command line and the names it shares with the library
LIGHT = {"sgrpo_kernels", "sgrpo_kernels.cli", "sgrpo_kernels.cli.front", "sgrpo_kernels.cli.console",
         "sgrpo_kernels.choices"}


def heavy(imported: set[str]) -> set[str]:
    """The modules among ``imported`` (dotted names) that make a command slow to start."""
    return {name for name in imported if name.split(".")[0] in HEAVY
            or name.split(".")[0] == "sgrpo_kernels" and name not in LIGHT}


def sgrpo(*arguments, cwd=None):
    """Run the command as a user would; ``(exit status, stdout, stderr lines without the import times, the
    top-level names of the modules it imported)``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", CONSOLE_SCRIPT, *map(str, arguments)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    messages = [line for line in lines if not line.startswith("import time:")]
    return done.returncode, done.stdout, messages, imported


def assert_refused(arguments, fragment, cwd=None):
    status, out, messages, imported = sgrpo(*arguments, cwd=cwd)
    command = arguments[0] if arguments and arguments[0] in ("sft", "train", "bench") else None
    assert status == 2, (status, messages)
    assert len(messages) == 1, messages                                   # one line, no traceback, no usage
    assert messages[0].startswith(f"sgrpo {command}: error: " if command else "sgrpo: error: "), messages
    assert fragment in messages[0], messages
    assert "Traceback" not in messages[0] and out == ""
    # stopped before loading anything heavy (what makes it fast; a wall-clock bound would flake on a busy machine)
    assert not heavy(imported), heavy(imported)
    return messages[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder that looks like a saved model to the checks (they read config.json and look for a tokenizer)."""
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


# -- --help --------------------------------------------------------------------------------------------------------
def test_help_is_fast_imports_nothing_heavy_and_shows_every_default():
    for command in ([], ["sft"], ["train"], ["bench"]):
        status, out, messages, imported = sgrpo(*command, "--help")
        assert status == 0 and messages == [] and "usage: sgrpo" in out
        assert not heavy(imported), heavy(imported)                      # fast: nothing heavy is imported
    commands = front.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"sft", "train", "bench"}
    for name, parser in commands.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            said = "(required)" if action.required else "(default: "
            assert said in action.help, (name, action.dest, action.help)
            if isinstance(action.default, (int, str)) and not isinstance(action.default, bool):
                assert f"default: {action.default}" in action.help, (name, action.dest, action.help)


def test_console_script_and_module_entry_points():
    """pyproject.toml points the console script at the torch-free console module; ``python -m sgrpo_kernels.cli``
    (which imports the package, hence torch) runs the same checks."""
    assert ENTRY_POINT == ("sgrpo_kernels.cli.console", "main")
    done = subprocess.run([sys.executable, "-m", "sgrpo_kernels.cli", "train", "--model", "/nonexistent/model",
                           "--output-dir", "out"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "sgrpo train: error: --model /nonexistent/model: no such directory"


def test_the_front_end_and_the_library_share_one_definition_of_each_choice():
    from sgrpo_kernels import choices, cli, config, levels
    from sgrpo_kernels.trainer import grpo
    from sgrpo_kernels.trainer.tasks import arith, chain

    assert cli.build_parser is front.build_parser
    assert front.LEVELS is levels.LEVELS is choices.LEVELS and front.RATIO_LEVELS is config.RATIO_LEVELS
    assert front.DEFAULT_SENTENCE_RATIO_LEVEL is levels.DEFAULT_SENTENCE_RATIO_LEVEL
    assert front.ADVANTAGES is grpo.ADVANTAGES
    assert (front.CREDITS, front.RATIOS, front.LEVEL_AXES) == (grpo.CREDITS, grpo.RATIOS, grpo.LEVEL_AXES)
    assert front.LEVEL_AXES is grpo.LEVEL_AXES is choices.LEVEL_AXES
    assert front.ADVANTAGE_BASELINES is config.ADVANTAGE_BASELINES
    assert set(front.TASKS) == set(arith.SIZES) | {"chain"}
    chain.ChainConfig(length=front.CHAIN_MAX_LENGTH, num_facts=front.CHAIN_MAX_FACTS)
    for options in (dict(length=front.CHAIN_MAX_LENGTH + 1), dict(num_facts=front.CHAIN_MAX_FACTS + 1)):
        with pytest.raises(ValueError):
            chain.ChainConfig(**options)
    defaults = chain.ChainConfig()
    assert front.CHAIN_DEFAULTS == {"chain_length": defaults.length, "chain_facts": defaults.num_facts,
                                    "chain_max_operand": defaults.max_operand,
                                    "chain_facts_seed": defaults.facts_seed, "mistaught_rate": defaults.error_rate}
    chain.ChainConfig(max_operand=front.CHAIN_MAX_OPERAND)
    with pytest.raises(ValueError):
        chain.ChainConfig(max_operand=front.CHAIN_MAX_OPERAND + 1)


# -- one test per class of argument ----------------------------------------------------------------------------------
def test_paths_that_hold_no_model_or_cannot_be_written(tmp_path, model_dir):
    empty, a_file = tmp_path / "empty", tmp_path / "file"
    empty.mkdir()
    a_file.write_text("x")
    no_tokenizer, bad_config = tmp_path / "no_tokenizer", tmp_path / "bad_config"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    out = tmp_path / "out"
    train = ["train", "--output-dir", out, "--model"]
    assert_refused([*train, "/nonexistent/model"], "--model /nonexistent/model: no such directory")
    assert_refused([*train, a_file], "not a directory")
    assert_refused([*train, empty], "not a model folder (no config.json)")
    assert_refused([*train, no_tokenizer], "holds a model but no tokenizer")
    assert_refused([*train, bad_config], "config.json is not readable JSON")
    assert_refused(["sft", "--output-dir", out, "--model", empty], "--model")
    assert_refused([*train, model_dir, "--resume", model_dir], "--resume")             # no trainer_state.pt
    assert_refused(["train", "--model", model_dir, "--output-dir", a_file], "--output-dir")
    assert_refused(["sft", "--output-dir", a_file / "below"], "is not a directory")
    assert_refused(["sft", "--output-dir", out, "--data-dir", a_file], "--data-dir")
    assert_refused(["bench", "--out", a_file], "--out")
    assert not out.exists()                                           # nothing was made


@pytest.mark.parametrize("arguments,fragment", [
    (["train", "--group-size", "0"], "--group-size must be >= 2, got 0"),
    (["train", "--group-size", "1"], "--group-size must be >= 2"),     # one answer per prompt: every advantage is 0
    (["train", "--temperature", "0"], "--temperature must be > 0"),
    (["train", "--temperature", "nan"], "--temperature must be > 0"),
    (["train", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--prompts", "0"], "--prompts must be >= 1"),
    (["train", "--mu", "0"], "--mu must be >= 1"),
    (["train", "--eval-every", "0"], "--eval-every must be >= 1"),
    (["train", "--save-every", "-1"], "--save-every must be >= 0"),
    (["train", "--lr=-1e-4"], "--lr must be > 0"),
    (["train", "--beta", "-0.1"], "--beta must lie in [0, inf)"),
    (["train", "--epsilon", "1"], "--epsilon must lie in (0, 1)"),
    (["train", "--eval-size", "0"], "--eval-size must be >= 1"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--data-seed", "-2"], "--data-seed must be >= 0"),
    (["train", "--threads", "-1"], "--threads must be >= 0"),
    (["sft", "--steps", "0"], "--steps must be >= 1"),
    (["sft", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["sft", "--lr", "0"], "--lr must be > 0"),
    (["sft", "--drop-answer-line", "1.5"], "--drop-answer-line must lie in [0, 1]"),
    (["sft", "--task", "chain", "--chain-length", "41"], "--chain-length must lie in [1, 40]"),
    (["sft", "--task", "chain", "--chain-facts", "0"], "--chain-facts must lie in [1, 52]"),
    (["train", "--task", "chain", "--chain-max-operand", "10"], "--chain-max-operand must lie in [1, 9]"),
    (["sft", "--task", "chain", "--chain-max-operand", "1", "--mistaught", "1"], "--chain-max-operand must be >= 2"),
    (["sft", "--task", "chain", "--chain-facts", "5", "--mistaught", "6"], "--mistaught must lie in [0, 5]"),
    (["sft", "--task", "chain", "--mistaught", "2", "--mistaught-rate", "1.2"], "--mistaught-rate must lie in [0, 1]"),
    (["sft", "--task", "chain", "--chain-facts-seed", "-1"], "--chain-facts-seed must be >= 0"),
    (["train", "--answer-mix", "1.5"], "--answer-mix must lie in [0, 1]"),
    (["train", "--answer-mix", "nan"], "--answer-mix must lie in [0, 1]"),
])
def test_numbers_out_of_range(tmp_path, model_dir, arguments, fragment):
    model = ["--model", model_dir] if arguments[0] == "train" else []
    assert_refused([*arguments, *model, "--output-dir", tmp_path / "out"], fragment)


@pytest.mark.parametrize("arguments,fragment", [
    (["train", "--level", "output", "--advantage", "cumulative"], "--advantage cumulative is a sentence-level"),
    (["train", "--level", "sentence", "--output-ratio-level", "sum"], "--output-ratio-level applies to --level output"),
    (["train", "--level", "output", "--answer-mix", "0.5"], "--answer-mix applies to --level sentence"),
    (["train", "--advantage", "cumulative", "--answer-mix", "0.5"], "--answer-mix applies to --level sentence"),
    (["sft", "--task", "arith", "--chain-facts-seed", "2"], "--chain-facts-seed applies to --task chain"),
    (["train", "--task", "arith", "--outcome-reward"], "--outcome-reward applies to --task chain"),
    (["train", "--task", "arith-small", "--chain-length", "4"], "--chain-length applies to --task chain"),
    (["sft", "--task", "arith", "--chain-facts", "4"], "--chain-facts applies to --task chain"),
    (["sft", "--task", "arith", "--mistaught", "2"], "--mistaught applies to --task chain"),
    (["sft", "--task", "arith", "--mistaught-rate", "0.5"], "--mistaught-rate applies to --task chain"),
    (["sft", "--task", "chain", "--drop-answer-line", "0.5"], "--drop-answer-line applies to the arith tasks"),
])
def test_option_combinations(tmp_path, model_dir, arguments, fragment):
    model = ["--model", model_dir] if arguments[0] == "train" else []
    assert_refused([*arguments, *model, "--output-dir", tmp_path / "out"], fragment)


@pytest.mark.parametrize("arguments,fragment", [
    ([], "the following arguments are required"),
    (["fit"], "invalid choice: 'fit'"),
    (["train", "--output-dir", "o"], "the following arguments are required: --model"),
    (["train", "--model", "m", "--output-dir", "o", "--steps", "ten"], "argument --steps: invalid int value"),
    (["train", "--model", "m", "--output-dir", "o", "--level", "paragraph"], "argument --level: invalid choice"),
    (["sft", "--output-dir", "o", "--task", "algebra"], "argument --task: invalid choice"),
    (["bench", "--preset", "huge"], "argument --preset: invalid choice"),
    (["sft", "--output-dir", "o", "--sleep"], "unrecognized arguments: --sleep"),
])
def test_malformed_command_lines_say_so_in_one_line(arguments, fragment):
    assert_refused(arguments, fragment)


def test_a_refusal_in_process_is_a_system_exit_with_the_message(capsys):
    from sgrpo_kernels import cli

    for main in (console.main, cli.main):
        with pytest.raises(SystemExit) as refusal:
            main(["train", "--model", "/nonexistent/model", "--output-dir", "o"])
        assert refusal.value.code == 2 and "no such directory" in str(refusal.value)
        assert capsys.readouterr().err.strip() == str(refusal.value)


# -- layering ------------------------------------------------------------------------------------------------------
CLI_MODULES = {"sgrpo_kernels.cli.front": ROOT / "sgrpo_kernels" / "cli" / "front.py",
               "sgrpo_kernels.cli.console": ROOT / "sgrpo_kernels" / "cli" / "console.py",
               "sgrpo_kernels.cli": ROOT / "sgrpo_kernels" / "cli" / "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file of the package imports, at the top or inside a function, with the packages that importing
    it runs (relative imports resolved against the file's own package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            found = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in found:
            pieces = name.split(".")
            names.update(".".join(pieces[:end]) for end in range(1, len(pieces) + 1))
    return names


def test_the_command_line_layers_import_one_way():
    """docs/design.md's layers: the console script -> the front end and -> the commands; the commands -> the front
    end; the front end -> neither (and of the package only the torch-free ``choices``). An import back up, at the top
    of a file or inside a function, would close a circle."""
    arrows = {module: imported_modules(path) & set(CLI_MODULES) - {module} for module, path in CLI_MODULES.items()}
    assert arrows == {"sgrpo_kernels.cli.front": set(),
                      "sgrpo_kernels.cli.console": {"sgrpo_kernels.cli.front", "sgrpo_kernels.cli"},
                      "sgrpo_kernels.cli": {"sgrpo_kernels.cli.front"}}, arrows
    front_imports = imported_modules(CLI_MODULES["sgrpo_kernels.cli.front"])
    assert {name for name in front_imports if name.startswith(("sgrpo_kernels.", "torch"))} == {
        "sgrpo_kernels.choices"} | {f"sgrpo_kernels.choices.{name}" for name in front.__dict__
                                    if f"sgrpo_kernels.choices.{name}" in front_imports}
    # the command line is one package, and it holds no other module that could carry an arrow unseen
    assert {path.name for path in (ROOT / "sgrpo_kernels" / "cli").glob("*.py")} == {
        "__init__.py", "front.py", "console.py", "__main__.py"}
    # and at run time: the commands module loads without the console script, and without torch
    done = subprocess.run([sys.executable, "-c", "import sys, sgrpo_kernels.cli; "
                           "print('sgrpo_kernels.cli.console' in sys.modules, 'torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() == "False False", done.stderr[-2000:]


@pytest.mark.parametrize("spec,fragment", [
    ("judge=MODEL", "is not KIND=FOLDER[,KEY=VALUE...] with KIND one of verifier, prm"),
    ("prm=", "is not KIND=FOLDER"),
    ("prm=MODEL,mode=cache", "'mode=cache' is not KEY=VALUE with a new KEY among weight, step_tag"),
    ("verifier=MODEL,weight=0", "weight must be a number in (0, 1], got '0'"),
    ("verifier=MODEL,batch_size=two", "batch_size must be an integer >= 1"),
    ("verifier=MODEL,mode=fast", "mode must be one of one_pass, cache, batched"),
    ("prm=MODEL,label_ids=1", "label_ids must be BAD:GOOD"),
    ("prm=MODEL,step_tag=", "step_tag is empty"),
    ("prm=/nonexistent/prm", "--step-scorer /nonexistent/prm: no such directory"),
])
def test_step_scorer_specs_are_checked(tmp_path, model_dir, spec, fragment):
    spec = spec.replace("MODEL", str(model_dir))
    message = assert_refused(["train", "--model", model_dir, "--output-dir", tmp_path / "out", "--step-scorer", spec],
                             fragment)
    assert message.startswith("sgrpo train: error: --step-scorer ")


def test_step_scorer_specs_parse_to_constructor_keywords(tmp_path, model_dir):
    from sgrpo_kernels.rewards import logic

    assert front.VERIFIER_MODES == logic.MODES
    assert front.parse_step_scorer("prm=runs/prm,label_ids=0:1,weight=0.5,batch_size=4") == (
        "prm", "runs/prm", 0.5, {"label_ids": (0, 1), "batch_size": 4})
    assert front.parse_step_scorer("verifier=v,yes=Yes,no=No") == (
        "verifier", "v", front.DEFAULT_STEP_SCORER_WEIGHT, {"yes": "Yes", "no": "No"})
    twice = ["--step-scorer", f"prm={model_dir}", "--step-scorer", f"prm={model_dir},weight=0.2"]
    assert_refused(["train", "--model", model_dir, "--output-dir", tmp_path / "out", *twice], "prm is given twice")


# -- the data cache ------------------------------------------------------------------------------------------------
def sft_args(tmp_path, *extra) -> Namespace:
    args = front.build_parser().parse_args(["sft", "--output-dir", str(tmp_path / "out"), "--task", "arith-small",
                                            *extra])
    front.check_arguments(args)
    return args


def snapshot(folder: Path) -> dict:
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.iterdir())}


def test_default_cache_is_stamped_reused_and_remade_when_the_flags_change(tmp_path, monkeypatch, capsys):
    from sgrpo_kernels.cli import _datasets

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data" / "arith-small"
    train, test = _datasets(sft_args(tmp_path, "--eval-size", "7"))
    assert len(train) == front.TRAIN_SIZE and len(test) == 7
    stamp = json.loads((cache / "stamp.json").read_text())
    assert {key: stamp[key] for key in ("task", "data_seed", "eval_size")} == {
        "task": "arith-small", "data_seed": 0, "eval_size": 7}
    assert stamp["generator"]["options"] == {"max_operand": 9, "max_value": 49}
    before = snapshot(cache)
    assert _datasets(sft_args(tmp_path, "--eval-size", "7"))[1] == test
    assert snapshot(cache) == before                                   # same flags: the files are reused
    _, test = _datasets(sft_args(tmp_path, "--eval-size", "5"))       # was silently ignored before the stamp
    assert len(test) == 5 and json.loads((cache / "stamp.json").read_text())["eval_size"] == 5
    assert "made with other flags: regenerated" in capsys.readouterr().err
    _, other = _datasets(sft_args(tmp_path, "--eval-size", "5", "--data-seed", "3"))
    assert other != test and json.loads((cache / "stamp.json").read_text())["data_seed"] == 3


def test_default_cache_of_an_older_version_is_stamped_or_remade(tmp_path, monkeypatch, capsys):
    """A cache without a stamp: kept (and stamped) when the flags give exactly its files, remade otherwise."""
    from sgrpo_kernels.cli import _datasets

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "data" / "arith-small"
    _datasets(sft_args(tmp_path, "--eval-size", "6"))
    (cache / "stamp.json").unlink()
    before = snapshot(cache)
    _datasets(sft_args(tmp_path, "--eval-size", "6"))
    assert (cache / "stamp.json").exists() and {name: snapshot(cache)[name] for name in before} == before
    assert capsys.readouterr().err == ""
    (cache / "stamp.json").unlink()
    _, test = _datasets(sft_args(tmp_path, "--eval-size", "4"))
    assert len(test) == 4 and "had no stamp.json" in capsys.readouterr().err


def test_an_explicit_data_dir_is_never_overwritten(tmp_path, monkeypatch):
    from sgrpo_kernels.cli import _datasets

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    _datasets(sft_args(tmp_path, "--data-dir", str(mine), "--eval-size", "6"))
    before = snapshot(mine)
    message = assert_refused(["sft", "--task", "arith-small", "--output-dir", tmp_path / "out", "--data-dir", mine,
                              "--eval-size", "9"], "--eval-size 6, not 9")
    assert f"--data-dir {mine} was generated with" in message
    assert_refused(["sft", "--task", "arith-small", "--output-dir", tmp_path / "out", "--data-dir", mine,
                    "--data-seed", "1", "--eval-size", "6"], "--data-seed 0, not 1")
    assert_refused(["sft", "--task", "arith", "--output-dir", tmp_path / "out", "--data-dir", mine, "--eval-size",
                    "6"], "--task arith-small, not arith")
    assert snapshot(mine) == before
    assert not (tmp_path / "data").exists()                           # the default cache was not touched either


def test_a_users_own_files_are_used_as_they_are(tmp_path, capsys):
    from sgrpo_kernels.cli import _datasets
    from sgrpo_kernels.trainer.tasks import arith

    own = tmp_path / "own"
    own.mkdir()
    problems = arith.make_dataset(3, seed=11)
    arith.write_jsonl(problems, str(own / "train.jsonl"))
    before = snapshot(own)
    assert_refused(["sft", "--output-dir", tmp_path / "out", "--data-dir", own], "has train.jsonl but no test.jsonl")
    arith.write_jsonl(problems[:2], str(own / "test.jsonl"))
    before = snapshot(own)
    train, test = _datasets(sft_args(tmp_path, "--data-dir", str(own)))
    assert train == problems and test == problems[:2] and snapshot(own) == before    # no stamp written either
    assert "as they are" in capsys.readouterr().err


def test_a_stamp_from_another_generator(tmp_path, monkeypatch, capsys):
    """Same flags, but the files came from other generator options (another version of the task): an explicit
    --data-dir is refused in one line, the default cache is remade."""
    from sgrpo_kernels.cli import _datasets

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    for extra in (["--data-dir", str(mine)], []):
        _datasets(sft_args(tmp_path, *extra, "--eval-size", "3"))
        folder = mine if extra else tmp_path / "data" / "arith-small"
        stamp = json.loads((folder / "stamp.json").read_text())
        stamp["generator"]["options"]["max_operand"] = 7
        (folder / "stamp.json").write_text(json.dumps(stamp))
        before = snapshot(folder)
        if extra:
            with pytest.raises(SystemExit) as refusal:
                console.main(["sft", "--task", "arith-small", "--output-dir", str(tmp_path / "out"), "--eval-size", "3",
                              *extra])
            assert refusal.value.code == 2 and snapshot(folder) == before
            assert capsys.readouterr().err.strip() == str(refusal.value) and "another version" in str(refusal.value)
            assert not (tmp_path / "out").exists()                    # refused before the model was built
        else:
            _datasets(sft_args(tmp_path, "--eval-size", "3"))
            assert json.loads((folder / "stamp.json").read_text())["generator"]["options"]["max_operand"] == 9


def test_bench_is_offered_only_where_it_runs(monkeypatch, tmp_path):
    """From a source checkout ``sgrpo bench`` is listed and runs ``benchmarks/``; from an installed package (no
    ``benchmarks/`` beside it) it is not listed, and asked for anyway it answers with one line."""
    assert front.source_checkout() and "bench" in front.build_parser().format_help()
    monkeypatch.setattr(front, "_source_root", lambda: str(tmp_path))
    assert not front.source_checkout()
    help_text = front.build_parser().format_help()
    assert "{sft,train}" in help_text and "bench" not in help_text.replace("benchmarks.", "")
    with pytest.raises(front.UsageError, match=r"^sgrpo bench: error: runs the benchmarks of a source checkout"):
        front.parse_arguments(["bench"])
