"""Options live in one place: ``LossConfig`` owns names, defaults and descriptions, and every entry point
takes them without restating a different default."""

import dataclasses
import inspect

import pytest
import torch

import sgrpo_kernels as sk
import sgrpo_kernels.ops  # noqa: F401  (registers the custom ops whose schema a test reads)
from sgrpo_kernels.config import OPTION_DOCS, LossConfig

ENTRY_POINTS = {
    "sentence_grpo_loss": sk.sentence_grpo_loss,
    "fused_linear_sentence_grpo_loss": sk.fused_linear_sentence_grpo_loss,
    "SentenceGRPOLoss": sk.SentenceGRPOLoss.__init__,
}
FIELDS = {field.name: field.default for field in dataclasses.fields(LossConfig)}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_option_with_the_default_of_loss_config(name):
    parameters = inspect.signature(ENTRY_POINTS[name]).parameters
    for option, default in FIELDS.items():
        assert option in parameters, f"{name} does not take {option}"
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[option].default == default, (
            f"{name}({option}={parameters[option].default!r}) but LossConfig says {default!r}")


def test_every_option_is_described_once_and_the_loss_docstrings_carry_it():
    assert set(OPTION_DOCS) == set(FIELDS)
    for function in (sk.sentence_grpo_loss, sk.fused_linear_sentence_grpo_loss):
        for option, text in OPTION_DOCS.items():
            assert f"{option}: {text}" in function.__doc__, f"{function.__name__} lacks the doc of {option}"
        assert "{options}" not in function.__doc__


def test_the_custom_ops_take_every_option_in_field_order():
    schema = torch.ops.sgrpo_kernels.sentence_grpo_loss.default._schema
    names = [argument.name for argument in schema.arguments]
    assert names[6:6 + len(FIELDS)] == list(FIELDS)


def test_the_module_keeps_one_validated_config():
    module = sk.SentenceGRPOLoss(eps_low=0.1, ratio_level="mean")
    assert module.config == LossConfig(eps_low=0.1, ratio_level="mean")
    with pytest.raises(ValueError, match="ratio_level"):
        sk.SentenceGRPOLoss(ratio_level="median")
