"""The trainer end to end on a tiny model: task, tokenizer, rollout -> sentences -> rewards -> advantages, one
GRPO step, checkpoints and resuming, the `sgrpo` command."""

import json
import math
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the trainer runs transformers models (train extra)")

from sgrpo_kernels.cli import build_parser, main  # noqa: E402
from sgrpo_kernels.rewards import CompositeReward  # noqa: E402
from sgrpo_kernels.trainer.grpo import GRPOLoop, GRPOLoopConfig  # noqa: E402
from sgrpo_kernels.trainer.tasks import arith  # noqa: E402
from sgrpo_kernels.trainer.tiny import char_tokenizer, load_pretrained, save_pretrained, tiny_model  # noqa: E402


def small_model(seed=0):
    tokenizer = char_tokenizer()
    return tiny_model(tokenizer, hidden_size=32, layers=1, heads=2, seed=seed), tokenizer


def test_problems_are_solved_by_their_solutions():
    for problem in arith.make_dataset(200, seed=3):
        first, operations = arith.question_operations(problem.question)
        value = first
        for sign, operand in operations:
            value = value + operand if sign == "+" else value - operand
            assert 0 <= value <= 99
        assert problem.answer == str(value) and arith.is_correct(problem.solution, problem.answer)
        assert arith.reward()([problem.question], [[problem.solution]], [problem.answer]).shape == (1, 1)
    assert arith.make_dataset(5, seed=1) == arith.make_dataset(5, seed=1)


def test_task_rewards_close_the_doors_a_policy_found():
    question, reference = "Compute 15 + 18 - 8 - 15.", "10"
    reward = arith.reward()
    right = ["15 + 18 = 33.", " 33 - 8 = 25.", " 25 - 15 = 10.", " Answer: 10"]
    plus_instead_of_minus = ["15 + 18 = 33.", " 33 + 8 = 41.", " 41 + 15 = 56.", " Answer: 56"]
    extra_step = right[:3] + [" 10 + 15 = 25.", " Answer: 25"]
    wrong_arithmetic = ["15 + 18 = 33.", " 33 - 8 = 24.", " 24 - 15 = 9.", " Answer: 9"]
    scores = {name: reward([question], [answer], [reference])[0] for name, answer in
              [("right", right), ("plus", plus_instead_of_minus), ("extra", extra_step), ("arith", wrong_arithmetic)]}
    assert scores["right"].tolist() == [1.0, 1.0, 1.0, 1.0]
    # correctness 0 (not the running value), logic 2/3 (wrong operator), format 1: 0.3·2/3 + 0.2 = 0.4
    assert scores["plus"][1].item() == pytest.approx(0.4)
    # an attempted subtraction with a slip keeps its logic credit: 0.3 + 0.2 = 0.5 > 0.4
    assert scores["arith"][1].item() == pytest.approx(0.5)
    assert scores["extra"][3].item() == pytest.approx(0.2)               # a step beyond the question: format only
    # after the slip, "24 - 15 = 9" is the right next step from where it stands: full marks; the final answer
    # 9 is wrong (correctness 0) but repeats the last result (logic 1)
    assert scores["arith"][2:].tolist() == pytest.approx([1.0, 0.5])


def test_step_correctness_judges_each_step_from_where_it_stands():
    question, reference = "Compute 15 + 18 - 8 - 15.", "10"
    local, chained = arith.StepCorrectness(), arith.StepCorrectness(chained=True)
    slip_then_right = ["15 + 18 = 33.", " 33 - 8 = 24.", " 24 - 15 = 9.", " Answer: 9"]
    assert local.score(question, slip_then_right, reference) == [1.0, 0.0, 1.0, 0.0]
    assert chained.score(question, slip_then_right, reference) == [1.0, 0.0, 0.0, 0.0]
    wrong_left = ["15 + 18 = 33.", " 33 - 8 = 25.", " 26 - 15 = 11.", " Answer: 11"]    # does not use 25
    wrong_operand = ["15 + 18 = 33.", " 33 - 9 = 24.", " 24 - 15 = 9.", " Answer: 9"]   # 9 is not the question's 8
    assert local.score(question, wrong_left, reference) == [1.0, 1.0, 0.0, 0.0]
    assert local.score(question, wrong_operand, reference) == [1.0, 0.0, 1.0, 0.0]


def test_sizes_and_answer_line_dropping():
    small = arith.make_dataset(300, seed=2, **arith.SIZES["arith-small"])
    assert max(max(n for _, n in arith.question_operations(p.question)[1]) for p in small) <= 9
    assert all(0 <= int(p.answer) <= 49 for p in small)
    dropped = arith.drop_answer_lines(small, 0.6, seed=1)
    without = [p for p in dropped if arith.final_answer(p.solution) is None]
    assert 0.5 < len(without) / len(small) < 0.7
    for original, kept in zip(small, dropped):
        assert kept.question == original.question and kept.answer == original.answer
        assert kept.solution in (original.solution, original.solution.rsplit(" Answer:", 1)[0])
    with pytest.raises(ValueError, match="fraction"):
        arith.drop_answer_lines(small, 1.5)


def test_char_tokenizer_round_trip_survives_save_and_load(tmp_path):
    model, tokenizer = small_model()
    text = "Compute 12 + 30 - 7.\n12 + 30 = 42. 42 - 7 = 35. Answer: 35"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    save_pretrained(model, tokenizer, str(tmp_path))
    loaded_model, loaded_tokenizer = load_pretrained(str(tmp_path))
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == ids
    torch.testing.assert_close(loaded_model(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits)


def noise_reward():
    """Seeded random sentence rewards: an untrained model earns the same arith reward on every answer, which
    would give zero advantages and (rightly) no update."""
    generator = random.Random(0)

    def noise(questions, answers, references):
        return [[generator.random() for _ in sentences] for sentences in answers]
    return CompositeReward({"noise": noise}, {"noise": 1.0})


def trainer(tmp_path, level="sentence", steps=3, resume_from=None, model=None, tokenizer=None, reward=None,
            eval_extra=None, **options):
    if model is None:
        model, tokenizer = small_model()
    options = dict(eval_every=100, lr=1e-3) | options
    config = GRPOLoopConfig(level=level, steps=steps, prompts_per_step=2, group_size=3, max_new_tokens=24,
                            temperature=1.5, **options)
    return GRPOLoop(model, tokenizer, arith.make_dataset(50, seed=0), arith.make_dataset(4, seed=1),
                    arith.is_correct, reward or arith.reward(), config, str(tmp_path), resume_from=resume_from,
                    eval_extra=eval_extra)


@pytest.mark.parametrize("level", ["token", "sentence", "output"])
def test_rollout_sentences_rewards_and_advantages_line_up(tmp_path, level):
    torch.manual_seed(0)
    run = trainer(tmp_path, level)
    batch = run.rollout()
    rows, length = batch["completion_ids"].shape
    assert rows == 6 and batch["mask"].shape == (rows, length) and len(batch["sentences"].texts) == rows
    assert batch["rewards"].shape == (rows, int(batch["sentences"].num_sentences.max()))
    segment_ids, advantages = run.advantages(batch)
    assert segment_ids.shape == (rows, length)
    assert ((segment_ids >= 0) == batch["mask"].bool()).all()          # every completion token is scored
    if level == "sentence":
        assert advantages.shape == batch["rewards"].shape
    else:
        assert advantages.shape == (rows,)
        if level == "token":
            assert (segment_ids.max(1).values + 1 == batch["mask"].sum(1)).all()
        else:
            assert segment_ids.max() == 0
    assert torch.isfinite(advantages).all()


@pytest.mark.parametrize("level,beta", [("sentence", 0.0), ("token", 0.1), ("output", 0.0)])
def test_one_step_changes_the_parameters_and_logs_finite_metrics(tmp_path, level, beta):
    torch.manual_seed(1)
    run = trainer(tmp_path, level, beta=beta, mu=2, reward=noise_reward())
    before = [parameter.detach().clone() for parameter in run.model.parameters()]
    record = run.step()
    changed = sum(not torch.equal(old, new) for old, new in zip(before, run.model.parameters()))
    assert changed == len(before)
    for key in ("loss", "reward", "train_accuracy", "grad_norm", "reward_noise", "clip_fraction", "ratio_mean",
                "entropy_mean"):
        assert key in record and record[key] == record[key] and abs(record[key]) < 1e6, key
    assert ("kl_mean" in record) == (beta > 0)
    assert run.reference is None or all(not parameter.requires_grad for parameter in run.reference.parameters())


def test_checkpoint_and_resume(tmp_path):
    torch.manual_seed(2)
    first = trainer(tmp_path / "run", steps=2, save_every=2, reward=noise_reward())
    summary = first.train(progress=False)
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "trainer_state.pt").exists() and (checkpoint / "config.json").exists()
    model, tokenizer = load_pretrained(str(checkpoint))
    torch.testing.assert_close(model.get_output_embeddings().weight, first.model.get_output_embeddings().weight)
    resumed = trainer(tmp_path / "run", steps=3, resume_from=str(checkpoint), model=model, tokenizer=tokenizer,
                      reward=noise_reward())
    assert resumed.step_index == 2
    assert resumed.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()
    assert resumed.schedule.last_epoch == first.schedule.last_epoch
    resumed.train(progress=False)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]                                        # one log, continued


def test_cli_help_and_a_tiny_sft_then_train(tmp_path, capsys):
    help_text = build_parser().format_help()
    assert all(command in help_text for command in ("sft", "train", "bench"))
    train_help = [action.dest for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions]
    for option in ("task", "level", "steps", "group_size", "beta", "epsilon", "mu", "model", "output_dir", "seed"):
        assert option in train_help
    data, sft_dir, grpo_dir = tmp_path / "data", tmp_path / "sft", tmp_path / "grpo"
    common = ["--task", "arith-small", "--data-dir", str(data), "--eval-size", "4"]       # as `make demo` runs it
    main(["sft", "--output-dir", str(sft_dir), "--steps", "2", "--batch-size", "4", "--drop-answer-line", "0.6",
          *common])
    printed = capsys.readouterr().out.strip().splitlines()              # each number once, as text: no JSON echo
    assert printed[-1].startswith("held-out greedy accuracy (4 problems) after 2 SFT steps: "), printed
    assert not any(line.startswith("{") for line in printed), printed
    main(["train", "--model", str(sft_dir), "--output-dir", str(grpo_dir), "--steps", "1", "--group-size", "2",
          "--prompts", "2", *common])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("held-out greedy accuracy (4 problems):") and "before" in lines[-1], lines
    assert not any(line.startswith("{") for line in lines), lines
    assert os.path.getsize(grpo_dir / "training.png") > 5000 and (grpo_dir / "metrics.jsonl").exists()
    problems = arith.read_jsonl(str(data / "train.jsonl"))
    assert len(problems) == 20000 and all(0 <= int(problem.answer) <= 49 for problem in problems)


def test_bad_config():
    with pytest.raises(ValueError, match="level"):
        GRPOLoopConfig(level="paragraph")
    with pytest.raises(ValueError, match="group_size"):
        GRPOLoopConfig(group_size=0)


@pytest.mark.parametrize("advantage", ["sentence", "cumulative", "broadcast"])
def test_sentence_level_advantage_variants(advantage):
    """``advantage`` at the sentence level: each sentence its own normalised reward, the reward-to-go of those,
    or its answer's normalised mean reward for every sentence (the sentence loss with output-level credit)."""
    from types import SimpleNamespace

    from sgrpo_kernels import group_sentence_advantages
    from sgrpo_kernels.trainer.grpo import GRPOLoop

    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    num_sentences = torch.tensor([3, 2, 2, 1])
    segment_ids = torch.tensor([[0, 0, 1, 2], [0, 1, 1, -1], [0, 1, -1, -1], [0, 0, 0, -1]])
    loop = SimpleNamespace(config=GRPOLoopConfig(level="sentence", advantage=advantage, group_size=2),
                           loss_segmenter=None)
    batch = dict(sentences=SimpleNamespace(segment_ids=segment_ids, num_sentences=num_sentences), rewards=rewards)
    ids, advantages = GRPOLoop.advantages(loop, batch)
    assert torch.equal(ids, segment_ids)
    if advantage == "broadcast":
        means = (rewards.sum(1) / num_sentences).unsqueeze(1)
        expected = group_sentence_advantages(means, torch.ones(4, dtype=torch.long), 2)[:, 0]
        assert advantages.shape == (4,)
    else:
        expected = group_sentence_advantages(rewards, num_sentences, 2, mode=advantage)
    torch.testing.assert_close(advantages, expected)
    if advantage == "cumulative":      # reward-to-go: sentence 0 of answer 0 sums its three normalised rewards
        single = group_sentence_advantages(rewards, num_sentences, 2)
        torch.testing.assert_close(advantages[0, 0], single[0].sum())
    if advantage != "sentence":
        with pytest.raises(ValueError, match="sentence-level variant"):
            GRPOLoopConfig(level="output", advantage=advantage)


def test_credit_and_ratio_are_two_axes_and_level_is_their_shorthand():
    for level, pair in (("token", ("answer", "token")), ("sentence", ("sentence", "sentence")),
                        ("output", ("answer", "output"))):
        config = GRPOLoopConfig(level=level)
        assert (config.credit, config.ratio) == pair
    assert GRPOLoopConfig(level="sentence", advantage="broadcast").credit == "answer"
    process = GRPOLoopConfig(credit="sentence", ratio="token")
    assert process.loss_ratio_level == "sum"
    assert GRPOLoopConfig(credit="answer", ratio="output").loss_ratio_level == "mean"
    assert GRPOLoopConfig(credit="answer", ratio="sentence", ratio_level="sum").loss_ratio_level == "sum"
    for options, message in ((dict(credit="sentence", ratio="output"), "no longer than a sentence"),
                             (dict(credit="paragraph"), "credit must be one of"),
                             (dict(ratio="word"), "ratio must be one of"),
                             (dict(advantage="broadcast", credit="sentence"), "credit='answer'"),
                             (dict(advantage="cumulative", credit="answer"), "needs credit='sentence'"),
                             (dict(credit="answer", answer_mix=0.5), "answer_mix mixes"),
                             (dict(eval_samples=-1), "eval_samples"), (dict(eval_greedy=False), "eval_greedy"),
                             (dict(baseline="median"), "baseline must be one of"),
                             (dict(level="output", baseline="split_final"), "needs credit='sentence'"),
                             (dict(steps=5, eval_steps=(6,)), "eval_steps")):
        with pytest.raises(ValueError, match=message):
            GRPOLoopConfig(**options)


@pytest.mark.parametrize("credit,ratio", [("sentence", "token"), ("sentence", "sentence"), ("answer", "token"),
                                          ("answer", "sentence"), ("answer", "output")])
def test_each_cell_gives_the_loss_its_segments_and_advantages(tmp_path, credit, ratio):
    """The ratio's segments are tokens, sentences or the output; sentence credit gives each segment its
    sentence's group advantage (each token its sentence's at the token ratio), answer credit one per answer."""
    from sgrpo_kernels import group_sentence_advantages

    torch.manual_seed(0)
    run = trainer(tmp_path, credit=credit, ratio=ratio, reward=noise_reward())
    batch = run.rollout()
    sentences, mask = batch["sentences"], batch["mask"].bool()
    segment_ids, advantages = run.advantages(batch)
    assert torch.equal(segment_ids >= 0, mask)
    expected_segments = {"token": torch.where(mask, torch.arange(mask.shape[1]).expand_as(mask), -1),
                         "sentence": sentences.segment_ids, "output": torch.where(mask, 0, -1)}[ratio]
    assert torch.equal(segment_ids, expected_segments)
    per_sentence = group_sentence_advantages(batch["rewards"], sentences.num_sentences, 3)
    if credit == "answer":
        means = (batch["rewards"].sum(1) / sentences.num_sentences).unsqueeze(1)
        expected = group_sentence_advantages(means, torch.ones(6, dtype=torch.long), 3)[:, 0]
        torch.testing.assert_close(advantages, expected)
    elif ratio == "sentence":
        torch.testing.assert_close(advantages, per_sentence)
    else:
        assert advantages.shape == mask.shape
        for row, column in zip(*torch.nonzero(mask, as_tuple=True)):
            assert advantages[row, column] == per_sentence[row, sentences.segment_ids[row, column]]
        assert (advantages[~mask] == 0).all()
    record = run.step()
    assert math.isfinite(record["loss"]) and record["clip_fraction"] == 0.0 and record["ratio_mean"] == 1.0


def test_the_split_final_baseline_reaches_the_advantages(tmp_path):
    from sgrpo_kernels import group_sentence_advantages

    torch.manual_seed(0)
    run = trainer(tmp_path, baseline="split_final", reward=noise_reward())
    batch = run.rollout()
    _, advantages = run.advantages(batch)
    num_sentences = batch["sentences"].num_sentences
    expected = group_sentence_advantages(batch["rewards"], num_sentences, 3, baseline="split_final")
    torch.testing.assert_close(advantages, expected)
    assert not torch.allclose(advantages, group_sentence_advantages(batch["rewards"], num_sentences, 3))


@pytest.mark.parametrize("credit,ratio", [("sentence", "sentence"), ("sentence", "token"), ("answer", "output")])
def test_several_updates_per_batch_move_the_ratio_and_are_logged(tmp_path, credit, ratio):
    """With mu = 4 full-batch updates the later updates see the policy moved: their ratios leave 1 and some are
    clipped; the step's record holds the mean over the updates and the last update's values."""
    torch.manual_seed(3)
    run = trainer(tmp_path, credit=credit, ratio=ratio, mu=4, lr=3e-2, reward=noise_reward())
    record = run.step()
    assert record["ratio_mean_last"] != 1.0 and record["clip_fraction_last"] > 0
    assert 0 < record["clip_fraction"] < record["clip_fraction_last"] + 1e-12            # the first update is 0
    assert math.isfinite(record["grad_norm"]) and math.isfinite(record["loss"])


def test_sampled_held_out_accuracy_is_seeded_and_leaves_the_random_state_alone(tmp_path):
    from sgrpo_kernels.trainer.common import sample_held_out

    model, tokenizer = small_model()
    problems = arith.make_dataset(3, seed=1)
    state = torch.get_rng_state()
    first = sample_held_out(model, tokenizer, problems, arith.is_correct, samples=4, max_new_tokens=12,
                            batch_size=8)
    assert torch.equal(torch.get_rng_state(), state)
    second = sample_held_out(model, tokenizer, problems, arith.is_correct, samples=4, max_new_tokens=12,
                             batch_size=8)
    assert first == second                                      # the same draws for the same policy
    questions, sentences, accuracy = first
    assert questions == [problem.question for problem in problems for _ in range(4)] and len(sentences) == 12
    assert len({"".join(answer) for answer in sentences}) > 1     # sampled, not greedy
    other = sample_held_out(model, tokenizer, problems, arith.is_correct, samples=4, max_new_tokens=12, seed=1,
                            batch_size=8)
    assert other[1] != sentences

    seen = []
    run = trainer(tmp_path, steps=2, eval_every=100, eval_steps=(1,), eval_samples=2, eval_greedy=False,
                  eval_extra=lambda questions, texts: seen.append(len(texts)) or {"answers": len(texts)})
    run.train(progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [record["step"] for record in records if "eval_sampled_accuracy" in record] == [0, 1, 2]
    assert all("eval_accuracy" not in record for record in records)
    assert seen == [8, 8, 8] and records[0]["eval_answers"] == 8          # 4 held-out problems x 2 samples
