"""The reward protocol: one score in [0, 1] per sentence, computed for a batch of answers."""

from __future__ import annotations

from collections.abc import Sequence


class SentenceReward:
    """A reward term of the composite ``r = Σ λ_k R_k``.

    ``reward(questions, answers, references)`` takes ``B`` questions, ``B`` answers given as their
    sentences (``list[list[str]]``, e.g. ``Segmentation.texts``) and ``B`` references (ground-truth answers,
    test cases, or ``None``), and returns ``B`` lists with one score in ``[0, 1]`` per sentence.
    Subclasses implement :meth:`score` for one answer, or override ``__call__`` to batch (the verifier).
    """

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        raise NotImplementedError

    def __call__(self, questions: Sequence[str], answers: Sequence[list[str]], references: Sequence | None = None):
        references = [None] * len(answers) if references is None else references
        return [self.score(question, list(sentences), reference)
                for question, sentences, reference in zip(questions, answers, references, strict=True)]
