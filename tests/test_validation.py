"""Every bad input of the public API raises ValueError/TypeError naming the argument, before any computation."""

import pytest
import torch
from cases import random_case

import sgrpo_kernels as sk
from sgrpo_kernels.rewards.composite import validate_reward_weights


def good_inputs():
    case = random_case(batch=2, length=5, vocab=7, num_slots=3, dtype=torch.float32, seed=1)
    return case


def call(**changes):
    case = good_inputs()
    options = {key: changes.pop(key) for key in list(changes) if key not in case}
    case.update(changes)
    return sk.sentence_grpo_loss(case.pop("logits"), case.pop("completion_ids"), case.pop("segment_ids"),
                                 case.pop("advantages"), **case, **options)


def test_good_inputs_pass():
    assert torch.isfinite(call())
    assert torch.isfinite(call(beta=0.1, delta=2.0, backend="reference"))


TENSOR_CASES = [
    ("logits", lambda c: c["logits"][0], ValueError),
    ("logits", lambda c: c["logits"].detach().long(), TypeError),
    ("logits", lambda c: c["logits"].tolist(), TypeError),
    ("completion_ids", lambda c: c["completion_ids"][:, :4], ValueError),
    ("completion_ids", lambda c: c["completion_ids"].float(), TypeError),
    ("completion_ids", lambda c: c["completion_ids"][0], ValueError),
    ("segment_ids", lambda c: c["segment_ids"][:1], ValueError),
    ("segment_ids", lambda c: c["segment_ids"].float(), TypeError),
    ("advantages", lambda c: c["advantages"][:1], ValueError),
    ("advantages", lambda c: c["advantages"][..., None], ValueError),
    ("advantages", lambda c: c["advantages"].long(), TypeError),
    ("old_logps", lambda c: c["old_logps"][:, 1:], ValueError),
    ("old_logps", lambda c: c["old_logps"].long(), TypeError),
    ("ref_logps", lambda c: c["ref_logps"][:1], ValueError),
]


@pytest.mark.parametrize("name,corrupt,error", TENSOR_CASES)
def test_bad_tensor_is_named(name, corrupt, error):
    case = good_inputs()
    with pytest.raises(error, match=name):
        call(**{name: corrupt(case)})


@pytest.mark.parametrize("name", ["completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps"])
def test_tensors_on_another_device(name):
    case = good_inputs()
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        call(**{name: case[name].to("meta")})


def test_segment_ids_beyond_advantages():
    case = good_inputs()
    segment_ids = case["segment_ids"].clone()
    segment_ids[0, 0] = 3                             # advantages has S_max = 3
    with pytest.raises(ValueError, match="segment_ids must be < S_max"):
        call(segment_ids=segment_ids)


def test_segment_ids_below_minus_one():
    segment_ids = good_inputs()["segment_ids"].clone()
    segment_ids[1, 0] = -2
    with pytest.raises(ValueError, match="segment_ids must be >= -1"):
        call(segment_ids=segment_ids)


@pytest.mark.parametrize("bad_id", [-1, 7, 10**6])
def test_scored_token_ids_outside_vocabulary(bad_id):
    case = good_inputs()
    ids = case["completion_ids"].clone()
    ids[0, 0] = bad_id                                # position (0, 0) is always scored
    assert case["segment_ids"][0, 0] >= 0
    with pytest.raises(ValueError, match="completion_ids must lie in"):
        call(completion_ids=ids)


def test_unscored_token_ids_may_be_anything():
    case = good_inputs()
    assert (case["completion_ids"][case["segment_ids"] < 0] == -100).all()
    assert torch.isfinite(call())


def test_beta_without_ref_logps():
    with pytest.raises(ValueError, match="ref_logps is required when beta > 0"):
        call(beta=0.1, ref_logps=None)


@pytest.mark.parametrize("option", ["ratio_level", "kl_reduction", "reduction", "backend", "objective",
                                    "kl_estimator", "is_mode"])
def test_unknown_option_string(option):
    with pytest.raises(ValueError, match=option):
        call(**{option: "nonsense"})


@pytest.mark.parametrize("name,value", [("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")),
                                        ("eps_low", -0.1), ("eps_low", 1.0), ("eps_high", -0.1), ("beta", -0.5),
                                        ("delta", 0.0), ("clamp_log_ratio", 0.0), ("beta", float("inf")),
                                        ("clip_ratio_c", 1.0), ("clip_ratio_c", 0.5), ("sapo_tau_pos", 0.0),
                                        ("sapo_tau_neg", -1.0), ("vespo_lambda_pos", 0.0),
                                        ("vespo_lambda_neg", -2.0), ("vespo_k_pos", float("nan"))])
def test_bad_scalar_option(name, value):
    with pytest.raises(ValueError, match=name):
        call(**{name: value})


@pytest.mark.parametrize("name,value", [("temperature", "1"), ("inplace", 1), ("return_metrics", "yes"),
                                        ("kl_importance_weighting", 1), ("clip_ratio_c", "2")])
def test_option_of_wrong_type(name, value):
    with pytest.raises(TypeError, match=name):
        call(**{name: value})


@pytest.mark.parametrize("normalizer", [0.0, -3.0, float("nan"), torch.ones(2), torch.tensor(True)])
def test_bad_normalizer(normalizer):
    with pytest.raises(ValueError, match="normalizer"):
        call(normalizer=normalizer)


def test_is_mode_needs_rollout_and_old_logps():
    with pytest.raises(ValueError, match="is_mode='token_mask' needs sampling_logps and old_logps"):
        call(is_mode="token_mask")


def test_native_backend_not_built_says_how_to_build_it(monkeypatch):
    from sgrpo_kernels.ops.native import extension
    monkeypatch.setattr(extension, "_import", lambda: (None, "No module named 'sgrpo_kernels._native'"))
    with pytest.raises(ValueError, match=r"backend='native' cannot run on cpu: the C\+\+ extension .* is not built"
                                         r".*pip install --no-build-isolation"):
        call(backend="native")


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size must divide"):
        sk.group_sentence_advantages(torch.rand(6, 3), torch.full((6,), 2), 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        sk.group_sentence_advantages(torch.rand(6, 3), torch.full((6,), 2), 0)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_sentences=torch.tensor([1, 4])), ValueError, "num_sentences"),
    (dict(num_sentences=torch.tensor([1, -1])), ValueError, "num_sentences"),
    (dict(num_sentences=torch.tensor([1.0, 2.0])), TypeError, "num_sentences"),
    (dict(num_sentences=torch.tensor([1, 2, 3])), ValueError, "num_sentences"),
    (dict(rewards=torch.rand(2)), ValueError, "rewards"),
    (dict(rewards=torch.ones(2, 3, dtype=torch.long)), TypeError, "rewards"),
    (dict(weighting="token"), ValueError, "weighting"),
    (dict(scale="mad"), ValueError, "scale"),
    (dict(mode="prefix"), ValueError, "mode"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0, scale="none"), ValueError, "eps"),
    (dict(answer_mix=-0.1), ValueError, "answer_mix"),
    (dict(answer_mix=1.5), ValueError, "answer_mix"),
    (dict(answer_mix=float("nan")), ValueError, "answer_mix"),
    (dict(answer_mix="half"), TypeError, "answer_mix"),
])
def test_bad_advantage_inputs(kwargs, error, name):
    arguments = dict(rewards=torch.rand(2, 3), num_sentences=torch.tensor([1, 3]), group_size=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=name):
        sk.group_sentence_advantages(arguments.pop("rewards"), arguments.pop("num_sentences"),
                                     arguments.pop("group_size"), **arguments)


@pytest.mark.parametrize("weights,match", [({"correctness": 1.2, "logic": -0.2}, "weights\\['logic'\\]"),
                                           ({"correctness": 0.5, "logic": 0.3}, "sum to 1"),
                                           ({}, "non-empty")])
def test_bad_reward_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        validate_reward_weights(weights)


def test_good_reward_weights():
    assert validate_reward_weights({"correctness": 0.5, "logic": 0.3, "format": 0.2}) == {
        "correctness": 0.5, "logic": 0.3, "format": 0.2}


def test_token_logprobs_checks():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="ids must have shape"):
        sk.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids must lie in"):
        sk.token_logprobs(logits, torch.full((2, 3), 5))
    with pytest.raises(TypeError, match="ids must have an integer dtype"):
        sk.token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        sk.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0)


def test_fused_linear_checks():
    case = good_inputs()
    hidden, weight = torch.randn(2, 5, 4), torch.randn(7, 4)
    rest = [case["completion_ids"], case["segment_ids"], case["advantages"]]
    with pytest.raises(ValueError, match="weight must have shape"):
        sk.fused_linear_sentence_grpo_loss(hidden, torch.randn(7, 3), *rest)
    with pytest.raises(ValueError, match="bias must be"):
        sk.fused_linear_sentence_grpo_loss(hidden, weight, *rest, bias=torch.randn(6))
    with pytest.raises(ValueError, match="chunk_size"):
        sk.fused_linear_sentence_grpo_loss(hidden, weight, *rest, chunk_size=0)
    with pytest.raises(ValueError, match="completion_ids must lie in"):
        sk.fused_linear_sentence_grpo_loss(hidden, torch.randn(3, 4), *rest)


def test_module_validates_at_construction_and_forward():
    with pytest.raises(ValueError, match="reduction"):
        sk.SentenceGRPOLoss(reduction="mean")
    module = sk.SentenceGRPOLoss()
    case = good_inputs()
    with pytest.raises(ValueError, match="either logits or hidden"):
        module(case["logits"], case["completion_ids"], case["segment_ids"], case["advantages"],
               hidden=torch.randn(2, 5, 4), weight=torch.randn(7, 4))
