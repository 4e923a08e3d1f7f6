"""Sequence parallelism (``sp_group``): 2 and 4 gloo ranks each hold a contiguous slice of one packed batch (uneven
split points, sentences and answers straddling ranks, an empty slice) and give the loss, the metrics and their
slice of the gradient of one process on the whole sequence; with a data-parallel ``process_group`` and a
vocabulary-parallel ``tp_group`` (2 × 2) too; what crosses ranks is O(sentences)."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
from cases import assert_relative_close, native_unavailable, run_on_ranks
from test_packed import packed_case, padded, run

import sgrpo_kernels as sk
from sgrpo_kernels.config import IS_MODES, KL_ESTIMATORS, OBJECTIVES, REDUCTIONS

BACKENDS = (["torch"] + (["native"] if native_unavailable() is None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
# split points of the 25 tokens of LENGTHS (5, 0, 1, 9, 3, 0, 7): inside sentences and answers, one slice empty
SPLITS = {2: (0, 11, 25), 4: (0, 3, 3, 17, 25)}


def sliced(values: dict, piece: slice) -> dict:
    """This rank's slice of every per-token tensor (advantages and cu_seqlens stay global)."""
    return {name: value if name in ("advantages", "cu_seqlens") else value[piece] for name, value in values.items()}


def objective_options(index: int, objective: str) -> dict:
    """A rotation of options that exercises every per-sentence and per-answer sum."""
    is_mode = "token_truncate" if objective == "vespo" else IS_MODES[(2 + index) % len(IS_MODES)]
    return dict(objective=objective, reduction=REDUCTIONS[index % len(REDUCTIONS)], beta=0.1,
                kl_estimator=KL_ESTIMATORS[index % len(KL_ESTIMATORS)], kl_importance_weighting=index % 2 == 0,
                ratio_level=("sum", "mean")[index % 2], eps_high=1.3 if objective == "cispo" else 0.2,
                entropy_coef=0.03 if index % 2 else 0.0, off_policy_mask_threshold=0.1 if index % 2 == 0 else None,
                is_mode=is_mode, is_clip_min=0.7, is_clip_max=1.6, keep=("sampling_logps",))


def assert_same(got, want, piece=slice(None), rel=1e-10):
    """(loss, gradients, metrics) of a rank against one process; the first gradient is sliced by ``piece``."""
    loss, grads, metrics = got
    gold_loss, gold_grads, gold_metrics = want
    assert_relative_close(loss, gold_loss, rel, "loss")
    assert set(metrics) == set(gold_metrics)
    for name, value in gold_metrics.items():
        assert_relative_close(metrics[name], value, rel, name)
    assert_relative_close(grads[0], gold_grads[0][piece], rel, "gradient of this rank's tokens")
    for got_grad, want_grad in zip(grads[1:], gold_grads[1:], strict=True):   # weight, bias: summed over ranks
        total = got_grad.clone()
        dist.all_reduce(total)
        assert_relative_close(total, want_grad, rel, "parameter gradient summed over the ranks")


def head(total: int, vocab: int, seed: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(total, 6, generator=generator, dtype=torch.float64),
            torch.randn(vocab, 6, generator=generator, dtype=torch.float64) * 0.5,
            torch.randn(vocab, generator=generator, dtype=torch.float64) * 0.1)


def check_slices_equal_one_process(rank, world, backends):
    splits = SPLITS[world]
    piece = slice(splits[rank], splits[rank + 1])
    tensors, extras = packed_case(seed=21)
    path = head(*tensors["logits"].shape)
    for backend in backends:
        for index, objective in enumerate(OBJECTIVES):
            options = objective_options(index, objective)
            whole = run(tensors, extras, backend, **options)
            mine = run(sliced(tensors, piece), sliced(extras, piece), backend, sp_group=dist.group.WORLD, **options)
            assert_same(mine, whole, piece)
            whole = run(tensors, extras, backend, path=path, **options)
            mine = run(sliced(tensors, piece), sliced(extras, piece), backend, sp_group=dist.group.WORLD,
                       path=(path[0][piece], *path[1:]), **options)
            assert_same(mine, whole, piece)
        whole = run(tensors, extras, backend, beta=0.1, reduction="answer_mean_token_sum")
        mine = run(sliced(tensors, piece), sliced(extras, piece), backend, inplace=True, sp_group=dist.group.WORLD,
                   beta=0.1, reduction="answer_mean_token_sum")
        assert_same(mine, whole, piece)


def test_two_ranks(tmp_path):
    run_on_ranks(functools.partial(check_slices_equal_one_process, backends=BACKENDS), tmp_path, 2)


def test_four_ranks_one_of_them_empty(tmp_path):
    run_on_ranks(functools.partial(check_slices_equal_one_process, backends=[b for b in BACKENDS if b != "triton"]),
                 tmp_path, 4)


class Traffic:
    """Counts the elements this rank sends through ``torch.distributed``'s collectives while active."""

    def __init__(self):
        self.elements, self.calls, self.saved = 0, 0, {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather"):
            original = self.saved[name] = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                tensor = args[1] if _name == "all_gather" else args[0]
                self.elements += tensor.numel()
                self.calls += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def check_traffic_is_per_sentence(rank, world):
    """Long sentences (the segment ids stop at 3: the last sentence of an answer takes its rest), every sum
    switched on; what a rank sends is bounded by the sentences and answers, not by the 1 601 tokens."""
    lengths = (400, 0, 1, 900, 300)
    tensors, extras = packed_case(lengths, vocab=7, num_slots=4, seed=5)
    cu = extras["cu_seqlens"]
    piece = slice(0, 650) if rank == 0 else slice(650, int(cu[-1]))      # inside the 900-token answer
    answer = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slots = int(torch.zeros(len(lengths), dtype=torch.int64).scatter_reduce(
        0, answer, tensors["segment_ids"] + 1, "amax").sum())
    path = head(*tensors["logits"].shape)
    for option_set in (dict(objective="cispo", eps_high=1.3, beta=0.1, entropy_coef=0.02, is_mode="sequence_mask",
                            off_policy_mask_threshold=0.1, keep=("sampling_logps",)),
                       dict(objective="geo_mean", beta=0.1, keep=("is_weights",)),
                       dict(objective="vespo", beta=0.1, is_mode="token_truncate", keep=("sampling_logps",))):
        for call_path in ("logits", (path[0][piece], *path[1:])):
            with Traffic() as traffic:
                run(sliced(tensors, piece), sliced(extras, piece), "torch", sp_group=dist.group.WORLD,
                    path=call_path, **option_set)
            # the gradient check's own all_reduce of weight/bias is outside; metrics add a few scalars
            bound = 8 * (slots + len(lengths)) + 2 * world + 16
            assert traffic.elements <= bound, (traffic.elements, bound, option_set)
            assert traffic.elements < int(cu[-1]) // 4
            assert traffic.calls <= 20


def test_traffic_is_per_sentence(tmp_path):
    run_on_ranks(check_traffic_is_per_sentence, tmp_path, 2)


def check_with_data_and_tensor_parallel(rank, world):
    """Four ranks: sequence parallel (2) × data parallel (2), then sequence parallel (2) × vocabulary parallel (2)."""
    sp_rank, other = rank % 2, rank // 2
    sequence_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    other_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    sp_group, other_group = sequence_groups[other], other_groups[sp_rank]
    tensors, extras = packed_case(seed=23)
    cu = extras["cu_seqlens"]
    options = dict(beta=0.1, entropy_coef=0.02, objective="sapo", reduction="answer_mean_sentence_sum")
    # sequence × data parallel: replica `other` holds answers 0-3 or 4-6, each split over its two sp ranks
    answers = (0, 4, 7)[other:other + 2]
    first, last = int(cu[answers[0]]), int(cu[answers[1]])
    replica = {name: value[answers[0]:answers[1]] if name == "advantages" else value[first:last]
               for name, value in tensors.items()}
    replica_extras = dict(cu_seqlens=cu[answers[0]:answers[1] + 1] - first)
    middle = (last - first) // 2 + 1              # inside a sentence of answer 3 or 6
    piece = slice(0, middle) if sp_rank == 0 else slice(middle, last - first)
    whole = run(tensors, extras, "torch", **options)
    loss, grads, metrics = run(sliced(replica, piece), sliced(replica_extras, piece), "torch", sp_group=sp_group,
                               process_group=other_group, **options)
    total = loss.clone()
    dist.all_reduce(total, group=other_group)
    assert_relative_close(total / 2, whole[0], 1e-10, "the mean of the replicas' losses")
    assert_relative_close(grads[0] / 2, whole[1][0][first:last][piece], 1e-10, "gradient averaged over replicas")
    # sequence × vocabulary parallel: tp rank `other` holds the vocabulary ids [0, 5) or [5, 11)
    vocab = slice(0, 5) if other == 0 else slice(5, 11)
    piece = slice(0, 13) if sp_rank == 0 else slice(13, 25)
    mine = sliced(tensors, piece)
    mine["logits"] = mine["logits"][:, vocab].contiguous()
    loss, grads, metrics = run(mine, sliced(extras, piece), "torch", sp_group=sp_group, tp_group=other_group,
                               **options)
    assert_same((loss, [grads[0]], metrics), (whole[0], [whole[1][0][piece, vocab]], whole[2]))
    # and the fused linear path: the head's rows sharded over the vocabulary
    hidden, weight, bias = head(*tensors["logits"].shape)
    whole = run(tensors, extras, "torch", path=(hidden, weight, bias), **options)
    loss, grads, metrics = run(sliced(tensors, piece), sliced(extras, piece), "torch", sp_group=sp_group,
                               tp_group=other_group, path=(hidden[piece], weight[vocab], bias[vocab]), **options)
    assert_relative_close(loss, whole[0], 1e-10, "loss")
    assert_relative_close(grads[0], whole[1][0][piece], 1e-10, "grad hidden")
    summed = grads[1].clone()
    dist.all_reduce(summed, group=sp_group)
    assert_relative_close(summed, whole[1][1][vocab], 1e-10, "grad weight")


def test_with_data_and_tensor_parallel(tmp_path):
    run_on_ranks(check_with_data_and_tensor_parallel, tmp_path, 4)


def test_sequence_parallel_refusals():
    tensors, extras = packed_case(seed=3)
    group = object()            # never reached: the checks run first
    with pytest.raises(ValueError, match="sp_group splits a packed sequence over ranks: pass the global cu_seqlens"):
        sk.sentence_grpo_loss(*padded(tensors, extras)[0].values(), sp_group=group, backend="torch")
    with pytest.raises(ValueError, match="top_entropy_quantile < 1 is not supported with sp_group"):
        sk.sentence_grpo_loss(*tensors.values(), cu_seqlens=extras["cu_seqlens"], sp_group=group,
                              top_entropy_quantile=0.5, backend="torch")
    with pytest.raises(ValueError, match="sp_group: the reference backend needs the whole sequence"):
        sk.sentence_grpo_loss(*tensors.values(), cu_seqlens=extras["cu_seqlens"], sp_group=group,
                              backend="reference")
