"""The seed's composite sentence reward ``r = Σ_k λ_k R_k``, padded to ``[B, S_max]``, with its breakdown."""

from __future__ import annotations

import math

import torch

from ..config import validate_reward_weights


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

    def num_sentences(self, answers) -> torch.Tensor:
        """``[B]`` sentence counts, for ``group_sentence_advantages``."""
        return torch.tensor([len(sentences) for sentences in answers], dtype=torch.long)
