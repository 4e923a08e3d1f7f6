"""The option product against reference.py in float64, gradients included: objective × reduction × rollout
importance-weight mode × level × KL estimator.

Not the full product (525 checks per backend) but a covering array of it (105): every objective × level ×
rollout mode (the three choose what the Triton kernels are specialised on: the objective pass B's sums and
coefficients, a rollout mode the token weights, the level the segment layout), each with every reduction and KL
estimator through all pairs of values of the five. The reduction enters as the per-sentence weight ``w(i, s)`` of
``ops/layout.py`` and the KL estimator only through the additive KL term (whose four forms ``tests/test_ops.py``
crosses with every objective on its own), so neither picks a kernel path of its own: the Triton backend launches the
same set of kernel specialisations as under the full product (checked when the array replaced it)."""

import itertools

import pytest
import torch
from cases import device_of, random_case
from covering import covering_array, holds_every_combination
from test_ops import check_against_gold, loss_and_grad

from sgrpo_kernels.config import IS_MODES, KL_ESTIMATORS, OBJECTIVES, REDUCTIONS

LEVELS = ("token", "sentence", "output")
FACTORS = dict(objective=OBJECTIVES, level=LEVELS, is_mode=(None, *IS_MODES), reduction=REDUCTIONS,
               kl_estimator=KL_ESTIMATORS)
CROSSED = ("objective", "level", "is_mode")
ROWS = covering_array(FACTORS, strength=2, crossed=CROSSED)


def level_case(level: str):
    """A float64 batch whose segments are tokens, random sentences or whole answers, with rollout log-probs."""
    case = random_case(batch=3, length=6, vocab=200, num_slots=6, dtype=torch.float64, seed=31,
                       per_row_advantages=level != "sentence", old_spread=0.5)
    scored = case["segment_ids"] >= 0
    if level == "token":
        case["segment_ids"] = torch.where(scored, torch.arange(6), -1)
    elif level == "output":
        case["segment_ids"] = torch.where(scored, 0, -1)
    generator = torch.Generator().manual_seed(4)
    sampling = case["old_logps"] + 0.4 * torch.randn(case["old_logps"].shape, dtype=torch.float64,
                                                     generator=generator)
    return case, sampling


def test_the_rows_hold_every_pair_and_every_kernel_path():
    assert holds_every_combination(ROWS, FACTORS, CROSSED)
    assert all(holds_every_combination(ROWS, FACTORS, pair) for pair in itertools.combinations(FACTORS, 2))
    assert len(ROWS) == len(OBJECTIVES) * len(LEVELS) * (1 + len(IS_MODES))     # no more rows than the triple needs


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_reduction_and_rollout_mode(backend, objective, level):
    case, sampling = level_case(level)
    rows = [row for row in ROWS if row["objective"] == objective and row["level"] == level]
    checked = 0
    for row in rows:
        reduction, is_mode = row["reduction"], row["is_mode"]
        options = dict(objective=objective, reduction=reduction, beta=0.1, kl_estimator=row["kl_estimator"],
                       kl_importance_weighting=reduction == "token_mean", eps_high=1.2 if objective == "cispo" else 0.2,
                       ratio_level="mean" if level == "output" else "sum", is_mode=is_mode, is_clip_min=0.6,
                       is_clip_max=1.8, sampling_logps=sampling.to(device_of(backend)) if is_mode else None)
        if objective == "vespo" and is_mode is not None and not is_mode.startswith("token"):
            with pytest.raises(ValueError, match="is_mode must be 'token_truncate' or 'token_mask'"):
                loss_and_grad(case, backend, **options)
            continue
        check_against_gold(case, backend, rel=1e-10, **options)
        checked += 1
    assert checked == 1 + len(IS_MODES) - (4 if objective == "vespo" else 0)
