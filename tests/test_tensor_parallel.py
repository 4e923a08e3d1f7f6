"""Vocabulary-parallel (tensor-parallel) loss: 2 and 4 gloo processes, each holding a contiguous (uneven) slice of
the vocabulary, give the one-process loss, metrics and gradients, moving O(tokens) floats, never O(tokens·V)."""

import os

import pytest
import torch
import torch.distributed as dist
from cases import native_unavailable, random_case, run_on_ranks

import sgrpo_kernels as sk

BACKENDS = (["torch"] + (["native"] if native_unavailable() is None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
VOCAB = 29
SHARDS = {2: [13, 16], 4: [7, 7, 7, 8]}          # uneven, the last shard the largest
OPTION_SETS = [dict(beta=0.1), dict(beta=0.05, temperature=0.7, entropy_coef=0.03, reduction="token_mean"),
               dict(objective="geo_mean", ratio_level="mean", top_entropy_quantile=0.6),
               dict(objective="cispo", eps_high=1.3, kl_estimator="k2", beta=0.1, clip_ratio_c=None)]


def shard_range(rank, world):
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def option_sets_for(backend, world):
    return OPTION_SETS[:1] if backend == "triton" and world == 4 else OPTION_SETS     # the interpreter is slow


def check_logits_path(rank, world):
    start, stop = shard_range(rank, world)
    for backend in BACKENDS:
        for options in option_sets_for(backend, world):
            for inplace in (False, True):
                case = random_case(batch=3, length=6, vocab=VOCAB, num_slots=4, seed=5)
                arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps",
                                                   "ref_logps")]
                expected, expected_metrics = sk.sentence_grpo_loss(case["logits"], *arguments, backend=backend,
                                                                   return_metrics=True, **options)
                (expected_grad,) = torch.autograd.grad(expected, case["logits"])
                shard = case["logits"].detach()[..., start:stop].clone().requires_grad_()
                used = shard * 1.0 if inplace else shard        # in place: the gradient overwrites a non-leaf
                loss, metrics = sk.sentence_grpo_loss(used, *arguments, backend=backend, return_metrics=True,
                                                      inplace=inplace, tp_group=dist.group.WORLD, **options)
                loss.backward()
                torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
                for name, value in expected_metrics.items():
                    torch.testing.assert_close(metrics[name], value, rtol=1e-9, atol=1e-12,
                                               msg=f"{name}: {backend} {options} inplace={inplace}: "
                                                   f"{float(metrics[name])} vs {float(value)}")
                torch.testing.assert_close(shard.grad, expected_grad[..., start:stop], rtol=1e-9, atol=1e-12)
        # the loss and token_logprobs with entropy, in fp32 to 1e-5
        case = random_case(batch=3, length=6, vocab=VOCAB, num_slots=4, dtype=torch.float32, seed=7)
        arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
        expected = sk.sentence_grpo_loss(case["logits"], *arguments, backend=backend, beta=0.1)
        (expected_grad,) = torch.autograd.grad(expected, case["logits"])
        shard = case["logits"].detach()[..., start:stop].clone().requires_grad_()
        loss = sk.sentence_grpo_loss(shard, *arguments, backend=backend, beta=0.1, tp_group=dist.group.WORLD)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shard.grad, expected_grad[..., start:stop], rtol=1e-5, atol=1e-6)
        case = random_case(batch=2, length=5, vocab=VOCAB, dtype=torch.float32, seed=8)
        ids = case["completion_ids"].clamp(min=0)
        logp, entropy = sk.token_logprobs(case["logits"], ids, return_entropy=True, backend=backend)
        expected_grad = torch.autograd.grad(logp.sum() + 0.5 * entropy.sum(), case["logits"])[0]
        shard = case["logits"].detach()[..., start:stop].clone().requires_grad_()
        my_logp, my_entropy = sk.token_logprobs(shard, ids, return_entropy=True, backend=backend,
                                                tp_group=dist.group.WORLD)
        (my_logp.sum() + 0.5 * my_entropy.sum()).backward()
        torch.testing.assert_close(my_logp, logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(my_entropy, entropy.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shard.grad, expected_grad[..., start:stop], rtol=1e-5, atol=1e-6)


def check_fused_linear_path(rank, world):
    start, stop = shard_range(rank, world)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 6, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64) * 0.5
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64) * 0.1
    case = random_case(batch=3, length=6, vocab=VOCAB, num_slots=4, seed=6)
    arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    for backend in BACKENDS:
        for options in option_sets_for(backend, world)[:2]:
            leaves = [tensor.clone().requires_grad_() for tensor in (hidden, weight, bias)]
            expected = sk.fused_linear_sentence_grpo_loss(leaves[0], leaves[1], *arguments, bias=leaves[2],
                                                          backend=backend, chunk_size=5, **options)
            expected_grads = torch.autograd.grad(expected, leaves)
            for reduce_hidden in (True, False):
                mine = [hidden.clone().requires_grad_(), weight[start:stop].clone().requires_grad_(),
                        bias[start:stop].clone().requires_grad_()]
                loss = sk.fused_linear_sentence_grpo_loss(mine[0], mine[1], *arguments, bias=mine[2],
                                                          backend=backend, chunk_size=5, tp_group=dist.group.WORLD,
                                                          tp_reduce_hidden_grad=reduce_hidden, **options)
                loss.backward()
                torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(mine[1].grad, expected_grads[1][start:stop], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(mine[2].grad, expected_grads[2][start:stop], rtol=1e-9, atol=1e-12)
                hidden_grad = mine[0].grad.clone()
                if not reduce_hidden:                   # each rank its own part: the layer sums them exactly once
                    dist.all_reduce(hidden_grad)
                torch.testing.assert_close(hidden_grad, expected_grads[0], rtol=1e-9, atol=1e-12)
        # the log-probs from a sharded head
        logp, entropy = sk.fused_linear_token_logprobs(hidden, weight, case["completion_ids"].clamp(min=0),
                                                       return_entropy=True, backend=backend)
        mine = sk.fused_linear_token_logprobs(hidden, weight[start:stop], case["completion_ids"].clamp(min=0),
                                              return_entropy=True, backend=backend, tp_group=dist.group.WORLD)
        torch.testing.assert_close(mine[0], logp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mine[1], entropy, rtol=1e-10, atol=1e-12)


def check_with_data_parallel(rank, world):
    """2 × 2 (through ``SentenceGRPOLoss``): ranks {0, 1} and {2, 3} each split the vocabulary; ranks {0, 2} and
    {1, 3} each hold half the batch."""
    tp_rank, dp_rank = rank % 2, rank // 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    start, stop = shard_range(tp_rank, 2)
    case = random_case(batch=4, length=6, vocab=VOCAB, num_slots=4, seed=9)
    arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    expected = sk.sentence_grpo_loss(case["logits"], *arguments, backend="torch", beta=0.1, reduction="token_mean")
    (expected_grad,) = torch.autograd.grad(expected, case["logits"])
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)
    shard = case["logits"].detach()[rows, :, start:stop].clone().requires_grad_()
    module = sk.SentenceGRPOLoss(backend="torch", beta=0.1, reduction="token_mean", tp_group=tp_groups[dp_rank],
                                 process_group=dp_groups[tp_rank])
    loss = module(shard, *[argument[rows] for argument in arguments])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=dp_groups[tp_rank])
    torch.testing.assert_close(total / 2, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shard.grad / 2, expected_grad[rows, :, start:stop], rtol=1e-9, atol=1e-12)


def check_communication(rank, world):
    """Bytes through the collectives per call: at most 4 floats per token (max, then sum of 3), plus one int per
    rank for the shard sizes; nothing that grows with the vocabulary."""
    moved = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        moved.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)
    gathered = []
    original_gather = dist.all_gather

    def counting_gather(tensors, tensor, *args, **kwargs):
        gathered.append(tensor.numel() * tensor.element_size())
        return original_gather(tensors, tensor, *args, **kwargs)
    dist.all_reduce, dist.all_gather = counting, counting_gather
    try:
        start, stop = shard_range(rank, world)
        case = random_case(batch=3, length=6, vocab=VOCAB, num_slots=4, seed=5)
        tokens = 3 * 6
        arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
        shard = case["logits"].detach()[..., start:stop].clone().requires_grad_()
        sk.sentence_grpo_loss(shard, *arguments, backend="torch", beta=0.1, return_metrics=True,
                              tp_group=dist.group.WORLD)[0].backward()
        assert sum(moved) <= 4 * tokens * 8, moved       # fp64 accumulators; independent of V
        assert len(moved) == 2, moved                     # one max, one packed sum
        assert gathered == [8], gathered                  # the shard sizes: one int64 per rank, once per call
    finally:
        dist.all_reduce, dist.all_gather = original, original_gather


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", [check_logits_path, check_fused_linear_path])
def test_vocab_parallel_equals_one_process(check, world, tmp_path):
    run_on_ranks(check, tmp_path, world)


def test_tensor_times_data_parallel(tmp_path):
    run_on_ranks(check_with_data_parallel, tmp_path, 4)


def test_communication_is_per_token(tmp_path):
    run_on_ranks(check_communication, tmp_path, 2)


def test_reference_backend_and_bad_start_are_refused():
    case = random_case(batch=2, length=4, vocab=VOCAB, seed=1)
    arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages")]
    with pytest.raises(ValueError, match="vocab_start_index is the start"):
        sk.sentence_grpo_loss(case["logits"], *arguments, vocab_start_index=3)
    with pytest.raises(ValueError, match="reference backend needs the whole vocabulary"):
        sk.sentence_grpo_loss(case["logits"], *arguments, backend="reference", tp_group=object())


def check_megatron_column_parallel_head(rank, world):
    """Under megatron-core's own ``ColumnParallelLinear`` (``gather_output=False``: each rank's logits are its
    vocabulary slice; its copy-to-tensor-parallel region all-reduces the input gradient): the logits path, and the
    fused path with ``tp_reduce_hidden_grad=False`` behind Megatron's region, give the one-process gradients of the
    hidden states (summed exactly once) and of the head."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    width, vocab = 8, 32
    generator = torch.Generator().manual_seed(4)
    full_weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64) * 0.5
    hidden = torch.randn(3, 6, width, generator=generator, dtype=torch.float64)
    case = random_case(batch=3, length=6, vocab=vocab, num_slots=4, seed=12)
    arguments = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                 params_dtype=torch.float64, perform_initialization=False)
    layer = tensor_parallel.ColumnParallelLinear(width, vocab, config=config, init_method=lambda weight: None,
                                                 bias=False, gather_output=False)
    start, stop = rank * vocab // world, (rank + 1) * vocab // world
    assert layer.weight.shape == (stop - start, width)
    with torch.no_grad():
        layer.weight.copy_(full_weight[start:stop])
    whole = [hidden.clone().requires_grad_(), full_weight.clone().requires_grad_()]
    expected = sk.sentence_grpo_loss(whole[0] @ whole[1].T, *arguments, beta=0.1, backend="torch")
    expected_grads = torch.autograd.grad(expected, whole)
    for path in ("logits", "fused"):
        layer.weight.grad = None
        mine = hidden.clone().requires_grad_()
        if path == "logits":
            logits, _ = layer(mine)
            loss = sk.sentence_grpo_loss(logits, *arguments, beta=0.1, backend="torch", tp_group=group)
        else:
            region = tensor_parallel.copy_to_tensor_model_parallel_region(mine)
            loss = sk.fused_linear_sentence_grpo_loss(region, layer.weight, *arguments, beta=0.1, backend="torch",
                                                      tp_group=group, tp_reduce_hidden_grad=False)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mine.grad, expected_grads[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, expected_grads[1][start:stop], rtol=1e-9, atol=1e-12)
    parallel_state.destroy_model_parallel()


def test_under_megatron_column_parallel_linear(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the Makefile installs it)")
    run_on_ranks(check_megatron_column_parallel_head, tmp_path, 2)
