"""The long-chain task: problems, facts, sloppy demonstrations and the local step reward."""

import pytest

from sgrpo_kernels.trainer.tasks import chain


def test_problems_are_seeded_and_their_solutions_score_one_everywhere():
    config = chain.ChainConfig(length=8, num_facts=12)
    problems = chain.make_dataset(50, seed=3, length=8, num_facts=12)
    assert problems == chain.make_dataset(50, seed=3, length=8, num_facts=12)
    assert problems != chain.make_dataset(50, seed=4, length=8, num_facts=12)
    step = chain.ChainStep(chain.facts(config))
    for problem in problems:
        start, labels = chain.question_steps(problem.question)
        sentences = problem.solution.replace(". ", ".\n").split("\n")
        assert len(labels) == 8 and len(sentences) == 9 and set(labels) <= set(chain.LABELS[:12])
        assert step.score(problem.question, sentences, problem.answer) == [1.0] * 9
        assert chain.is_correct(problem.solution, problem.answer)


def test_hand_worked_chain_and_local_step_scores():
    config = chain.ChainConfig(num_facts=3, facts_seed=0)
    table = chain.facts(config)
    a, b = table["a"], table["b"]
    question = "Start 7. Steps: a b a."
    first = (7 + a) % 10
    wrong = b % 9 + 1                                  # a wrong operand for b
    second = (first + wrong) % 10
    third = (second + a) % 10                          # right from where it stands
    truth = (7 + a + b + a) % 10
    sentences = [f"a: 7+{a}={first}.", f"b: {first}+{wrong}={second}.", f"a: {second}+{a}={third}.",
                 f"Answer: {third}"]
    scores = chain.ChainStep(table).score(question, sentences, str(truth))
    assert scores == [1.0, 0.0, 1.0, float(third == truth)]
    assert chain.step_errors(question, sentences, config) == [("a", False), ("b", True), ("a", False)]
    assert chain.BinaryOutcome().score(question, sentences, str(truth)) == [float(third == truth)] * 4
    # a skipped step, a wrong label and bad arithmetic each cost their own step only
    bad = [f"b: 7+{b}={(7 + b) % 10}.", f"b: {(7 + b) % 10}+{b}={(7 + 2 * b + 1) % 10}.", "hello"]
    assert chain.ChainStep(table).score(question, bad, str(truth)) == [0.0, 0.0, 0.0]


def test_sloppy_demonstrations_miswrite_only_the_chosen_facts_at_the_chosen_rate():
    config = chain.ChainConfig(length=10, num_facts=10, mistaught=3, error_rate=0.6)
    table, wrong = chain.facts(config), set(chain.mistaught_labels(config))
    assert len(wrong) == 3 and chain.mistaught_labels(config) == chain.mistaught_labels(config)
    problems = chain.make_dataset(400, seed=1, length=10, num_facts=10)
    sloppy = chain.sloppy_demonstrations(problems, config, seed=2)
    miswritten = total = 0
    misconception = chain.misconceptions(config)
    assert set(misconception) == wrong and all(misconception[label] != table[label] for label in wrong)
    for clean, demo in zip(problems, sloppy, strict=True):
        assert (demo.question, demo.answer) == (clean.question, clean.answer)
        sentences = demo.solution.replace(". ", ".\n").split("\n")
        errors = chain.step_errors(demo.question, sentences, config)
        for label, is_wrong in errors:
            if label in wrong:
                total += 1
                miswritten += is_wrong
            else:
                assert not is_wrong
        # the chain continues from what was written: every step is locally consistent but for its operand
        start, _ = chain.question_steps(demo.question)
        value = start
        for sentence in sentences[:-1]:
            label, rest = sentence.split(": ")
            left, right_result = rest.rstrip(".").split("+")
            right, result = map(int, right_result.split("="))
            assert int(left) == value and result == (value + right) % 10
            assert right in (table[label], misconception.get(label))     # one consistent wrong operand
            value = result
        assert sentences[-1] == f"Answer: {value}"
    assert 0.5 < miswritten / total < 0.7


@pytest.mark.parametrize("facts_seed", range(40))
def test_no_misconception_is_another_mistaught_facts_operand(facts_seed):
    """A misconception that were another mis-taught fact's true operand would make repairing one fact teach the
    other's error (a swap or cycle): a ceiling of the task instance, ruled out for every facts seed."""
    config = chain.ChainConfig(num_facts=26, mistaught=8, facts_seed=facts_seed)
    table, wrong = chain.facts(config), chain.misconceptions(config)
    held = {table[label] for label in wrong}
    assert len(wrong) == 8 and all(value not in held for value in wrong.values())
    assert all(value != table[label] and 1 <= value <= 9 for label, value in wrong.items())
    assert chain.misconception_choices(config) == sorted(set(range(1, 10)) - held)


def test_facts_seeds_draw_different_instances_and_an_impossible_one_is_refused():
    instances = {tuple(sorted(chain.misconceptions(chain.ChainConfig(mistaught=8, facts_seed=seed)).items()))
                 for seed in range(5)}
    assert len(instances) == 5
    # three mis-taught facts over operands {1, 2} hold both values (or a fact has no wrong value left)
    impossible = [seed for seed in range(50)
                  if len({chain.facts(chain.ChainConfig(num_facts=3, max_operand=2, facts_seed=seed))[label]
                          for label in "abc"}) == 2]
    with pytest.raises(ValueError, match="none is left as a misconception"):
        chain.ChainConfig(num_facts=3, max_operand=2, mistaught=3, facts_seed=impossible[0])
    with pytest.raises(ValueError, match="facts_seed must be >= 0"):
        chain.ChainConfig(facts_seed=-1)


def test_per_fact_error_rates_count_each_label():
    config = chain.ChainConfig(num_facts=3, facts_seed=0)
    table = chain.facts(config)
    a, b = table["a"], table["b"]
    wrong = b % 9 + 1
    question = "Start 7. Steps: a b a."
    first, second = (7 + a) % 10, (7 + a + wrong) % 10
    sentences = [f"a: 7+{a}={first}.", f"b: {first}+{wrong}={second}.", f"a: {second}+{a}={(second + a) % 10}."]
    assert chain.per_fact_error_rates([question, question], [sentences, sentences[:1]], config) == {
        "a": [0, 3], "b": [1, 1]}


def test_the_char_tokenizer_segments_a_solution_into_its_steps():
    pytest.importorskip("transformers")
    import torch

    from sgrpo_kernels import Segmenter
    from sgrpo_kernels.trainer.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    problem = chain.make_dataset(1, seed=0, length=5)[0]
    ids = torch.tensor([tokenizer.encode(" " + problem.solution) + [tokenizer.eos_token_id]])
    segmentation = Segmenter(tokenizer, "sentence")(ids)
    assert int(segmentation.num_sentences[0]) == 6
    assert [text.strip() for text in segmentation.texts[0]] == problem.solution.replace(". ", ".\n").split("\n")


@pytest.mark.parametrize("options, message", [(dict(length=0), "length"), (dict(num_facts=60), "num_facts"),
                                              (dict(max_operand=10), "max_operand"),
                                              (dict(mistaught=5, num_facts=4), "mistaught"),
                                              (dict(error_rate=1.5), "error_rate")])
def test_bad_configurations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        chain.ChainConfig(**options)


def test_outcome_only_reward_and_composite():
    problem = chain.make_dataset(1, seed=9, length=4)[0]
    sentences = problem.solution.replace(". ", ".\n").split("\n")
    dense = chain.reward(chain.ChainConfig(length=4))([problem.question], [sentences], [problem.answer])
    binary = chain.reward(outcome_only=True)([problem.question], [sentences[:-1] + ["Answer: 99"]], [problem.answer])
    assert dense.tolist() == [[1.0] * 5] and binary.tolist() == [[0.0] * 5]


def test_a_noisy_step_scorer_flips_steps_at_its_rate_and_never_the_answer_line():
    config = chain.ChainConfig(length=8)
    problems = chain.make_dataset(400, seed=5, length=8)
    questions = [problem.question for problem in problems]
    answers = [problem.solution.replace(". ", ".\n").split("\n") for problem in problems]
    references = [problem.answer for problem in problems]
    exact = chain.reward(config)(questions, answers, references)
    noisy = chain.reward(config, step_noise=0.2, noise_seed=7)(questions, answers, references)
    assert (exact == 1).all() and (noisy[:, -1] == 1).all()                # the answer line's check stays exact
    flipped = (noisy[:, :-1] == 0).float().mean().item()
    assert 0.17 < flipped < 0.23, flipped                                   # 3 200 steps at p = 0.2
    again = chain.reward(config, step_noise=0.2, noise_seed=7)(questions, answers, references)
    other = chain.reward(config, step_noise=0.2, noise_seed=8)(questions, answers, references)
    assert (again == noisy).all() and not (other == noisy).all()            # seeded
    wrong = [[sentence.replace("=", "=1", 1) if index < 8 else sentence for index, sentence in enumerate(answer)]
             for answer in answers]                                         # every step's sum wrong: 0 -> 1 flips
    scores = chain.reward(config, step_noise=0.2, noise_seed=7)(questions, wrong, references)
    assert 0.17 < scores[:, :-1].mean().item() < 0.23
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="step_noise"):
            chain.ChainStep(chain.facts(config), step_noise=bad)
    with pytest.raises(ValueError, match="outcome-only"):
        chain.reward(config, outcome_only=True, step_noise=0.1)


def test_the_final_outcome_scores_an_answers_last_sentence_as_its_outcome():
    config = chain.ChainConfig(length=4)
    problem = chain.make_dataset(1, seed=9, length=4)[0]
    sentences = problem.solution.replace(". ", ".\n").split("\n")
    outcome = chain.reward(config, final_outcome=True)
    assert outcome([problem.question], [sentences], [problem.answer]).tolist() == [[1.0] * 5]
    stopped = sentences[:2]                                            # two right steps, no answer line
    assert chain.reward(config)([problem.question], [stopped], [problem.answer]).tolist() == [[1.0, 1.0]]
    assert outcome([problem.question], [stopped], [problem.answer]).tolist() == [[1.0, 0.0]]
    wrong = sentences[:-1] + ["Answer: 99"]
    assert outcome([problem.question], [wrong], [problem.answer]).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    noisy = chain.reward(config, final_outcome=True, step_noise=0.9, noise_seed=1)
    assert all(scores[-1] == 0.0 for scores in noisy([problem.question] * 50, [stopped] * 50,
                                                      [problem.answer] * 50).tolist())     # the outcome is exact
    with pytest.raises(ValueError, match="final_outcome"):
        chain.reward(config, outcome_only=True, final_outcome=True)


def test_cli_trains_on_the_chain_task(tmp_path, capsys):
    """``sgrpo sft --task chain --mistaught ...`` writes sloppy demonstrations into the warm start and ``sgrpo
    train --task chain --outcome-reward`` runs on the binary outcome; ``--chain-max-operand`` bounds the facts; a
    bad chain flag ends with one line."""
    import json
    import re

    pytest.importorskip("transformers")
    from sgrpo_kernels.cli import main

    common = ["--task", "chain", "--chain-length", "3", "--chain-facts", "5", "--chain-max-operand", "2",
              "--eval-size", "4", "--data-dir", str(tmp_path / "data")]
    main(["sft", "--output-dir", str(tmp_path / "sft"), "--steps", "2", "--batch-size", "4", "--mistaught", "2",
          *common])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("held-out greedy accuracy (4 problems) after")
    problems = chain.read_jsonl(str(tmp_path / "data" / "train.jsonl"))
    assert len(chain.question_steps(problems[0].question)[1]) == 3
    operands = {int(operand) for problem in problems for operand in re.findall(r"\+(\d+)=", problem.solution)}
    assert operands == {1, 2}                                            # --chain-max-operand 2
    stamp = json.loads((tmp_path / "data" / "stamp.json").read_text())
    assert stamp["chain_max_operand"] == 2 and stamp["generator"]["options"]["max_operand"] == 2
    main(["train", "--model", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "grpo"), "--steps", "1",
          "--group-size", "2", "--prompts", "2", "--outcome-reward", *common])
    assert re.match(r"held-out greedy accuracy \(4 problems\): [\d.]+ before, [\d.]+ after 1 GRPO steps",
                    capsys.readouterr().out.strip().splitlines()[-1])
    # process supervision (sentence credit, token ratio) with a noisy step scorer, two updates per batch and the
    # sampled held-out accuracy
    main(["train", "--model", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "process"), "--steps", "1",
          "--group-size", "2", "--prompts", "2", "--credit", "sentence", "--ratio", "token", "--step-noise", "0.2",
          "--mu", "2", "--eval-samples", "2", "--baseline", "split_final", *common])
    config = json.loads((tmp_path / "process" / "grpo_config.json").read_text())
    assert (config["credit"], config["ratio"], config["mu"], config["eval_samples"]) == ("sentence", "token", 2, 2)
    assert config["baseline"] == "split_final"
    records = [json.loads(line) for line in open(tmp_path / "process" / "metrics.jsonl")]
    assert "eval_sampled_accuracy" in records[0] and "ratio_mean_last" in records[1]
    capsys.readouterr()
    for flags, message in ((["--credit", "sentence", "--ratio", "output"], "no longer than a sentence"),
                           (["--level", "output", "--answer-mix", "0.5"], "--answer-mix applies"),
                           (["--step-noise", "0.2", "--outcome-reward"], "--step-noise flips"),
                           (["--step-noise", "1"], r"--step-noise must lie in \[0, 1\)"),
                           (["--level", "token", "--baseline", "split_final"], "needs sentence credit")):
        with pytest.raises(SystemExit, match=message):
            main(["train", "--model", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "y"), *flags, *common])
    with pytest.raises(SystemExit, match="mistaught must lie"):
        main(["sft", "--output-dir", str(tmp_path / "x"), "--mistaught", "9", *common])
    # --chain-facts-seed draws another instance: stamped, and an instance with no misconception left is one line
    seeded = ["--task", "chain", "--chain-length", "3", "--chain-facts", "5", "--chain-max-operand", "2",
              "--eval-size", "4", "--data-dir", str(tmp_path / "data-s3"), "--chain-facts-seed", "3"]
    main(["train", "--model", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "grpo-s3"), "--steps", "1",
          "--group-size", "2", "--prompts", "2", "--answer-mix", "0.5", *seeded])
    assert json.loads((tmp_path / "data-s3" / "stamp.json").read_text())["chain_facts_seed"] == 3
    with pytest.raises(SystemExit, match="none is left as a misconception"):
        main(["sft", "--output-dir", str(tmp_path / "y"), "--mistaught", "5", *seeded])


def _compare_levels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "credit_assignment" / "compare_levels.py"
    spec = importlib.util.spec_from_file_location("compare_levels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_confidence_interval_and_compute_axis():
    pytest.importorskip("transformers")
    compare = _compare_levels()
    # differences 1, 2, 3: mean 2, standard error 1/sqrt(3), t(0.975, 2 df) = 4.303
    assert compare.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == "+2.000 [-0.484, +4.484] (3/3 higher)"
    assert compare.paired_difference([0.5], [0.4]) == "–"
    records = [{"step": 0, "eval_accuracy": 0.1}, {"step": 1, "loss": 0.0, "cpu_seconds": 2.0, "seconds": 9.0},
               {"step": 2, "loss": 0.0, "cpu_seconds": 3.0}, {"step": 2, "eval_accuracy": 0.5}]
    assert compare.compute_curve(records) == ([0.0, 5.0], [0.1, 0.5])
    runs = {"output": [[{"step": 5, "eval_accuracy": a}] for a in (0.0, 0.5)],
            "sentence": [[{"step": 5, "eval_accuracy": a}] for a in (0.0, 0.7)]}
    assert compare.paired_table(runs).splitlines()[-1].startswith("| sentence − output | +0.100 [")


def test_compare_levels_runs_resumes_and_tabulates(tmp_path, monkeypatch, capsys, request):
    """``experiments/credit_assignment/compare_levels.py`` on the chain task: the learning-rate sweep on the first
    seed, every variant ×
    seed once (the sweep's run at the chosen rate reused), the gradient cosine of independent batches; a second call
    reuses everything (no training); ``--runs`` tabulates finished runs; table, sweep table and plot written."""
    import importlib.util
    import json
    import re
    from pathlib import Path

    pytest.importorskip("transformers")
    import torch

    from sgrpo_kernels.cli import main as sgrpo

    data = tmp_path / "data"
    common = ["--task", "chain", "--chain-length", "3", "--chain-facts", "5"]
    sgrpo(["sft", "--output-dir", str(tmp_path / "sft"), "--steps", "120", "--batch-size", "16", "--eval-size", "8",
           "--mistaught", "2", "--data-dir", str(data), *common])    # 120 steps: some answers right, rewards vary
    path = Path(__file__).resolve().parent.parent / "experiments" / "credit_assignment" / "compare_levels.py"
    spec = importlib.util.spec_from_file_location("compare_levels", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out, work = tmp_path / "out", tmp_path / "work"
    arguments = ["--model", str(tmp_path / "sft"), *common, "--data-dir", str(data), "--out", str(out),
                 "--work-dir", str(work), "--variants", "sentence", "outcome", "--seeds", "0",
                 "--steps", "2", "--prompts", "4", "--group-size", "4", "--eval-every", "1", "--target", "0.0",
                 "--lr-for", "outcome=1e-4", "--mistaught", "2", "--sweep", "1e-4", "3e-4", "--snr-pairs", "2",
                 "--threads", "1"]
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))       # --threads sets this process's count
    compare.main(arguments)
    assert torch.get_num_threads() == 1
    sweep = (out / "lr_sweep.md").read_text()
    chosen = re.search(r"\| sentence \| 0 / [0-9.]+ \| 0 / [0-9.]+ \| (0.000[13]) \|", sweep).group(1)
    assert "outcome" not in sweep                              # its rate was given
    assert sorted(p.name for p in out.glob("*.metrics.jsonl")) == [
        "outcome-lr0.0001-seed0.metrics.jsonl", "sentence-lr0.0001-seed0.metrics.jsonl",
        "sentence-lr0.0003-seed0.metrics.jsonl"]
    table = (out / "compare_levels.md").read_text()
    assert re.search(rf"\| sentence \| {float(chosen):g} \| 0\.\d{{3}} \| 0 \|", table)
    assert re.search(r"\| outcome \| 0.0001 \| 0\.\d{3} \| 0 \|", table)
    assert "sampled error, mis-taught facts" in table and "clipping off" in table
    assert "an illustration, not evidence" in table                # one seed is labelled as such
    assert "Per fact:" in table and re.search(r"\| [a-e] \(taught \d\) \| \d/1 \(", table)
    assert ("No fact stays wrong" in table) != ("Facts wrong in the majority" in table)
    for name in ("sentence", "outcome"):
        cosines = json.loads((out / f"{name}.gradient_cosine.json").read_text())
        assert len(cosines) == 2 and all(-1 <= value <= 1 for value in cosines)
    assert any(json.loads((out / "sentence.gradient_cosine.json").read_text()))   # gradients were measured
    assert " nan " not in table                                    # fact errors measured on recognisable steps
    assert (out / "compare_levels.png").stat().st_size > 5000

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(compare, "GRPOLoop", refuse)
    compare.main(arguments)
    assert (out / "compare_levels.md").read_text() == table
    with pytest.raises(SystemExit, match="variant=value"):
        compare.main([*arguments, "--lr-for", "nonsense=1"])
    with pytest.raises(SystemExit, match="--threads must be >= 0"):
        compare.main([*arguments, "--threads", "-1"])
    capsys.readouterr()
    compare.main(["--task", "chain", "--out", str(tmp_path / "two"),
                  "--runs", f"first={work / 'outcome-lr0.0001-seed0'}", f"second={work / 'sentence-lr0.0001-seed0'}"])
    printed = capsys.readouterr().out
    assert "| first | 0.0001 |" in printed and "| second | 0.0001 |" in printed
    assert f"plot: {tmp_path / 'two' / 'compare_levels.png'}" in printed
    with pytest.raises(SystemExit, match="NAME=DIR"):
        compare.main(["--runs", f"x={tmp_path}"])
