"""Levels in one place: the ratio level each passes to the loss, its checks, and one default everywhere."""

import inspect

import pytest
import torch

from sgrpo_kernels.levels import (
    DEFAULT_SENTENCE_RATIO_LEVEL,
    LEVELS,
    advantages_per_sentence,
    check_level,
    loss_ratio_level,
    loss_segmenter,
    mean_sentence_reward,
)


def test_the_sentence_level_defaults_to_the_length_normalised_ratio():
    assert LEVELS == ("token", "sentence", "output")
    assert DEFAULT_SENTENCE_RATIO_LEVEL == "mean"


@pytest.mark.parametrize("sentence_ratio_level", ["sum", "mean"])
def test_loss_ratio_level_of_each_level(sentence_ratio_level):
    assert loss_ratio_level("token", sentence_ratio_level) == "sum"
    assert loss_ratio_level("output", sentence_ratio_level) == "mean"
    assert loss_ratio_level("sentence", sentence_ratio_level) == sentence_ratio_level
    assert loss_ratio_level("sentence") == DEFAULT_SENTENCE_RATIO_LEVEL


def test_bad_level_or_ratio_level_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"level must be one of 'token', 'sentence', 'output', got 'paragraph'"):
        check_level("paragraph")
    with pytest.raises(ValueError, match=r"ratio_level must be one of 'sum', 'mean', got 'median'"):
        check_level("sentence", "median")
    with pytest.raises(ValueError, match="level must be one of"):
        loss_ratio_level("sequence")
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        loss_ratio_level("token", "max")
    with pytest.raises(ValueError, match="level must be one of"):
        advantages_per_sentence(None)


def test_advantages_and_loss_segments_per_level():
    assert advantages_per_sentence("sentence") and loss_segmenter(object(), "sentence") is None
    for level in ("token", "output"):
        assert not advantages_per_sentence(level)
        assert loss_segmenter(object(), level).mode == level


def test_mean_sentence_reward_ignores_padding_and_empty_answers():
    rewards = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    means = mean_sentence_reward(rewards, torch.tensor([2, 1, 0]))
    torch.testing.assert_close(means, torch.tensor([0.75, 0.2, 0.0]))


def test_trainer_config_uses_the_default_and_the_old_names_are_gone():
    pytest.importorskip("transformers", reason="the trainer runs transformers models (train extra)")
    from sgrpo_kernels.trainer import grpo

    assert grpo.GRPOLoopConfig().ratio_level == DEFAULT_SENTENCE_RATIO_LEVEL
    assert not hasattr(grpo, "GRPOConfig") and not hasattr(grpo, "GRPOTrainer")     # TRL's names
    with pytest.raises(ValueError, match="ratio_level"):
        grpo.GRPOLoopConfig(ratio_level="median")


def test_cli_parser_uses_the_levels_and_the_default():
    from sgrpo_kernels.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {action.dest: action for action in train._actions}
    assert tuple(options["level"].choices) == LEVELS
    assert options["ratio_level"].default == DEFAULT_SENTENCE_RATIO_LEVEL
    assert f"default: {DEFAULT_SENTENCE_RATIO_LEVEL}" in options["ratio_level"].help
    assert train.parse_args(["--model", "m", "--output-dir", "o"]).ratio_level == DEFAULT_SENTENCE_RATIO_LEVEL


def test_trl_integration_uses_the_default():
    pytest.importorskip("trl", reason="the TRL integration needs trl >= 1.0 (the trl extra)")
    from sgrpo_kernels.integrations.trl import SentenceGRPOTrainer

    parameters = inspect.signature(SentenceGRPOTrainer.__init__).parameters
    assert parameters["ratio_level"].default == DEFAULT_SENTENCE_RATIO_LEVEL
