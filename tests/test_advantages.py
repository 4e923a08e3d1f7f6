"""Group-relative sentence advantages (``reference.group_sentence_advantages``), on every backend."""

import math

import pytest
import torch
from cases import KERNEL_DEVICE, native_unavailable

import sgrpo_kernels.advantages as advantages_module
from sgrpo_kernels import group_sentence_advantages

TESTED_DEVICE = {"device": torch.device("cpu"), "backend": "torch"}


def compute(rewards, num_sentences, group_size, **options):
    """group_sentence_advantages on the device and backend under test, result on the CPU."""
    device = TESTED_DEVICE["device"]
    options.setdefault("backend", TESTED_DEVICE["backend"])
    return group_sentence_advantages(rewards.to(device), num_sentences.to(device), group_size, **options).cpu()


@pytest.fixture(autouse=True, params=["triton", "torch", "native"])
def implementation(request, monkeypatch):
    """Run every test on the Triton kernel (CUDA, or interpreted on CPU), the PyTorch statement and the C++
    loop of the native backend."""
    if request.param == "native" and native_unavailable() is not None:
        pytest.skip(native_unavailable())
    monkeypatch.setitem(TESTED_DEVICE, "device", torch.device("cpu"))
    monkeypatch.setitem(TESTED_DEVICE, "backend", request.param)
    if request.param in ("triton", "native"):
        if request.param == "triton":
            pytest.importorskip("triton", reason="the Triton kernel needs triton")
            monkeypatch.setitem(TESTED_DEVICE, "device", KERNEL_DEVICE)

        def refuse(*args, **kwargs):
            raise AssertionError(f"the {request.param} kernel was expected to handle this case")
        monkeypatch.setattr(advantages_module.reference, "group_sentence_advantages", refuse)
    return request.param


def test_output_weighting_differs_from_sentence_weighting_by_hand():
    # Group of 2: output 0 has one sentence (r = 1), output 1 three sentences (r = 0, 0, 0).
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    num_sentences = torch.tensor([1, 3])
    # output weighting: μ = (1/2)(1 + 0) = 0.5; σ² = (1/2)(0.5² + (1/3)·3·0.5²) = 0.25 -> σ = 0.5
    by_output = compute(rewards, num_sentences, 2, eps=0.0 + 1e-12)
    expected = torch.tensor([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(by_output, expected, rtol=1e-9, atol=1e-9)
    # sentence weighting: μ = 1/4; σ² = (1/4)(0.75² + 3·0.25²) = 0.1875
    by_sentence = compute(rewards, num_sentences, 2, eps=1e-12, weighting="sentence")
    sigma = math.sqrt(0.1875)
    expected = torch.tensor([[0.75 / sigma, 0, 0], [-0.25 / sigma] * 3], dtype=torch.float64)
    torch.testing.assert_close(by_sentence, expected, rtol=1e-9, atol=1e-9)
    assert (by_output - by_sentence).abs().max() > 0.5


def test_cumulative_mode_by_hand():
    # Group of 2, scale="none", sentence weighting: μ = (1 + 0 + 1 + 0 + 0 + 0) / 6 = 1/3
    # centred: (2/3, -1/3, 2/3) and (-1/3, -1/3, -1/3); cumulative sums from the right:
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    advantages = compute(rewards, torch.tensor([3, 3]), 2, weighting="sentence", scale="none",
                                           mode="cumulative")
    expected = torch.tensor([[1.0, 1 / 3, 2 / 3], [-1.0, -2 / 3, -1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)


def test_cumulative_mode_ignores_slots_past_the_last_sentence():
    rewards = torch.tensor([[1.0, 2.0, 50.0], [0.0, 7.0, 7.0]], dtype=torch.float64)
    advantages = compute(rewards, torch.tensor([2, 1]), 2, scale="none", mode="cumulative")
    # output weighting: μ = (1/2)((1 + 2)/2 + 0) = 0.75; row 0 centred (0.25, 1.25); row 1 (-0.75)
    expected = torch.tensor([[1.5, 1.25, 0.0], [-0.75, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["output", "sentence"])
def test_equal_rewards_give_zero_finite_advantages(weighting):
    rewards = torch.full((4, 3), 0.7)
    advantages = compute(rewards, torch.tensor([3, 1, 2, 3]), 4, weighting=weighting)
    assert torch.isfinite(advantages).all() and torch.count_nonzero(advantages) == 0


@pytest.mark.parametrize("answer_mix", [0.0, 0.5])
def test_group_where_no_output_has_a_sentence(answer_mix):
    rewards = torch.tensor([[0.2, 0.9], [0.5, 0.1], [math.nan, math.nan], [math.nan, math.nan]])
    advantages = compute(rewards, torch.tensor([2, 1, 0, 0]), 2, answer_mix=answer_mix)
    assert torch.isfinite(advantages).all()
    assert torch.count_nonzero(advantages[2:]) == 0
    assert torch.count_nonzero(advantages[:2]) == 3


def loop_advantages(rewards, num_sentences, group_size, eps, weighting, scale, mode, answer_mix=0.0,
                    baseline="pooled"):
    """Independent statement with Python loops over groups, pools, outputs and sentences."""
    result = torch.zeros_like(rewards)
    if baseline == "split_final":        # an answer's last sentence in one pool, its other sentences in the other
        pools = (lambda n: list(range(n - 1)), lambda n: [n - 1])
    else:
        pools = (lambda n: list(range(n)),)
    for start in range(0, rewards.shape[0], group_size):
        outputs = [(b, int(num_sentences[b])) for b in range(start, start + group_size) if num_sentences[b] > 0]
        if not outputs:
            continue
        # the answer level: each output's mean reward, normalised over the outputs (each weighing 1)
        answer_means = {b: sum(rewards[b, :n].tolist()) / n for b, n in outputs}
        answer_mean = sum(answer_means.values()) / len(outputs)
        answer_spread = sum((value - answer_mean) ** 2 for value in answer_means.values())
        answer_var = answer_spread / (max(len(outputs) - 1, 1) if scale == "unbiased_std" else len(outputs))
        answer_scale = math.sqrt(answer_var) + eps if scale != "none" else 1.0
        normalised = {b: [0.0] * n for b, n in outputs}
        for slots_of in pools:
            members = [(b, slots_of(n)) for b, n in outputs if slots_of(n)]
            if not members:
                continue
            if weighting == "output":
                count = len(members)
                mean = sum(sum(rewards[b, s].item() for s in slots) / len(slots) for b, slots in members) / count
                spread = sum(sum((rewards[b, s].item() - mean) ** 2 for s in slots) / len(slots)
                             for b, slots in members)
            else:
                values = [rewards[b, s].item() for b, slots in members for s in slots]
                count = len(values)
                mean = sum(values) / count
                spread = sum((r - mean) ** 2 for r in values)
            var = spread / (max(count - 1, 1) if scale == "unbiased_std" else count)
            for b, slots in members:
                for s in slots:
                    centred = rewards[b, s].item() - mean
                    normalised[b][s] = centred / (math.sqrt(var) + eps) if scale != "none" else centred
        for b, n in outputs:
            values = normalised[b]
            if mode == "cumulative":
                values = [sum(values[s:]) for s in range(n)]
            answer = (answer_means[b] - answer_mean) / answer_scale
            values = [(1 - answer_mix) * value + answer_mix * answer for value in values]
            result[b, :n] = torch.tensor(values, dtype=rewards.dtype)
    return result


@pytest.mark.parametrize("weighting", ["output", "sentence"])
@pytest.mark.parametrize("scale", ["std", "none", "unbiased_std"])
@pytest.mark.parametrize("mode", ["sentence", "cumulative"])
@pytest.mark.parametrize("answer_mix", [0.0, 0.35])
@pytest.mark.parametrize("baseline", ["pooled", "split_final"])
def test_random_groups_match_loop_statement(weighting, scale, mode, answer_mix, baseline):
    generator = torch.Generator().manual_seed(4)
    rewards = torch.rand(12, 7, generator=generator, dtype=torch.float64)
    num_sentences = torch.randint(0, 8, (12,), generator=generator)
    num_sentences[3:6] = 0                      # a group with no sentence at all
    num_sentences[7] = 0                        # and one output without a sentence in a group with others
    num_sentences[8] = 1                        # an output whose only sentence is its last
    advantages = compute(rewards, num_sentences, 3, eps=1e-4, weighting=weighting, scale=scale,
                         mode=mode, answer_mix=answer_mix, baseline=baseline)
    expected = loop_advantages(rewards, num_sentences, 3, 1e-4, weighting, scale, mode, answer_mix, baseline)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)


def test_answer_mix_by_hand():
    # Group of 2: output 0 rewards (1, 0), output 1 (0.5); eps tiny. Sentence level (output weighting): μ = 0.5,
    # σ² = (1/2)((0.25 + 0.25)/2 + 0) = 0.125. Answer level: means 0.5 and 0.5 -> both 0.
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    num_sentences = torch.tensor([2, 1])
    sigma = math.sqrt(0.125)
    sentence = torch.tensor([[0.5 / sigma, -0.5 / sigma], [0.0, 0.0]], dtype=torch.float64)
    for alpha in (0.0, 0.25, 1.0):
        mixed = compute(rewards, num_sentences, 2, eps=1e-12, answer_mix=alpha)
        torch.testing.assert_close(mixed, (1 - alpha) * sentence, rtol=1e-9, atol=1e-9)
    # answer means 1 and 0: the answer level is ±1, mixed into every sentence of the answer (and none past it)
    rewards = torch.tensor([[1.0, 1.0], [0.0, 7.0]], dtype=torch.float64)
    mixed = compute(rewards, torch.tensor([2, 1]), 2, eps=1e-12, answer_mix=0.5)
    # sentence level: μ = 0.5, σ = 0.5 -> (1, 1) and (-1); the answer level the same
    torch.testing.assert_close(mixed, torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_full_answer_mix_is_the_answer_advantage_broadcast(scale):
    """``answer_mix=1``: every sentence gets the normalised mean reward of its answer (the broadcast ablation)."""
    generator = torch.Generator().manual_seed(9)
    rewards = torch.rand(8, 5, generator=generator, dtype=torch.float64)
    num_sentences = torch.tensor([5, 1, 0, 3, 2, 2, 4, 5])
    exists = torch.arange(5) < num_sentences.unsqueeze(1)
    means = torch.where(exists, rewards, 0.0).sum(1) / num_sentences.clamp(min=1)
    answer = loop_advantages(means.unsqueeze(1), (num_sentences > 0).long(), 4, 1e-4, "output", scale, "sentence")
    mixed = compute(rewards, num_sentences, 4, scale=scale, answer_mix=1.0)
    torch.testing.assert_close(mixed, torch.where(exists, answer, 0.0), rtol=1e-12, atol=1e-12)


def test_split_final_baseline_by_hand():
    """Two answers whose steps are all right and whose answer lines are wrong (0) and right (1). Pooled (output
    weighting): μ = (3/4 + 1) / 2 = 7/8, so the wrong answer line gets a large negative advantage (−0.875 / σ) and
    every right step or line the same small positive one (0.125 / σ). Split: the answer lines are normalised
    against each other (±1), the steps against the steps (all equal: 0)."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    rewards[1, 2] = 1.0                                                   # answer 1: two steps, then its line
    num_sentences = torch.tensor([4, 3])
    split = compute(rewards, num_sentences, 2, eps=1e-12, baseline="split_final")
    torch.testing.assert_close(split, torch.tensor([[0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]],
                                                   dtype=torch.float64), rtol=1e-9, atol=1e-9)
    pooled = compute(rewards, num_sentences, 2, eps=1e-12)
    assert pooled[0, 3] < -1.5 and 0 < pooled[1, 2] < pooled[0, 0] + 1e-12 and pooled[0, 0] > 0
    one_sentence = torch.tensor([1, 1, 1, 1])                             # every sentence is a last one: no change
    rewards = torch.rand(4, 2, dtype=torch.float64)
    torch.testing.assert_close(compute(rewards, one_sentence, 2, baseline="split_final"),
                               compute(rewards, one_sentence, 2), rtol=1e-12, atol=1e-12)


def test_float32_rewards_stay_float32():
    advantages = compute(torch.rand(4, 3), torch.tensor([1, 2, 3, 3]), 2)
    assert advantages.dtype == torch.float32 and advantages.shape == (4, 3)


@pytest.mark.parametrize("group_size, num_slots", [(70, 5), (20, 40), (3, 1100)],
                         ids=["group-over-two-tiles", "wide-rows-two-tiles", "one-row-per-tile"])
@pytest.mark.parametrize("mode,baseline", [("sentence", "pooled"), ("cumulative", "pooled"),
                                           ("sentence", "split_final")])
def test_groups_larger_than_a_tile(group_size, num_slots, mode, baseline):
    generator = torch.Generator().manual_seed(group_size)
    batch = 2 * group_size
    rewards = torch.rand(batch, num_slots, generator=generator, dtype=torch.float64)
    num_sentences = torch.randint(0, num_slots + 1, (batch,), generator=generator, dtype=torch.int32)
    advantages = compute(rewards, num_sentences, group_size, mode=mode, answer_mix=0.6, baseline=baseline)
    expected = loop_advantages(rewards, num_sentences, group_size, 1e-4, "output", "std", mode, 0.6, baseline)
    torch.testing.assert_close(advantages, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rewards_are_normalised_in_float32(dtype):
    generator = torch.Generator().manual_seed(5)
    rewards = torch.rand(6, 4, generator=generator).to(dtype)
    num_sentences = torch.tensor([4, 2, 3, 1, 4, 4], dtype=torch.int16)
    advantages = compute(rewards, num_sentences, 3, answer_mix=0.5)
    expected = loop_advantages(rewards.double(), num_sentences, 3, 1e-4, "output", "std", "sentence", 0.5)
    assert advantages.dtype == dtype
    torch.testing.assert_close(advantages.double(), expected.to(dtype).double(), rtol=0, atol=0.02)
