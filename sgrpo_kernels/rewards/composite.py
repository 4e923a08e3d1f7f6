"""The seed's composite sentence reward ``r = Σ_k λ_k R_k``, padded to ``[B, S_max]``, with its breakdown; PURE's
min-form credit over any reward."""

from __future__ import annotations

import itertools
import math

import torch

from ..config import _check_real


def validate_reward_weights(weights: dict) -> dict:
    """Check the λ of the composite reward ``r = Σ λ_k R_k``: each ``>= 0``, summing to 1.

    Returns a new dict of floats. Raises ``ValueError`` naming the offending weight.
    """
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict of name -> float")
    checked = {name: _check_real(f"weights[{name!r}]", value, low=0.0) for name, value in weights.items()}
    total = math.fsum(checked.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {total} for {checked}")
    return checked


class CompositeReward:
    """``CompositeReward({"correctness": ..., "logic": ..., "format": ...}, {"correctness": 0.5, ...})``.

    Each component is a reward callable (``rewards.base.SentenceReward``): ``(questions, answers,
    references) -> list[list[float]]``, one score in ``[0, 1]`` per sentence. The weights must be ``>= 0``
    and sum to 1. Calling the composite returns ``[B, S_max]`` float32 rewards (0 past each answer's last
    sentence); ``breakdown`` then holds each component's ``[B, S_max]`` scores for logging.
    """

    def __init__(self, components: dict, weights: dict):
        weights = validate_reward_weights(weights)
        if set(components) != set(weights):
            raise ValueError(f"weights must name exactly the components {sorted(components)}, got {sorted(weights)}")
        for name, component in components.items():
            if not callable(component):
                raise TypeError(f"component {name!r} must be callable")
        self.components, self.weights = dict(components), weights
        self.breakdown: dict[str, torch.Tensor] = {}

    def __call__(self, questions, answers, references=None) -> torch.Tensor:
        answers = [list(sentences) for sentences in answers]
        if len(questions) != len(answers) or (references is not None and len(references) != len(answers)):
            raise ValueError("questions, answers and references must have one entry per answer")
        num_slots = max((len(sentences) for sentences in answers), default=0)
        total = torch.zeros(len(answers), num_slots)
        self.breakdown = {}
        for name, component in self.components.items():
            scores = component(questions, answers, references)
            padded = torch.zeros(len(answers), num_slots)
            for row, (row_scores, sentences) in enumerate(zip(scores, answers, strict=True)):
                if len(row_scores) != len(sentences):
                    raise ValueError(f"component {name!r} gave {len(row_scores)} scores for answer {row}, "
                                     f"which has {len(sentences)} sentences")
                for column, value in enumerate(row_scores):
                    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                        raise ValueError(f"component {name!r} gave {value} (answer {row}, sentence {column}); "
                                         "scores must lie in [0, 1]")
                    padded[row, column] = value
            self.breakdown[name] = padded
            total += self.weights[name] * padded
        return total

    def with_term(self, name: str, reward, weight: float) -> CompositeReward:
        """A new composite with ``reward`` added as component ``name`` at ``weight`` in ``(0, 1]``; the existing
        weights are scaled by ``1 - weight`` (their proportions kept)."""
        if name in self.components:
            raise ValueError(f"the composite already has a component {name!r}")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must lie in (0, 1], got {weight}")
        weights = {key: value * (1.0 - weight) for key, value in self.weights.items()}
        return CompositeReward({**self.components, name: reward}, {**weights, name: weight})

    def num_sentences(self, answers) -> torch.Tensor:
        """``[B]`` sentence counts, for ``group_sentence_advantages``."""
        return torch.tensor([len(sentences) for sentences in answers], dtype=torch.long)


class MinForm:
    """PURE's min-form credit (Cheng et al., "Stop Summation: Min-Form Credit Assignment Is All Process Reward
    Model Needs for Reasoning"): step ``s`` scores ``min(r_0, ..., r_s)`` of the wrapped reward, so a step after a
    bad one can never score more than it.

    ``MinForm(reward)`` takes what ``reward`` takes and returns what it returns, with running minima: ``B`` lists
    of floats for a reward term (then usable as a :class:`CompositeReward` component), or ``[B, S_max]`` float32
    with 0 past each answer's last sentence when ``reward`` is itself a :class:`CompositeReward` (whose
    ``breakdown`` it passes on, unchanged).
    """

    def __init__(self, reward):
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward

    @property
    def breakdown(self) -> dict:
        return getattr(self.reward, "breakdown", {})

    def num_sentences(self, answers) -> torch.Tensor:
        return torch.tensor([len(sentences) for sentences in answers], dtype=torch.long)

    def __call__(self, questions, answers, references=None):
        answers = [list(sentences) for sentences in answers]
        scores = self.reward(questions, answers, references)
        if not isinstance(scores, torch.Tensor):
            return [list(itertools.accumulate(row, min)) for row in scores]
        counts = self.num_sentences(answers).to(scores.device)
        exists = torch.arange(scores.shape[1], device=scores.device) < counts.unsqueeze(1)
        running = torch.where(exists, scores, torch.inf).cummin(dim=1).values
        return torch.where(exists, running, torch.zeros((), dtype=scores.dtype))
