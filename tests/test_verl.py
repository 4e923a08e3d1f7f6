"""The verl integration against verl's own code (verl 0.9.1, installed by the Makefile): our registered
``"sentence_grpo"`` policy loss through verl's real ``ppo_loss`` with a real ``TensorDict`` batch equals verl's
``vanilla``/``gspo``/``cispo``/``sapo``/``geo_mean`` at the token (or output) level for every ``loss_agg_mode``;
our estimator equals verl's ``grpo`` at one sentence per answer; two gloo processes with verl's
``global_batch_info`` give the one-process gradient."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("verl", reason="verl is not installed (the Makefile installs it: see README, 'verl')")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils import losses  # noqa: E402

import sgrpo_kernels as sk  # noqa: E402
from sgrpo_kernels.integrations import verl as sgrpo_verl  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
# verl loss -> our level at which it is reproduced
LEVEL_OF = {"vanilla": "token", "cispo": "token", "sapo": "token", "gspo": "output", "geo_mean": "output"}
PROMPT = 3


def actor_config(loss_mode, loss_agg_mode):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=loss_agg_mode,
                       tau_pos=1.0, tau_neg=1.05, policy_loss=PolicyLossConfig(loss_mode=loss_mode))


def make_batch(loss, seed=0, batch=6, length=7, dtype=torch.float64):
    """Right-padded responses of random lengths (one empty), drifted log-probs with a few large moves (dual clip),
    advantages per token (``vanilla``/``cispo``/``sapo``) or per answer (``gspo``/``geo_mean``)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (batch,), generator=generator)
    lengths[2] = 0
    mask = torch.arange(length) < lengths.unsqueeze(1)
    old = -torch.rand(batch, length, generator=generator, dtype=dtype) * 3
    drift = torch.randn(batch, length, generator=generator, dtype=dtype) * 0.3
    drift[0, :2] = 1.5                                            # ρ ≈ 4.5 > clip_ratio_c
    if loss == "cispo":
        drift = drift.abs()                                       # verl's CISPO also clamps ρ below at 1 − ε_low
    if LEVEL_OF[loss] == "output":
        advantages = torch.randn(batch, 1, generator=generator, dtype=dtype).expand(batch, length).clone()
    else:
        advantages = torch.randn(batch, length, generator=generator, dtype=dtype)
    advantages[0] = -advantages[0].abs()
    is_weights = 0.5 + torch.rand(batch, length, generator=generator, dtype=dtype)
    if LEVEL_OF[loss] == "output":    # gspo: verl's stop-gradient form puts w_t on token t's gradient, ours the
        is_weights = is_weights[:, :1].expand(batch, length).clone()     # answer's mean weight: equal when constant
    if loss == "geo_mean":
        is_weights = None
    return dict(mask=mask, old=old, drift=drift, advantages=advantages * mask, is_weights=is_weights,
                responses=torch.randint(0, 50, (batch, length), generator=generator))


def tensordict_batch(case, rows=slice(None), **info):
    """The actor's batch as verl's engine hands it to ``ppo_loss``: prompt + response ids, masks, old log-probs,
    advantages, the rollout weights and the global batch info as non-tensor entries."""
    mask = case["mask"][rows]
    batch = mask.shape[0]
    fields = dict(prompts=torch.ones(batch, PROMPT, dtype=torch.long), responses=case["responses"][rows],
                  attention_mask=torch.cat([torch.ones(batch, PROMPT, dtype=torch.long), mask.long()], 1),
                  response_mask=mask.long(), old_log_probs=case["old"][rows], advantages=case["advantages"][rows])
    if case["is_weights"] is not None:
        fields["rollout_is_weights"] = case["is_weights"][rows]
    data = TensorDict(fields, batch_size=[batch])
    tu.assign_non_tensor(data, **({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None} | info))
    return data


def model_output(log_prob, mask):
    """verl's unpadded model output: per sequence ``PROMPT + n`` positions, the response's log-probs shifted left
    by one (position ``PROMPT - 1 + t`` predicts response token ``t``)."""
    pieces = []
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        pieces += [log_prob.new_zeros(PROMPT - 1), log_prob[row, :n], log_prob.new_zeros(1)]
    return {"log_probs": torch.cat(pieces)}


def verl_loss(case, loss_mode, loss_agg_mode, theta, rows=slice(None), **info):
    """``ppo_loss`` with ``log_prob = old + θ · drift`` (θ a shared parameter, as a model's weights are)."""
    log_prob = case["old"][rows] + theta * case["drift"][rows]
    data = tensordict_batch(case, rows, **info)
    return losses.ppo_loss(actor_config(loss_mode, loss_agg_mode), model_output(log_prob, case["mask"][rows]), data)


@pytest.fixture
def registered_as():
    """``register(loss=..., level=...)`` for one test; the wrappers removed after it."""
    undo = []

    def register(loss, level):
        undo.append(sgrpo_verl.register(loss=loss, level=level))
    yield register
    for function in undo:
        function()


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("loss", list(LEVEL_OF))
def test_registered_loss_equals_verl(loss, loss_agg_mode, registered_as):
    case = make_batch(loss)
    registered_as(loss, LEVEL_OF[loss])
    results = []
    for loss_mode in (loss, sgrpo_verl.NAME):
        theta = torch.ones(case["mask"].shape[1], dtype=torch.float64, requires_grad=True)
        value, metrics = verl_loss(case, loss_mode, loss_agg_mode, theta)
        value.backward()
        results.append((value.detach(), theta.grad, metrics))
    (theirs, their_grad, their_metrics), (ours, our_grad, our_metrics) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-9)
    assert their_grad.abs().sum() > 0
    assert set(their_metrics) <= set(our_metrics)
    kl = "actor/ppo_kl"
    assert float(our_metrics[kl].values[0]) == pytest.approx(float(their_metrics[kl].values[0]), rel=1e-9)


def test_dual_clip_acts_in_the_comparison(registered_as):
    """The vanilla case has tokens with Â < 0 and ρ > clip_ratio_c: without our dual clip the loss differs."""
    case = make_batch("vanilla")
    registered_as("vanilla", "token")
    theta = torch.ones(case["mask"].shape[1], dtype=torch.float64)
    with_dual, _ = verl_loss(case, sgrpo_verl.NAME, "token-mean", theta)
    sgrpo_verl._settings.loss_options["clip_ratio_c"] = None
    without_dual, _ = verl_loss(case, sgrpo_verl.NAME, "token-mean", theta)
    assert not torch.isclose(with_dual, without_dual)


def test_sentence_level_uses_the_batch_sentence_ids(registered_as):
    """At ``level="sentence"`` the loss reads ``sentence_ids`` from the batch: it equals
    ``sentence_grpo_loss_from_logps`` with those sentences and each sentence's mean advantage."""
    case = make_batch("vanilla")
    registered_as("vanilla", "sentence")
    ids = torch.where(case["mask"], torch.arange(7) // 3, -1)
    data = tensordict_batch(case)
    data["sentence_ids"] = ids
    log_prob = (case["old"] + case["drift"]).requires_grad_()
    ours, _ = losses.ppo_loss(actor_config(sgrpo_verl.NAME, "token-mean"), model_output(log_prob, case["mask"]), data)
    sentence_advantages = sgrpo_verl._sentence_values(case["advantages"], ids, 3, "mean")
    config = sk.config.LossConfig(eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0, reduction="token_mean")
    expected = sk.reference.sentence_grpo_loss_from_logps(log_prob, ids, sentence_advantages, case["old"],
                                                          config=config, is_weights=case["is_weights"])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    data = tensordict_batch(case)                                 # no sentence_ids: a clear error
    with pytest.raises(ValueError, match="sentence_ids"):
        losses.ppo_loss(actor_config(sgrpo_verl.NAME, "token-mean"), model_output(log_prob, case["mask"]), data)


def test_estimator_equals_verl_grpo_at_one_sentence_per_answer(registered_as):
    registered_as("vanilla", "output")
    generator = torch.Generator().manual_seed(5)
    batch, length = 12, 6
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), lengths - 1] = torch.rand(batch, generator=generator)
    index = np.array(["a", "b", "a", "c", "b", "a", "c", "d", "d", "b", "a", "c"], dtype=object)   # sizes 4, 3, 3, 2
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    ours, returns = core_algos.get_adv_estimator_fn(sgrpo_verl.NAME)(token_level_rewards=rewards, response_mask=mask,
                                                                     index=index, config=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours, returns) and ours.abs().sum() > 0


def test_estimator_through_compute_advantage_at_sentence_level(registered_as):
    """verl's ``compute_advantage`` (wrapped by ``register()``) hands the batch's ``sentence_ids`` to the estimator:
    each token gets its sentence's group-normalised reward (rewards on the sentences' last tokens)."""
    registered_as("vanilla", "sentence")
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer  # the module attribute, which verl's trainer itself looks up
    ids = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 2, 2], [0, 0, 0, -1, -1], [0, 1, 2, 3, -1]])
    sentence_rewards = torch.tensor([[1.0, 0.0, 0, 0], [0.5, 0.25, 1.0, 0], [0.0, 0, 0, 0], [1.0, 1.0, 0.0, 0.5]])
    rewards = sgrpo_verl.sentence_token_rewards(ids, sentence_rewards)
    assert rewards[1].tolist() == [0.5, 0.0, 0.25, 0.0, 1.0] and rewards[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    data = DataProto.from_dict(tensors=dict(token_level_rewards=rewards, response_mask=(ids >= 0).long(),
                                            responses=torch.zeros(4, 5, dtype=torch.long), sentence_ids=ids),
                               non_tensors=dict(uid=np.array(["p", "q", "q", "p"], dtype=object)))
    data = ray_trainer.compute_advantage(data, adv_estimator=sgrpo_verl.NAME, config=None)
    counts = torch.tensor([2, 3, 1, 4])
    expected = torch.zeros(4, 4)
    for rows in ([0, 3], [1, 2]):
        expected[rows] = sk.group_sentence_advantages(sentence_rewards[rows], counts[rows], 2, eps=1e-6,
                                                      scale="unbiased_std")
    for row in range(4):
        for t in range(5):
            wanted = 0.0 if ids[row, t] < 0 else float(expected[row, ids[row, t]])
            assert float(data.batch["advantages"][row, t]) == pytest.approx(wanted, abs=1e-6)


def test_register_is_undone_and_sgrpo_does_not_import_verl():
    original = losses.ppo_loss
    with sgrpo_verl.registered(loss="gspo", level="output"):
        assert losses.ppo_loss is not original and losses.ppo_loss.__wrapped__ is original
        assert core_algos.get_policy_loss_fn(sgrpo_verl.NAME) is sgrpo_verl.policy_loss
    assert losses.ppo_loss is original
    with pytest.raises(ValueError, match="loss must be one of"):
        sgrpo_verl.register(loss="dro")
    with pytest.raises(ValueError, match="from verl's config"):
        sgrpo_verl.register(eps_high=0.3)
    script = "import sys, sgrpo_kernels; print(sorted({'verl', 'ray', 'tensordict'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def check_two_ranks_equal_one_process(rank):
    """Each rank holds half the answers; verl's global batch info (dp_size 2, the global token and answer counts)
    makes the averaged gradient of the shared θ equal the one-process gradient, for every aggregation."""
    sgrpo_verl.register(loss="vanilla", level="token")
    case = make_batch("vanilla", batch=8)
    mask = case["mask"]
    rows = slice(4 * rank, 4 * rank + 4)
    global_info = dict(batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(1).sum()))
    for mode in AGG_MODES:
        theta = torch.ones(mask.shape[1], dtype=torch.float64, requires_grad=True)
        verl_loss(case, sgrpo_verl.NAME, mode, theta)[0].backward()
        whole = theta.grad.clone()
        theta.grad = None
        verl_loss(case, sgrpo_verl.NAME, mode, theta, rows, dp_size=2, **global_info)[0].backward()
        dist.all_reduce(theta.grad)
        torch.testing.assert_close(theta.grad / 2, whole, rtol=1e-10, atol=1e-12)


def test_two_gloo_ranks_with_global_batch_info(tmp_path):
    from test_distributed import run_on_two_ranks
    run_on_two_ranks(check_two_ranks_equal_one_process, tmp_path)


def test_example_plugin_registers_in_every_verl_process(tmp_path):
    """``examples/verl/sgrpo_verl_plugin.py`` loads through verl's own ``VERL_USE_EXTERNAL_MODULES`` hook (at
    ``import verl``, as in every Ray worker), registers both functions, and its reward manager turns a batch into
    dense sentence rewards and ``sentence_ids``; ``SGRPO_STEP_SCORER`` (or the manager's ``step_scorer``) adds a
    local process reward model (or verifier) as a term."""
    import os
    from pathlib import Path

    from cases import train_byte_level_bpe

    from sgrpo_kernels.trainer.tiny import char_tokenizer, save_pretrained, tiny_model

    tokenizer = train_byte_level_bpe(["Let x = 2. Then x + 3 = 5. Answer: 5", "We add 2 and 3. So 5."], 290)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    scorer_tokenizer = char_tokenizer()
    save_pretrained(tiny_model(scorer_tokenizer, hidden_size=32, layers=1, heads=2), scorer_tokenizer,
                    str(tmp_path / "scorer"))
    examples = Path(__file__).resolve().parent.parent / "examples" / "verl"
    script = """
import numpy as np, torch, verl
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.workers.reward_manager import get_reward_manager_cls
from transformers import AutoTokenizer
assert "sentence_grpo" in core_algos.POLICY_LOSS_REGISTRY and "sentence_grpo" in core_algos.ADV_ESTIMATOR_REGISTRY
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
rows = [tokenizer.encode(text) for text in ("Let x = 2. Then x + 3 = 5. Answer: 5", "We add 2 and 3. So 5.")]
length = max(map(len, rows))
responses = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
response_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
data = DataProto.from_dict(
    tensors=dict(prompts=torch.tensor([[7, 8], [7, 8]]), responses=responses,
                 attention_mask=torch.cat([torch.ones(2, 2, dtype=torch.long), response_mask], 1)),
    non_tensors=dict(reward_model=np.array([{"ground_truth": "5"}, {"ground_truth": "5"}], dtype=object)))
manager = get_reward_manager_cls("sentence")()
assert manager.reward.weights == {"correct": 0.4, "format": 0.1, "prm": 0.5}, manager.reward.weights
rewards = manager(data)
ids = data.batch["sentence_ids"]
assert rewards.shape == responses.shape and int(ids.max()) >= 1, (rewards, ids)
assert ((rewards != 0) <= (ids >= 0)).all()
prm = manager.reward.breakdown["prm"]
assert prm.shape == (2, int(ids.max()) + 1) and ((prm > 0) & (prm < 1)).sum() == int((ids.amax(1) + 1).sum())
assert set(get_reward_manager_cls("sentence")(step_scorer="").reward.components) == {"correct", "format"}
verifier = get_reward_manager_cls("sentence")(step_scorer="verifier=SCORER,yes=Yes,no=No").reward
assert set(verifier.components) == {"correct", "format", "verifier"}
print("ok", int(ids.max()) + 1)
""".replace("TOKENIZER", repr(str(tmp_path / "tokenizer"))).replace("SCORER", str(tmp_path / "scorer"))
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="sgrpo_verl_plugin", SGRPO_TOKENIZER=str(tmp_path / "tokenizer"),
               SGRPO_STEP_SCORER=f"prm={tmp_path / 'scorer'},step_tag=?,weight=0.5",
               PYTHONPATH=os.pathsep.join([str(examples), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


def test_fused_forward_equals_verl_fused_kernels(registered_as):
    """``fused_kernels_backend="sgrpo"`` through verl's own ``apply_monkey_patch``: a tiny Qwen2's log-probs,
    entropies and gradients equal those of verl's ``use_fused_kernels`` torch backend (and its plain logits)."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers import monkey_patch

    registered_as("vanilla", "token")
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference_model = transformers.Qwen2ForCausalLM(config).double()
    plain_forward = transformers.Qwen2ForCausalLM.forward
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    results = {}
    try:
        for backend in ("torch", "sgrpo"):
            model = transformers.Qwen2ForCausalLM(config).double()
            model.load_state_dict(reference_model.state_dict())
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
            output = model(input_ids=input_ids, return_dict=True, temperature=0.7)
            (output.log_probs.sum() + 0.3 * output.entropy.sum()).backward()
            results[backend] = (output.log_probs.detach(), output.entropy.detach(), model.lm_head.weight.grad,
                                model.model.layers[0].mlp.up_proj.weight.grad)
            transformers.Qwen2ForCausalLM.forward = plain_forward
    finally:
        transformers.Qwen2ForCausalLM.forward = plain_forward
    for theirs, ours in zip(results["torch"], results["sgrpo"], strict=True):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6)
    logits = reference_model(input_ids=input_ids).logits.double() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.roll(input_ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(results["sgrpo"][0].double(), expected, rtol=1e-6, atol=1e-6)


def actor_micro_batch(case, temperature):
    """verl's engine micro-batch for the model forward: nested (jagged) prompt + response ids and positions."""
    mask = case["mask"]
    rows = [torch.cat([torch.full((PROMPT,), 7), case["responses"][row, :int(mask[row].sum())]])
            for row in range(mask.shape[0])]
    input_ids = torch.nested.nested_tensor(rows, layout=torch.jagged)
    position_ids = torch.nested.nested_tensor([torch.arange(len(row)) for row in rows], layout=torch.jagged)
    data = TensorDict(dict(input_ids=input_ids, position_ids=position_ids), batch_size=[mask.shape[0]])
    tu.assign_non_tensor(data, temperature=temperature, use_remove_padding=True, use_fused_kernels=True,
                         calculate_entropy=True)
    return data


def actor_forward(model, micro_batch, sp_size):
    """verl 0.9.1's actor forward with ``use_remove_padding=True`` and ``ulysses_sequence_parallel_size=sp_size``:
    its own ``FSDPEngineWithLMHead.prepare_model_inputs`` (pack, roll, pad and slice for Ulysses), the model, and
    its ``prepare_model_outputs`` (gather over the sequence-parallel group, unpad, nest), on an engine stand-in
    that carries only what those two methods read."""
    from types import SimpleNamespace

    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = SimpleNamespace(use_ulysses_sp=sp_size > 1, ulysses_sequence_parallel_size=sp_size, module=model,
                             pad_to_length=False)
    engine._get_packed_pad_size = lambda length: 0
    engine._gather_and_unpad_packed = lambda tensor, pad: FSDPEngineWithLMHead._gather_and_unpad_packed(
        engine, tensor, pad)
    inputs, output_args = FSDPEngineWithLMHead.prepare_model_inputs(engine, micro_batch)
    output = model(**inputs)
    return FSDPEngineWithLMHead.prepare_model_outputs(engine, output, output_args, micro_batch, None)


def position_wise_qwen2(seed=0):
    """A Qwen2 without decoder layers (embedding, norm, head): every position depends only on its own token, so a
    sequence split over ranks without Ulysses' attention exchange gives the one-process hidden states exactly."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=0,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).double()


def check_ulysses_actor_path(rank):
    """Two gloo ranks as one Ulysses group: verl's remove-padding actor forward with the ``sgrpo`` fused forward,
    then ``ppo_loss`` with the registered sentence loss, equal one process (sp = 1) and verl's own fused torch
    backend; the parameter gradients averaged over the two ranks (as FSDP does over dp × sp) are the one-process
    ones."""
    from verl.models.transformers import monkey_patch
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    transformers = pytest.importorskip("transformers")
    plain_forward = transformers.Qwen2ForCausalLM.forward
    case = make_batch("vanilla", seed=3)
    sentences = torch.where(case["mask"], torch.arange(case["mask"].shape[1]) // 3, -1)
    undo = sgrpo_verl.register(loss="vanilla", level="sentence")
    results = {}
    try:
        for backend, sp_size in (("sgrpo", 1), ("sgrpo", 2), ("torch", 2)):
            model = position_wise_qwen2()
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
            set_ulysses_sequence_parallel_group(dist.group.WORLD if sp_size > 1 else None)
            output = actor_forward(model, actor_micro_batch(case, temperature=0.7), sp_size)
            data = tensordict_batch(case)
            data[sgrpo_verl.SENTENCE_IDS] = sentences
            loss, _ = losses.ppo_loss(actor_config(sgrpo_verl.NAME, "seq-mean-token-mean"), output, data)
            loss.backward()
            grads = [parameter.grad.clone() for parameter in model.parameters()]
            if sp_size > 1:
                for grad in grads:
                    dist.all_reduce(grad)
                    grad /= sp_size
            results[backend, sp_size] = (loss.detach(), output["entropy"].values().detach(), grads)
            transformers.Qwen2ForCausalLM.forward = plain_forward
    finally:
        transformers.Qwen2ForCausalLM.forward = plain_forward
        set_ulysses_sequence_parallel_group(None)
        undo()
    whole = results["sgrpo", 1]
    assert whole[2][0].abs().sum() > 0
    # verl's fused torch backend returns fp32 log-probs: its comparison holds to fp32 accuracy
    for key, rtol in ((("sgrpo", 2), 1e-10), (("torch", 2), 1e-5)):
        loss, entropy, grads = results[key]
        torch.testing.assert_close(loss.double(), whole[0], rtol=rtol, atol=rtol * 1e-2)
        torch.testing.assert_close(entropy.double(), whole[1], rtol=rtol, atol=rtol * 1e-2)
        for got, want in zip(grads, whole[2], strict=True):
            torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=rtol * 1e-2)


def test_remove_padding_and_ulysses_actor_path(tmp_path):
    from test_distributed import run_on_two_ranks
    run_on_two_ranks(check_ulysses_actor_path, tmp_path)
