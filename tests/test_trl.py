"""SentenceGRPOTrainer: a few real TRL steps on a tiny local model, and its loss against reference.py and TRL."""

import math
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

trl = pytest.importorskip("trl", reason="the TRL integration needs trl >= 1.0 (the trl extra)")
datasets = pytest.importorskip("datasets", reason="TRL trains on a datasets.Dataset")

from cases import assert_relative_close, leave_worker  # noqa: E402

from sgrpo_kernels import reference  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402
from sgrpo_kernels.integrations.trl import SentenceGRPOTrainer  # noqa: E402
from sgrpo_kernels.trainer.tasks import arith  # noqa: E402
from sgrpo_kernels.trainer.tiny import char_tokenizer, tiny_model  # noqa: E402


def dataset(count=8):
    problems = arith.make_dataset(count, seed=4)
    return datasets.Dataset.from_list([{"prompt": problem.question + "\n", "answer": problem.answer}
                                       for problem in problems])


def config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=20, max_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[],
                   use_cpu=True, save_strategy="no", temperature=1.3, beta=0.0, seed=0, bf16=False,
                   use_bias_correction_kl=False)
    options.update(overrides)
    return trl.GRPOConfig(**options)


def make(tmp_path, trainer_class=SentenceGRPOTrainer, **kwargs):
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=32, layers=1, heads=2)
    model.save_pretrained(tmp_path / "initial")         # TRL builds its frozen reference model from this path
    model.config._name_or_path = str(tmp_path / "initial")
    trl_options = {key: kwargs.pop(key) for key in list(kwargs) if key in ("beta", "importance_sampling_level",
                                                                             "loss_type", "num_iterations",
                                                                             "use_bias_correction_kl",
                                                                             "top_entropy_quantile", "bf16",
                                                                             "entropy_coef", "use_adaptive_entropy",
                                                                             "off_policy_mask_threshold",
                                                                             "num_generations")}
    return trainer_class(model, args=config(tmp_path, **trl_options), train_dataset=dataset(),
                         processing_class=tokenizer, **kwargs)


def losses_and_head_gradients(ours, theirs, inputs):
    """Our trainer's and TRL's own ``_compute_loss`` on the same inputs, and their gradients of the LM head."""
    results = []
    for trainer in (ours, theirs):
        loss = trainer._compute_loss(trainer.model, inputs)
        (grad,) = torch.autograd.grad(loss, [trainer.model.get_output_embeddings().weight])
        results += [loss, grad]
    return results


def length_reward(completions, **kwargs):
    """A per-answer reward with spread: longer answers score higher."""
    return [min(len(text), 40) / 40 for text in completions]


def noisy_sentence_reward(questions, answers, references):
    generator = torch.Generator().manual_seed(sum(map(len, questions)))
    return [torch.rand(len(sentences), generator=generator).tolist() for sentences in answers]


def batch_inputs(trainer):
    rows = [trainer.train_dataset[index] for index in range(4)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1      # set by Trainer.train() in a real run
    return trainer._generate_and_score_completions(rows)


def test_a_few_sentence_level_steps_change_the_model(tmp_path):
    trainer = make(tmp_path, sentence_reward=noisy_sentence_reward, bf16=True)      # TRL's default: bf16 autocast
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = sum(not torch.equal(old, new) for old, new in zip(before, trainer.model.parameters()))
    assert changed == len(before)
    logged = [entry for entry in trainer.state.log_history if "sentence/ratio_mean" in entry]
    assert logged and all(entry["sentence/ratio_mean"] == entry["sentence/ratio_mean"] for entry in logged)


def test_sentence_level_loss_equals_reference_on_the_same_batch(tmp_path):
    trainer = make(tmp_path, sentence_reward=arith.reward(), beta=0.0)
    inputs = batch_inputs(trainer)
    assert inputs["advantages"].dim() == 2 and inputs["segment_ids"].shape == inputs["completion_ids"].shape
    ours = trainer._compute_loss(trainer.model, inputs) * trainer.current_gradient_accumulation_steps
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    length = inputs["completion_ids"].shape[1]
    logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1:-1]
    expected = reference.sentence_grpo_loss(logits.double(), inputs["completion_ids"], inputs["segment_ids"],
                                            inputs["advantages"].double(), None, None,
                                            LossConfig(temperature=trainer.temperature, ratio_level="mean"))
    assert_relative_close(ours, expected, 1e-5, "loss")


@pytest.mark.parametrize("level,options", [("sentence", {}), ("token", dict(use_adaptive_entropy=True,
                                                                             entropy_coef=0.01)),
                                           ("output", dict(beta=0.05))])
def test_trls_metrics_cost_no_product_with_the_lm_head_beyond_the_losss_own(tmp_path, level, options,
                                                                           monkeypatch):
    """With ``trl_metrics=True`` (and TRL's adaptive entropy controller) a micro-batch's loss makes exactly the
    products with the LM head that it makes without any metric: the metrics read the token scores of the loss's
    own pass; and they are logged. Counted: every chunk product ``hidden @ weight.T`` of the fused paths (the loss's
    and the log-prob functions')."""
    from sgrpo_kernels.ops import fused_linear

    products = []
    product = fused_linear._LinearHead.logits
    monkeypatch.setattr(fused_linear._LinearHead, "logits",
                        lambda head, tokens: products.append(tokens.numel()) or product(head, tokens))
    counts, logged = {}, {}
    for trl_metrics in (False, True):
        reward = dict(sentence_reward=noisy_sentence_reward) if level == "sentence" else dict(
            reward_funcs=[length_reward])
        trainer = make(tmp_path / str(trl_metrics), level=level, trl_metrics=trl_metrics, **reward, **options)
        inputs = batch_inputs(trainer)
        products.clear()
        trainer._compute_loss(trainer.model, inputs).backward()
        counts[trl_metrics] = (len(products), sum(products))          # chunk products, and the rows they cover
        logged[trl_metrics] = set(trainer._metrics["train"])
    assert counts[True] == counts[False] and counts[False][0] > 0, counts
    assert "entropy" in logged[True] and "entropy" not in logged[False]


def test_model_step_scorers_in_a_composite_are_a_sentence_reward(tmp_path):
    """A verifier and a process reward model (tiny models of their own) inside a CompositeReward, min-form on the
    PRM, score the sentences of TRL's completions; the advantages are per sentence and the loss is finite."""
    from sgrpo_kernels.rewards import CompositeReward, GenerativeVerifier, MinForm, ProcessRewardModel

    tokenizer = char_tokenizer()
    judge, prm = (tiny_model(tokenizer, hidden_size=32, layers=1, heads=2, seed=seed).eval() for seed in (1, 2))
    reward = CompositeReward({"verifier": GenerativeVerifier(judge, tokenizer, yes="Yes", no="No", batch_size=3),
                              "prm": MinForm(ProcessRewardModel(prm, tokenizer, step_tag="?", good_token="+",
                                                                bad_token="-", batch_size=3))},
                             {"verifier": 0.5, "prm": 0.5})
    trainer = make(tmp_path, sentence_reward=reward)
    inputs = batch_inputs(trainer)
    judged, prm_scores = reward.breakdown["verifier"], reward.breakdown["prm"]
    exists = torch.arange(judged.shape[1]) < (inputs["segment_ids"].amax(1) + 1).unsqueeze(1)
    for scores in (judged, prm_scores):
        assert exists.any() and ((scores > 0) & (scores < 1))[exists].all() and (scores[~exists] == 0).all()
    assert (prm_scores[:, 1:] <= prm_scores[:, :-1])[exists[:, 1:]].all()           # min-form: never rises
    assert inputs["advantages"].shape == judged.shape
    assert torch.isfinite(trainer._compute_loss(trainer.model, inputs))


def perturb(model, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator) * parameter.std().clamp(min=0.1))


@pytest.mark.parametrize("level,sampling_level,loss_type,bias_correction", [
    ("token", "token", "grpo", False), ("output", "sequence", "grpo", False), ("token", "token", "bnpo", False),
    ("token", "token", "dapo", False), ("token", "token", "dr_grpo", False),
    ("token", "token", "grpo", True), ("output", "sequence", "dapo", True),           # TRL's default KL correction
    ("token", "token", "cispo", True), ("output", "sequence", "cispo", False),
    ("token", "token", "sapo", True), ("output", "sequence", "sapo", False),
    ("token", "token", "luspo", False), ("output", "sequence", "luspo", True),
    ("output", "token", "vespo", False), ("output", "sequence", "vespo", True),     # vespo weighs sequences
    ("token", "token", "vespo", False), ("token", "token", "vespo", True)])         # and its KL the tokens
@pytest.mark.parametrize("entropy_coef", [0.0, 0.02])
def test_token_and_output_levels_reproduce_trl(tmp_path, level, sampling_level, loss_type, bias_correction,
                                               entropy_coef):
    options = dict(reward_funcs=[length_reward], beta=0.05, importance_sampling_level=sampling_level,
                   loss_type=loss_type, num_iterations=2,        # num_iterations > 1: TRL keeps old log-probs
                   use_bias_correction_kl=bias_correction, entropy_coef=entropy_coef)
    ours = make(tmp_path / "ours", level=level, **options)
    theirs = make(tmp_path / "theirs", trl.GRPOTrainer, **options)
    inputs = batch_inputs(ours)
    assert inputs["advantages"].dim() == 1 and inputs["advantages"].abs().sum() > 0
    assert inputs["old_per_token_logps"] is not None and inputs["ref_per_token_logps"] is not None
    perturb(ours.model)                 # the same step away from the rollout policy and the reference in both,
    perturb(theirs.model)               # and rollout log-probs shifted per row: ratios != 1, some clipped, KL != 0
    shifts = torch.tensor([0.4, -0.4, 0.1, -0.1]).repeat(len(inputs["advantages"]) // 4)
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + shifts[:, None]
    theirs.current_gradient_accumulation_steps = 2
    ours.current_gradient_accumulation_steps = 2
    our_loss, our_grad, their_loss, their_grad = losses_and_head_gradients(ours, theirs, inputs)
    assert their_loss.abs() > 1e-3
    if loss_type not in ("sapo", "vespo"):         # soft gate, gamma weight: nothing is clipped
        assert ours._metrics["train"]["sentence/clip_fraction"][-1] > 0
    assert_relative_close(our_loss, their_loss, 1e-5, "loss")
    assert_relative_close(our_grad, their_grad, 1e-4, "gradient of the LM head")


@pytest.mark.parametrize("level,sampling_level,loss_type,ratio_shape,threshold", [
    ("token", "token", "dapo", "token", None), ("output", "sequence", "grpo", "sequence", None),
    ("token", "token", "cispo", "sequence", None), ("output", "sequence", "vespo", "token", None),
    ("token", "token", "vespo", "token", None),
    ("token", "token", "dapo", "token", 0.0), ("token", "token", "grpo", "sequence", 0.0),    # with the
    ("token", "token", "vespo", "token", 0.0)])                                    # off-policy sequence mask
def test_vllm_importance_sampling_correction_reproduces_trl(tmp_path, level, sampling_level, loss_type,
                                                             ratio_shape, threshold):
    """TRL's default with vLLM: the loss times the rollout engine's importance ratio that TRL computed
    (``inputs["importance_sampling_ratio"]``, [B, T] for token modes, [B, 1] for sequence modes), and times
    the off-policy sequence mask."""
    options = dict(reward_funcs=[length_reward], beta=0.05, importance_sampling_level=sampling_level,
                   loss_type=loss_type, num_iterations=2, use_bias_correction_kl=True,
                   off_policy_mask_threshold=threshold)
    ours = make(tmp_path / "ours", level=level, **options)
    theirs = make(tmp_path / "theirs", trl.GRPOTrainer, **options)
    inputs = batch_inputs(ours)
    perturb(ours.model)                 # off the rollout policy: some sequences are masked
    perturb(theirs.model)
    for trainer in (ours, theirs):      # as after generation with vLLM (not installed here: set, not constructed)
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.current_gradient_accumulation_steps = 1
    rows, length = inputs["completion_ids"].shape
    generator = torch.Generator().manual_seed(2)
    shape = (rows, length) if ratio_shape == "token" else (rows, 1)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=generator)
    if ratio_shape == "token":          # TRL's ratio is 1 on padding (its log-prob difference is masked first)
        inputs["importance_sampling_ratio"][inputs["completion_mask"] == 0] = 1.0
    our_loss, our_grad, their_loss, their_grad = losses_and_head_gradients(ours, theirs, inputs)
    assert_relative_close(our_loss, their_loss, 1e-5, "loss")
    assert_relative_close(our_grad, their_grad, 1e-4, "gradient of the LM head")
    if threshold is not None:           # the mask matters: TRL's loss changes without it
        theirs.off_policy_mask_threshold = None
        assert (theirs._compute_loss(theirs.model, inputs) - their_loss).abs() > 1e-4
    inputs["importance_sampling_ratio"] = torch.ones(shape)     # the ratio matters: the loss changes without it
    assert (ours._compute_loss(ours.model, inputs) - our_loss).abs() > 1e-4


@pytest.mark.parametrize("level,sampling_level,loss_type,masks", [
    ("token", "token", "grpo", dict(top_entropy_quantile=0.3)),
    ("output", "sequence", "grpo", dict(off_policy_mask_threshold=0.02)),
    ("output", "sequence", "grpo", dict(off_policy_mask_threshold=0.02, top_entropy_quantile=0.5)),
    ("token", "token", "grpo", dict(off_policy_mask_threshold=0.02, top_entropy_quantile=0.5)),  # per sequence,
    ("token", "token", "sapo", dict(off_policy_mask_threshold=0.02)),                              # as TRL's
    ("token", "token", "vespo", dict(off_policy_mask_threshold=0.02, top_entropy_quantile=0.5))])
def test_masks_reproduce_trl(tmp_path, level, sampling_level, loss_type, masks):
    """TRL's top-entropy token mask and DeepSeek-V3.2's off-policy sequence mask (from the rollout log-probs)."""
    options = dict(reward_funcs=[length_reward], beta=0.05, importance_sampling_level=sampling_level,
                   loss_type=loss_type, num_iterations=2, **masks)
    ours = make(tmp_path / "ours", level=level, **options)
    theirs = make(tmp_path / "theirs", trl.GRPOTrainer, **options)
    inputs = batch_inputs(ours)
    perturb(ours.model)
    perturb(theirs.model)
    rows = len(inputs["advantages"])
    old = inputs["old_per_token_logps"]         # the rollout engine off by a per-answer and a per-token amount:
    noise = 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))   # a mask per token would
    inputs["sampling_per_token_logps"] = old + torch.tensor(                            # differ from TRL's
        [0.3, -0.2, 0.1, 0.0]).repeat(rows // 4)[:, None] + noise
    for trainer in (ours, theirs):
        trainer.current_gradient_accumulation_steps = 1
    our_loss, our_grad, their_loss, their_grad = losses_and_head_gradients(ours, theirs, inputs)
    assert_relative_close(our_loss, their_loss, 1e-5, "loss")
    assert_relative_close(our_grad, their_grad, 1e-4, "gradient of the LM head")
    if "off_policy_mask_threshold" in masks:        # the mask matters: TRL's loss changes without it
        theirs.off_policy_mask_threshold = None
        assert (theirs._compute_loss(theirs.model, inputs) - their_loss).abs() > 1e-4


def test_a_head_that_does_not_read_the_last_hidden_state_is_refused(tmp_path):
    trainer = make(tmp_path, reward_funcs=[length_reward], level="token")
    trainer.model.get_output_embeddings().register_forward_hook(lambda module, args, output: 2 * output)
    with pytest.raises(NotImplementedError, match="not the input of its LM head"):
        trainer._compute_loss(trainer.model, batch_inputs(trainer))


def test_trl_default_config_is_taken_as_it_is(tmp_path):
    """GRPOConfig's loss defaults (loss_type="dapo", use_bias_correction_kl=True, the vLLM correction switch on,
    top_entropy_quantile=1) construct and train without a refusal."""
    default = {name: field.default for name, field in trl.GRPOConfig.__dataclass_fields__.items()}
    assert default["loss_type"] == "dapo" and default["use_bias_correction_kl"]
    assert default["vllm_importance_sampling_correction"] and default["top_entropy_quantile"] == 1.0
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, max_steps=1,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                          save_strategy="no", beta=0.04)                 # beta > 0 with TRL's KL correction
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=32, layers=1, heads=2)
    model.save_pretrained(tmp_path / "initial")
    model.config._name_or_path = str(tmp_path / "initial")
    trainer = SentenceGRPOTrainer(model, args=args, train_dataset=dataset(), processing_class=tokenizer,
                                  reward_funcs=[length_reward], level="token")
    assert math.isfinite(trainer.train().training_loss)


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sentence_reward"):
        make(tmp_path, reward_funcs=[length_reward])                       # level="sentence" without one
    with pytest.raises(ValueError, match="level"):
        make(tmp_path, reward_funcs=[length_reward], level="paragraph")
    with pytest.raises(TypeError, match="trl_metrics"):
        make(tmp_path, reward_funcs=[length_reward], level="token", trl_metrics="yes")
    with pytest.raises(ValueError, match="not both"):
        make(tmp_path, reward_funcs=[length_reward], sentence_reward=arith.reward(), level="output")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_rank_worker(rank, port, tmp_path, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        from sgrpo_kernels.advantages import group_sentence_advantages
        from sgrpo_kernels.distributed import gather_rows
        scored = {}

        def recorded_reward(questions, answers, references):
            rewards = noisy_sentence_reward(questions, answers, references)
            scored["rewards"] = torch.tensor([row + [0.0] * (20 - len(row)) for row in rewards])
            scored["counts"] = torch.tensor([len(row) for row in rewards])
            return rewards

        trainer = make(tmp_path / f"rank{rank}", sentence_reward=recorded_reward, num_generations=8)
        assert trainer.accelerator.num_processes == 2 and torch.distributed.is_initialized()
        # one group of 8 answers to the same prompt, 4 on each rank: its statistics need both ranks' rewards
        inputs = trainer._generate_and_score_completions([trainer.train_dataset[0]] * 4)
        rewards, offset = gather_rows(scored["rewards"], torch.distributed.group.WORLD)
        counts, _ = gather_rows(scored["counts"], torch.distributed.group.WORLD)
        expected = group_sentence_advantages(rewards, counts, group_size=8)[offset:offset + 4]
        width = inputs["advantages"].shape[1]
        assert expected[:, width:].abs().sum() == 0
        torch.testing.assert_close(inputs["advantages"], expected[:, :width], rtol=1e-6, atol=1e-7)
        assert trainer.state.global_step == 0 and inputs["advantages"].abs().sum() > 0

        result = trainer.train()
        assert math.isfinite(result.training_loss)
        flat = torch.cat([parameter.detach().reshape(-1) for parameter in trainer.model.parameters()])
        copies, _ = gather_rows(flat[None], torch.distributed.group.WORLD)
        assert torch.equal(copies[0], copies[1]), "the replicas drifted apart: gradients were not averaged"
    except BaseException:                                    # report to the parent instead of hanging it
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    leave_worker()


def test_two_processes_share_groups_across_ranks(tmp_path):
    """`accelerate`-style launch on 2 CPU processes (gloo): a group of 8 answers spread 4 + 4 over the ranks gets
    the advantages of the whole group, and training keeps the replicas identical."""
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_two_rank_worker, args=(_free_port(), tmp_path, errors), nprocs=2, join=True)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
