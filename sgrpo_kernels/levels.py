"""What a *level* means: the scale at which the policy is rewarded and its importance ratio is taken.

``"sentence"``: one reward, advantage and ratio per sentence (this package's sentence-level GRPO).
``"token"``: one reward per answer, every token its own segment (token-level GRPO, DeepSeekMath).
``"output"``: one reward per answer, the whole answer one segment (output-level GRPO/GSPO).

The sentence level's ratio is ``exp`` of the sum or of the mean of its tokens' log-ratios (the loss's
``ratio_level``, stated in ``reference.py``); the default is the mean. With the sum, a sentence's ratio is the
product of its token ratios, so the clip range ``[1 - ε, 1 + ε]`` means something else for a 3-token and for a
40-token sentence: at a per-token log-ratio drift of 0.02, a 3-token sentence sits at ``exp(0.06) = 1.06``,
inside ``ε = 0.2``, and a 30-token one at ``exp(0.6) = 1.82``, clipped (everything over 9 tokens is); and each
token's gradient weight is that ratio, so it grows with the sentence's length. This is GSPO's argument (Zheng
et al. 2025) for length-normalising the sequence ratio. The mean keeps the clip range length-independent
(``exp(0.02) = 1.02`` at any length) and makes the output level, one sentence per answer, exactly GSPO.
"""

from __future__ import annotations

import torch

from .choices import DEFAULT_SENTENCE_RATIO_LEVEL, LEVELS, RATIO_LEVELS
from .segmentation import Segmenter


def check_level(level: str, ratio_level: str = DEFAULT_SENTENCE_RATIO_LEVEL) -> None:
    """Raise a ``ValueError`` naming the argument and its choices unless ``level`` is one of :data:`LEVELS` and
    ``ratio_level`` (the sentence level's) one of ``"sum"``, ``"mean"``."""
    for name, value, choices in (("level", level, LEVELS), ("ratio_level", ratio_level, RATIO_LEVELS)):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def loss_ratio_level(level: str, sentence_ratio_level: str = DEFAULT_SENTENCE_RATIO_LEVEL) -> str:
    """The ``ratio_level`` to pass to the loss at ``level``.

    ``"token"`` -> ``"sum"`` (a one-token segment makes sum and mean equal); ``"output"`` -> ``"mean"`` (GSPO's
    length-normalised sequence ratio); ``"sentence"`` -> ``sentence_ratio_level``.
    """
    check_level(level, sentence_ratio_level)
    return {"token": "sum", "output": "mean"}.get(level, sentence_ratio_level)


def advantages_per_sentence(level: str) -> bool:
    """Whether ``level`` gives every sentence its own advantage (``[B, S_max]``) rather than one per answer
    (``[B]``, from the answer's mean sentence reward)."""
    check_level(level)
    return level == "sentence"


def loss_segmenter(tokenizer, level: str) -> Segmenter | None:
    """The segmenter whose ``segment_ids [B, T]`` go to the loss at ``level``: one segment per token
    (``"token"``) or per answer (``"output"``); ``None`` at the sentence level, whose loss segments are the
    sentences that were rewarded."""
    return None if advantages_per_sentence(level) else Segmenter(tokenizer, level)


def mean_sentence_reward(rewards: torch.Tensor, num_sentences: torch.Tensor) -> torch.Tensor:
    """One reward per answer: the mean of its sentence rewards.

    Args:
        rewards: ``[B, S_max]`` float; entries at ``s >= num_sentences[b]`` must be 0 (padding).
        num_sentences: ``[B]`` int; an answer without sentences gets 0.

    Returns:
        ``[B]`` in the dtype of ``rewards``.
    """
    return rewards.sum(1) / num_sentences.clamp(min=1).to(rewards.dtype)
