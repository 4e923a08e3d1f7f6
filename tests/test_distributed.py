"""Two CPU processes (gloo) each holding half of a global batch give the single-process loss and gradients."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
from cases import native_unavailable, random_case, rank_only, run_on_ranks

import sgrpo_kernels as sk
from sgrpo_kernels.integrations.hf import output_projection

WORLD = 2
BACKENDS = (["reference", "torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
            + (["native"] if native_unavailable() is None else []))


def run_on_two_ranks(test, tmp_path):
    """``test(rank)`` on two gloo processes."""
    run_on_ranks(functools.partial(rank_only, test), tmp_path, WORLD)


def global_case():
    """Six rows; rank 0 gets rows 0-2, rank 1 rows 3-5 (different lengths, an empty row on rank 1)."""
    return random_case(batch=6, length=7, vocab=64, num_slots=4, dtype=torch.float64, seed=17, old_spread=0.3)


def split(case, rank):
    rows = slice(3 * rank, 3 * rank + 3)
    return {key: value[rows].detach().clone() if isinstance(value, torch.Tensor) else value
            for key, value in case.items()}


def check_loss_and_gradients(rank):
    for backend in BACKENDS:
        for reduction, extra in (("sentence_mean", {}), ("token_mean", {}), ("sum", {}),
                                 ("answer_mean_token_sum", dict(entropy_coef=0.05, objective="sapo")),
                                 ("token_mean", dict(objective="cispo", eps_high=1.3, kl_importance_weighting=True)),
                                 ("answer_mean_sentence_sum", dict(objective="geo_mean", ratio_level="mean")),
                                 ("token_mean", dict(objective="vespo"))):
            options = dict(beta=0.1, reduction=reduction, backend=backend, **extra)
            case = global_case()
            whole = dict(case, logits=case["logits"].detach().clone().requires_grad_())
            expected = sk.sentence_grpo_loss(*whole.values(), **options)
            expected.backward()
            mine = split(case, rank)
            mine["logits"].requires_grad_()
            loss = sk.sentence_grpo_loss(*mine.values(), **options, process_group=dist.group.WORLD)
            loss.backward()
            # the mean of the rank losses is the global loss ...
            total = loss.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / WORLD, expected.detach(), rtol=1e-10, atol=1e-12)
            # ... and this rank's gradient, averaged as DDP does (÷ W), is the global gradient of its rows
            torch.testing.assert_close(mine["logits"].grad / WORLD, whole["logits"].grad[3 * rank:3 * rank + 3],
                                       rtol=1e-9, atol=1e-12)


def check_group_advantages_across_ranks(rank):
    generator = torch.Generator().manual_seed(5)
    rewards = torch.rand(12, 5, generator=generator, dtype=torch.float64)
    counts = torch.randint(0, 6, (12,), generator=generator)
    expected = sk.group_sentence_advantages(rewards, counts, group_size=4, mode="cumulative")
    # rank 0 holds rows 0-5, rank 1 rows 6-11: the group of rows 4-7 straddles the two ranks
    rows = slice(6 * rank, 6 * rank + 6)
    mine = sk.group_sentence_advantages(rewards[rows], counts[rows], group_size=4, mode="cumulative",
                                        process_group=dist.group.WORLD)
    torch.testing.assert_close(mine, expected[rows], rtol=1e-12, atol=1e-12)


class Policy(torch.nn.Module):
    """A projection and an LM head; its forward returns the fused linear loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8, dtype=torch.float64)
        self.head = torch.nn.Parameter(torch.randn(64, 8, dtype=torch.float64) * 0.5)

    def forward(self, inputs, completion_ids, segment_ids, advantages, old_logps, ref_logps, process_group=None):
        return sk.fused_linear_sentence_grpo_loss(self.body(inputs), self.head, completion_ids, segment_ids,
                                                  advantages, old_logps, ref_logps, beta=0.1, backend="torch",
                                                  chunk_size=5, process_group=process_group)


def check_ddp_training_step(rank):
    """Under DistributedDataParallel the averaged parameter gradients equal the single-process ones."""
    case = global_case()
    inputs = torch.randn(6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rest = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    single = Policy()
    single(inputs, *rest).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(Policy())
    rows = slice(3 * rank, 3 * rank + 3)
    loss = ddp(inputs[rows], *(tensor[rows] for tensor in rest), process_group=dist.group.WORLD)
    loss.backward()                                           # DDP averages the gradients over the two ranks
    for (name, got), want in zip(ddp.module.named_parameters(), single.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12, msg=name)


class BodyAndHead(torch.nn.Module):
    """A Hugging Face-like layout: forward returns hidden states, the LM head is a separate Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, 64, bias=False, dtype=torch.float64)

    def forward(self, inputs):
        return self.body(inputs).clone()

    def get_output_embeddings(self):
        return self.head


def check_fsdp2_training_step(rank):
    """FSDP2 (fully_shard on the body, then on the root): the root keeps its parameters, the head included,
    unsharded from its forward to its backward, so the loss can read ``model.head.weight`` after the forward,
    as SentenceGRPOTrainer does; the reduce-scattered gradients equal the single-process ones."""
    from torch.distributed.fsdp import fully_shard
    case = global_case()
    inputs = torch.randn(6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rest = [case[key] for key in ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")]
    options = dict(beta=0.1, backend="torch", chunk_size=5)
    single = BodyAndHead()
    sk.fused_linear_sentence_grpo_loss(single(inputs), single.head.weight, *rest, **options).backward()
    model = BodyAndHead()
    fully_shard(model.body)
    fully_shard(model)
    rows = slice(3 * rank, 3 * rank + 3)
    with pytest.raises(RuntimeError, match="sharded"):        # before the forward FSDP2 holds only a shard
        output_projection(model)
    hidden = model(inputs[rows])
    weight, _ = output_projection(model)                      # the root keeps it unsharded until the backward
    loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, *(tensor[rows] for tensor in rest),
                                              **options, process_group=dist.group.WORLD)
    loss.backward()
    for (name, got), want in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(got.grad.full_tensor(), want.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("test", [check_loss_and_gradients, check_group_advantages_across_ranks,
                                  check_ddp_training_step, check_fsdp2_training_step])
def test_two_ranks_equal_one_process(test, tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    run_on_two_ranks(test, tmp_path)
