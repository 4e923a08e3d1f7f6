"""Format of each sentence and of the whole answer, by regular expressions."""

from __future__ import annotations

import re

from .base import SentenceReward

ANSWER_LINE = r"(?im)^\s*(answer|答案)\s*[:：]\s*\S"
THINK_BLOCK = r"(?s)^\s*<think>.*?</think>"


class FormatReward(SentenceReward):
    """Score = ``(1 - whole_weight) · sentence_ok + whole_weight · answer_ok``.

    ``sentence_ok``: the last sentence matches ``final_pattern`` and every other sentence ``step_pattern``
    (``re.search``; ``None`` accepts anything). ``answer_ok``: the whole answer matches every pattern of
    ``answer_patterns`` (e.g. ``ANSWER_LINE``, a final ``Answer:`` line; ``THINK_BLOCK``, ``<think>…</think>``).
    """

    def __init__(self, step_pattern: str | None = None, final_pattern: str | None = ANSWER_LINE,
                 answer_patterns: tuple[str, ...] = (ANSWER_LINE,), whole_weight: float = 0.5):
        if not 0.0 <= whole_weight <= 1.0:
            raise ValueError(f"whole_weight must lie in [0, 1], got {whole_weight}")
        self.step = re.compile(step_pattern) if step_pattern else None
        self.final = re.compile(final_pattern) if final_pattern else None
        self.answer_patterns = [re.compile(pattern) for pattern in answer_patterns]
        self.whole_weight = whole_weight

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        answer_ok = float(all(pattern.search("".join(sentences)) for pattern in self.answer_patterns))
        scores = []
        for index, sentence in enumerate(sentences):
            pattern = self.final if index == len(sentences) - 1 else self.step
            sentence_ok = float(pattern is None or bool(pattern.search(sentence)))
            scores.append((1 - self.whole_weight) * sentence_ok + self.whole_weight * answer_ok)
        return scores
