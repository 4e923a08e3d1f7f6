"""Step scorers from local model folders: what ``sgrpo train --step-scorer`` and the verl plugin's ``sentence``
reward manager add to a task's composite reward."""

from __future__ import annotations

import json
import os

from ..choices import parse_step_scorer
from .logic import GenerativeVerifier
from .prm import ProcessRewardModel

# the defaults of the two published PRM conventions: Math-Shepherd (a causal LM reading "+" / "-" after "ки") and
# Qwen2.5-Math-PRM (a two-class head at "<extra_0>", class 1 = good)
CAUSAL_PRM_DEFAULTS = {"step_tag": "ки", "good_token": "+", "bad_token": "-"}
CLASSIFIER_PRM_DEFAULTS = {"step_tag": "<extra_0>", "label_ids": (0, 1)}


def is_token_classifier(folder: str) -> bool:
    """Whether the saved model's ``config.json`` names a token-classification (or process-reward) architecture."""
    with open(os.path.join(folder, "config.json")) as handle:
        architectures = json.load(handle).get("architectures") or []
    return any(name.endswith(("ForTokenClassification", "ForProcessRewardModel")) for name in architectures)


def load_step_scorer(kind: str, folder: str, **options):
    """A :class:`GenerativeVerifier` (``kind="verifier"``, a causal LM) or :class:`ProcessRewardModel`
    (``kind="prm"``: a classification head when ``config.json`` names one, else a causal LM) of the model and
    tokenizer saved in ``folder`` (no download), in eval mode; ``options`` go to the constructor, over the
    conventions' defaults (``CAUSAL_PRM_DEFAULTS``, ``CLASSIFIER_PRM_DEFAULTS``)."""
    from ..models import load_pretrained, load_tokenizer

    if kind == "verifier":
        model, tokenizer = load_pretrained(folder)
        return GenerativeVerifier(model.eval(), tokenizer, **options)
    if kind != "prm":
        raise ValueError(f"kind must be 'verifier' or 'prm', got {kind!r}")
    if is_token_classifier(folder):
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True)
        tokenizer, defaults = load_tokenizer(folder), CLASSIFIER_PRM_DEFAULTS
    else:
        (model, tokenizer), defaults = load_pretrained(folder), CAUSAL_PRM_DEFAULTS
    return ProcessRewardModel(model.eval(), tokenizer, **{**defaults, **options})


def with_step_scorers(reward, specs):
    """``reward`` (a :class:`~sgrpo_kernels.rewards.CompositeReward`) with one term per spec
    ``KIND=FOLDER[,key=value...]`` (the syntax of ``sgrpo train --step-scorer``, parsed by
    :func:`sgrpo_kernels.choices.parse_step_scorer`): the term ``KIND`` at its ``weight``, the others scaled by
    ``1 - weight``. Raises ``ValueError`` for a bad spec or scorer option."""
    for spec in specs:
        kind, folder, weight, options = parse_step_scorer(spec)
        reward = reward.with_term(kind, load_step_scorer(kind, folder, **options), weight)
    return reward
