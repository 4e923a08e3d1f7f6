"""SentenceGRPOTrainer as a drop-in for TRL's GRPOTrainer: what a real ``train()`` logs, TRL's errors, and TRL's
adaptive entropy controller, each against stock TRL run from the same seed."""

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs trl >= 1.0 (the trl extra)")
datasets = pytest.importorskip("datasets", reason="TRL trains on a datasets.Dataset")

from test_trl import dataset, length_reward, noisy_sentence_reward, perturb  # noqa: E402

from sgrpo_kernels.integrations.trl import SentenceGRPOTrainer  # noqa: E402
from sgrpo_kernels.trainer.tiny import char_tokenizer, tiny_model  # noqa: E402

SAMPLING_LEVEL = {"token": "token", "output": "sequence"}       # our level -> TRL's importance_sampling_level
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
           "eval_samples_per_second", "eval_steps_per_second", "eval_step_time")


def build(tmp_path, trainer_class, trl_options=None, eval_dataset=None, **kwargs):
    """A trainer on a tiny model built offline; every run starts from the same weights and seed."""
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=12, max_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[],
                   use_cpu=True, save_strategy="no", temperature=1.3, seed=0, bf16=False, beta=0.0)
    options.update(trl_options or {})
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=32, layers=1, heads=2)
    model.save_pretrained(tmp_path / "initial")         # TRL builds its frozen reference model from this path
    model.config._name_or_path = str(tmp_path / "initial")
    return trainer_class(model, args=trl.GRPOConfig(**options), train_dataset=dataset(),
                         eval_dataset=eval_dataset, processing_class=tokenizer, **kwargs)


def trained_logs(tmp_path, trainer_class, trl_options, eval_dataset=None, **kwargs):
    trainer = build(tmp_path, trainer_class, trl_options, eval_dataset, **kwargs)
    trainer.train()
    return trainer.state.log_history


def assert_logs_match(ours: list, theirs: list, atol: float, rtol: float = 1e-5) -> None:
    """Every entry TRL logs, logged by us with the same keys (plus our ``sentence/*``) and values."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for step, (our_entry, their_entry) in enumerate(zip(ours, theirs)):
        missing = set(their_entry) - set(our_entry)
        assert not missing, f"entry {step}: TRL logs {sorted(missing)}, the drop-in does not"
        extra = {key for key in set(our_entry) - set(their_entry)
                 if not key.removeprefix("eval_").startswith("sentence/")}
        assert not extra, f"entry {step}: the drop-in logs {sorted(extra)}, TRL does not"
        for key, expected in their_entry.items():
            if key in TIMINGS:
                continue
            actual = our_entry[key]
            if isinstance(expected, float) and math.isnan(expected):
                assert math.isnan(actual), f"entry {step}, {key}: {actual} where TRL logs NaN"
                continue
            assert actual == pytest.approx(expected, rel=rtol, abs=atol), f"entry {step}, {key}"


def two_step_options(level: str, loss_type: str, **overrides) -> dict:
    """Two optimizer steps of two accumulated micro-batches each, the second step on the first step's rollouts
    (num_iterations=2: ratios away from 1, clipped units, KL > 0), with an entropy bonus."""
    options = dict(loss_type=loss_type, importance_sampling_level=SAMPLING_LEVEL[level], beta=0.05,
                   num_iterations=2, gradient_accumulation_steps=2, epsilon=0.05, entropy_coef=0.01,
                   use_bias_correction_kl=loss_type in ("grpo", "dapo", "luspo", "vespo"))
    if loss_type == "cispo":
        options["epsilon_high"] = 1.02           # CISPO's cap on the ratio itself: some units above it
    return dict(options, **overrides)


def assert_train_logs_match(ours: list, theirs: list, loss_type: str) -> None:
    """:func:`assert_logs_match` at the loss type's rounding: luspo sums its token losses per answer (no mean),
    cispo's and vespo's carry log π (~-4 per token), so their losses are sums of terms of ~1-10 that cancel to
    ~1e-2 (zero-mean advantages) and fp32 rounding in the two summation orders reaches ~1e-6 in absolute terms."""
    assert_logs_match(ours, theirs, atol=5e-6 if loss_type in ("luspo", "cispo", "vespo") else 1e-6)


@pytest.mark.parametrize("level,loss_type", [
    ("output", "grpo"), ("output", "bnpo"), ("output", "dr_grpo"), ("output", "dapo"), ("output", "cispo"),
    ("output", "sapo"), ("output", "luspo"), ("output", "vespo"),
    ("token", "grpo"), ("token", "bnpo"), ("token", "dr_grpo"), ("token", "dapo"), ("token", "cispo"),
    ("token", "sapo"), ("token", "luspo"), ("token", "vespo")])
def test_train_logs_trls_metrics_with_trls_values(tmp_path, level, loss_type):
    """:func:`two_step_options` and one evaluation: the drop-in's log history equals stock TRL's key for key
    (TRL's metrics averaged over the micro-batches and gathered as TRL does), with our ``sentence/*`` keys
    besides."""
    options = two_step_options(level, loss_type, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2)
    evaluation = dataset(1)
    theirs = trained_logs(tmp_path / "theirs", trl.GRPOTrainer, options, evaluation, reward_funcs=[length_reward])
    ours = trained_logs(tmp_path / "ours", SentenceGRPOTrainer, options, evaluation, reward_funcs=[length_reward],
                        level=level)
    assert_train_logs_match(ours, theirs, loss_type)
    second = [entry for entry in theirs if "loss" in entry][1]     # step 2: off the rollout policy
    assert second["kl"] > 0 and second["policy_loss"] != 0 and second["entropy_coef"] == 0.01
    evaluation = [entry for entry in theirs if "eval_loss" in entry]
    assert len(evaluation) == 1 and "eval_entropy" in evaluation[0] and "eval_policy_loss" in evaluation[0]
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        assert second["clip_ratio/region_mean"] > 0, "nothing clipped: the clip metrics would not be tested"
    if loss_type == "cispo":
        assert second["cispo_clip_ratio"] > 0
    if loss_type == "vespo":
        assert second["vespo/phi_seq_mean"] != 1.0


@pytest.mark.parametrize("loss_type", ["grpo", "vespo"])
def test_train_with_the_off_policy_mask_logs_trls_values_at_the_token_level(tmp_path, monkeypatch, loss_type):
    """DeepSeek-V3.2's off-policy mask at ``level="token"`` is TRL's, per sequence (grpo: the loss's weights;
    vespo: its segments are whole answers). The threshold lies inside the second step's drift from the rollout
    policy: TRL drops some answers, and some negative answer has tokens on both sides of it, so that a mask per
    token would differ from TRL's. The drop-in's log history equals TRL's."""
    threshold = 0.12
    options = two_step_options("token", loss_type, off_policy_mask_threshold=threshold)
    calls = []                          # (advantages [B, 1], drift [B, T], mask [B, T], keep [B, 1]) of TRL's
    get_mask = trl.GRPOTrainer.get_off_policy_mask

    def recorded(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        keep = get_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)
        calls.append((advantages, sampling_per_token_logps - per_token_logps.detach(), mask, keep))
        return keep

    with monkeypatch.context() as patch:
        patch.setattr(trl.GRPOTrainer, "get_off_policy_mask", staticmethod(recorded))
        theirs = trained_logs(tmp_path / "theirs", trl.GRPOTrainer, options, reward_funcs=[length_reward])
    assert len(calls) == 4 and all(keep.all() for *_, keep in calls[:2]), "the first step is on-policy: no mask"
    assert any(not keep.all() for *_, keep in calls[2:]), "nothing masked: the mask would not be tested"
    assert any((((drift > threshold) != ~keep.bool()) & mask.bool() & (advantages < 0)).any()
               for advantages, drift, mask, keep in calls), "a mask per token would drop the same tokens"
    ours = trained_logs(tmp_path / "ours", SentenceGRPOTrainer, options, reward_funcs=[length_reward], level="token")
    assert_train_logs_match(ours, theirs, loss_type)


def test_sentence_level_clip_ratios_weigh_each_sentence_by_its_tokens(tmp_path):
    """At the sentence level a sentence's ratio (the geometric mean of its token ratios) is clipped or not as a
    whole and counts once per token: the clip metrics are TRL's token formulas over the sentences' indicators,
    checked here against a plain loop over the sentences of a batch with ratios away from 1."""
    trainer = build(tmp_path, SentenceGRPOTrainer, dict(beta=0.05, loss_type="grpo", num_iterations=2, epsilon=0.05,
                                                        use_bias_correction_kl=True),
                    sentence_reward=noisy_sentence_reward)
    rows = [trainer.train_dataset[index] for index in range(4)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(rows)
    perturb(trainer.model, scale=0.1)
    generator = torch.Generator().manual_seed(3)       # rollout log-probs off by a per-token amount: every
    noise = 0.2 * torch.randn(inputs["old_per_token_logps"].shape, generator=generator)    # sentence its ratio
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + noise
    trainer._compute_loss(trainer.model, inputs)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    length = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1:-1]
        logps = torch.log_softmax(logits.double() / trainer.temperature, -1)
        entropies = -(logps.exp() * logps).sum(-1)
        logps = logps.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    old = inputs["old_per_token_logps"].double()
    low, high, tokens, per_answer_low, per_answer_high = 0, 0, 0, [], []
    token_ratio = torch.zeros_like(old)
    for row, segments in enumerate(inputs["segment_ids"].tolist()):
        row_low = row_high = row_tokens = 0
        for sentence in sorted(set(segments) - {-1}):
            where = [t for t, s in enumerate(segments) if s == sentence]
            ratio = math.exp(sum(logps[row, t] - old[row, t] for t in where) / len(where))
            advantage = inputs["advantages"][row, sentence].item()
            token_ratio[row, where] = ratio
            row_low += len(where) * (ratio < 0.95 and advantage < 0)
            row_high += len(where) * (ratio > 1.05 and advantage > 0)
            row_tokens += len(where)
        low, high, tokens = low + row_low, high + row_high, tokens + row_tokens
        per_answer_low.append(row_low / row_tokens)
        per_answer_high.append(row_high / row_tokens)
    assert high + low > 0, "nothing clipped: the test would not test the clip metrics"
    assert logged["clip_ratio/low_mean"] == pytest.approx(low / tokens, abs=1e-7)
    assert logged["clip_ratio/high_mean"] == pytest.approx(high / tokens, abs=1e-7)
    assert logged["clip_ratio/region_mean"] == pytest.approx((low + high) / tokens, abs=1e-7)
    assert logged["clip_ratio/low_min"] == pytest.approx(min(per_answer_low), abs=1e-7)
    assert logged["clip_ratio/high_max"] == pytest.approx(max(per_answer_high), abs=1e-7)
    scored = inputs["segment_ids"] >= 0
    assert logged["entropy"] == pytest.approx(entropies[scored].mean().item(), rel=1e-5)
    ref = inputs["ref_per_token_logps"].double()
    kl = (token_ratio * (torch.exp(ref - logps) - (ref - logps) - 1))[scored].mean().item()   # TRL's KL correction
    assert logged["kl"] == pytest.approx(kl, rel=1e-5)
    assert logged["sentence/clip_fraction"] >= 0          # our own keys stay


@pytest.mark.parametrize("level", ["output", "token", "sentence"])
@pytest.mark.parametrize("reward_funcs", [None, []])
def test_no_reward_source_raises_trls_error(tmp_path, level, reward_funcs):
    with pytest.raises(ValueError) as theirs:
        build(tmp_path / "theirs", trl.GRPOTrainer, reward_funcs=reward_funcs)
    with pytest.raises(ValueError) as ours:
        build(tmp_path / "ours", SentenceGRPOTrainer, reward_funcs=reward_funcs, level=level)
    assert str(theirs.value).startswith("No reward source provided")
    if level == "sentence":                  # TRL's text, then what the sentence level needs
        assert str(ours.value).startswith(str(theirs.value)) and "sentence_reward" in str(ours.value)
    else:
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("level,target,expected", [
    ("output", 100.0, [0.03, 0.05, 0.07]),           # entropy below target: +delta per step, capped at max
    ("token", 0.0, [0.0, 0.0, 0.0])])                # above target: -delta, floored at min; no bonus applied
def test_adaptive_entropy_controller_follows_trl(tmp_path, level, target, expected):
    """TRL's controller (Skywork-OR1): the coefficient moves by ``entropy_coef_delta`` at each optimizer step on
    the entropy of the whole accumulation window, applies only while that entropy is at most the target (none in
    the first window), and is logged as ``entropy_coef``; over the top-entropy tokens with the entropy mask."""
    options = dict(loss_type="grpo", importance_sampling_level=SAMPLING_LEVEL[level], max_steps=3,
                   gradient_accumulation_steps=2, use_adaptive_entropy=True, entropy_coef=0.01,
                   entropy_coef_delta=0.02, entropy_coef_max=0.07, entropy_coef_min=0.0, entropy_target=target,
                   top_entropy_quantile=0.5 if level == "token" else 1.0)
    theirs = trained_logs(tmp_path / "theirs", trl.GRPOTrainer, options, reward_funcs=[length_reward])
    ours = trained_logs(tmp_path / "ours", SentenceGRPOTrainer, options, reward_funcs=[length_reward],
                        level=level)
    assert [entry["entropy_coef"] for entry in theirs[:3]] == pytest.approx(expected)
    assert_logs_match(ours, theirs, atol=1e-6)


def test_adaptive_entropy_controller_at_the_sentence_level(tmp_path):
    """The controller runs at the sentence level too: its coefficient rises while the entropy is below the target
    and, once applied, the entropy bonus changes the loss."""
    options = dict(loss_type="grpo", max_steps=3, use_adaptive_entropy=True, entropy_coef=0.0,
                   entropy_coef_delta=0.5, entropy_target=100.0)
    trainer = build(tmp_path / "adaptive", SentenceGRPOTrainer, options, sentence_reward=noisy_sentence_reward)
    trainer.train()
    logs = trainer.state.log_history
    assert [entry["entropy_coef"] for entry in logs[:3]] == pytest.approx([0.5, 1.0, 1.0])   # capped at max 1
    assert trainer._last_world_entropy == pytest.approx(logs[2]["entropy"], rel=1e-5)
    static = trained_logs(tmp_path / "static", SentenceGRPOTrainer, dict(options, use_adaptive_entropy=False),
                          sentence_reward=noisy_sentence_reward)
    assert logs[0]["loss"] == pytest.approx(static[0]["loss"], abs=1e-7)    # first window: no bonus applied
    assert abs(logs[1]["loss"] - static[1]["loss"]) > 1e-2                  # then coef 0.5 x entropy ~ 4


def test_tool_tokens_are_not_scored(tmp_path, monkeypatch):
    """TRL leaves tool output out of its loss and metrics (``tool_mask``): so do the drop-in's segments."""
    generate = trl.GRPOTrainer._generate_and_score_completions

    def with_tool_output(self, inputs):             # as after a tool call: positions 2..4 came from the tool
        output = generate(self, inputs)
        output["tool_mask"] = torch.ones_like(output["completion_mask"])
        output["tool_mask"][:, 2:5] = 0
        return output

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", with_tool_output)
    trainer = build(tmp_path, SentenceGRPOTrainer, reward_funcs=[length_reward], level="output")
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([trainer.train_dataset[index] for index in range(4)])
    scored = inputs["completion_mask"].bool() & inputs["tool_mask"].bool()
    assert (inputs["segment_ids"][:, 2:5] == -1).all()
    assert torch.equal(inputs["segment_ids"] >= 0, scored)


def test_without_trl_metrics_only_our_keys_are_logged(tmp_path):
    """``trl_metrics=False`` skips the extra pass over the LM head and TRL's loss keys; the loss is unchanged."""
    trainer = build(tmp_path, SentenceGRPOTrainer, dict(beta=0.05, loss_type="dapo", num_iterations=2),
                    reward_funcs=[length_reward], level="token")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([trainer.train_dataset[index] for index in range(4)])
    with_metrics = trainer._compute_loss(trainer.model, inputs)
    assert {"entropy", "kl", "clip_ratio/region_mean"} <= set(trainer._metrics["train"])
    trainer._metrics["train"].clear()
    trainer.trl_metrics = False
    assert trainer._compute_loss(trainer.model, inputs).item() == pytest.approx(with_metrics.item(), abs=1e-7)
    assert all(key.startswith("sentence/") for key in trainer._metrics["train"]), trainer._metrics["train"]
