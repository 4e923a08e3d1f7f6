"""Training plots: a panel for each quantity the run measured (no empty KL axis without a reference model, no
clip-fraction panel when nothing was clipped), y labels with units, and titles from the run's configuration."""

import json

import pytest

pytest.importorskip("matplotlib", reason="the plots need matplotlib (train extra)")

from sgrpo_kernels import cli  # noqa: E402
from sgrpo_kernels.cli import front  # noqa: E402
from sgrpo_kernels.trainer.plots import GRPO_PANELS, SFT_PANELS, measured_panels, plot_metrics  # noqa: E402


def records(steps=6, clip=0.0, kl=None):
    """Records as ``GRPOLoop`` writes them: step 0 holds the first evaluation only."""
    rows = [{"step": 0, "eval_accuracy": 0.1}]
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 0.1, "reward": 0.5, "train_accuracy": 0.3, "completion_tokens": 30.0,
               "clip_fraction": clip * step, "ratio_mean": 1.0, "entropy_mean": 2.0}
        if kl is not None:
            row["kl_mean"] = kl
        if step % 3 == 0:
            row["eval_accuracy"] = 0.2
        rows.append(row)
    return rows


def write(tmp_path, rows):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_on_policy_run_without_reference_has_no_kl_or_clip_panel(tmp_path):
    shown = plot_metrics(write(tmp_path, records()), str(tmp_path / "training.png"), title="t")
    assert shown == ["training reward", "accuracy", "answer length"]
    assert (tmp_path / "training.png").stat().st_size > 5000


def test_measured_kl_and_clipping_get_their_panels(tmp_path):
    shown = plot_metrics(write(tmp_path, records(clip=0.01, kl=0.02)), str(tmp_path / "training.png"))
    assert shown == ["training reward", "accuracy", "KL to the reference", "clipped ratios", "answer length"]
    assert [panel.title for panel in measured_panels(records(kl=0.0))] == [
        "training reward", "accuracy", "KL to the reference", "answer length"]      # a measured 0 KL is shown


def test_every_panel_says_its_unit_and_evaluations_are_marked():
    for panel in GRPO_PANELS + SFT_PANELS:
        assert panel.ylabel and panel.ylabel != panel.title
    accuracy = next(panel for panel in GRPO_PANELS if panel.title == "accuracy")
    assert dict(accuracy.series).keys() == {"train_accuracy", "eval_accuracy", "eval_sampled_accuracy"}
    assert "train_acc" in dict(accuracy.series)["train_accuracy"]
    assert accuracy.marked == ("eval_accuracy", "eval_sampled_accuracy")


def test_titles_come_from_the_runs_configuration(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    args = front.build_parser().parse_args(["train", "--model", str(model), "--output-dir", str(tmp_path / "o"),
                                            "--task", "chain", "--chain-length", "4", "--level", "output",
                                            "--steps", "12", "--group-size", "6", "--prompts", "3", "--lr", "3e-4",
                                            "--beta", "0.05"])
    front.check_arguments(args)
    title = cli._train_title(args)
    for part in ("output level (ratio: mean)", "task=chain (L=4, facts=26)", "12 steps", "3 prompts x G=6",
                 "lr=0.0003", "beta=0.05"):
        assert part in title, (part, title)
    args = front.build_parser().parse_args(["sft", "--output-dir", str(tmp_path / "o"), "--task", "arith-small",
                                            "--drop-answer-line", "0.6", "--steps", "7"])
    front.check_arguments(args)
    title = cli._sft_title(args, 0.25, 40)
    for part in ("task=arith-small", "dropped from 0.6", "7 steps", "held-out greedy accuracy 0.250 (40 problems)"):
        assert part in title, (part, title)


def test_sft_loss_plot(tmp_path):
    path = tmp_path / "sft_metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 3.0 / (step + 1), "lr": 1e-3}) + "\n"
                            for step in range(5)))
    assert plot_metrics(str(path), str(tmp_path / "sft_loss.png"), panels=SFT_PANELS) == ["training loss",
                                                                                        "learning rate"]
    assert (tmp_path / "sft_loss.png").stat().st_size > 5000
