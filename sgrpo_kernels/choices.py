"""The names the command line shares with the library, and the syntax of a ``--step-scorer`` spec.

Standard library only: the ``sgrpo`` command checks its flags against these before it imports torch (so that
``--help`` and every mistake answer in a fraction of a second), and the library's modules take them from here, so
each is defined once.
"""

from __future__ import annotations

# levels and the trainer's two axes (sgrpo_kernels.levels, trainer/grpo.py)
LEVELS = ("token", "sentence", "output")
DEFAULT_SENTENCE_RATIO_LEVEL = "mean"
RATIO_LEVELS = ("sum", "mean")
ADVANTAGES = ("sentence", "cumulative", "broadcast")
CREDITS = ("sentence", "answer")
RATIOS = ("token", "sentence", "output")
# the (credit, ratio) of each level
LEVEL_AXES = {"token": ("answer", "token"), "sentence": ("sentence", "sentence"), "output": ("answer", "output")}
ADVANTAGE_BASELINES = ("pooled", "split_final")

# the chain task's bounds (trainer/tasks/chain.py): steps per problem, labels (a-z, A-Z), a fact's largest operand
CHAIN_MAX_LENGTH, CHAIN_MAX_FACTS, CHAIN_MAX_OPERAND = 40, 52, 9

# the generative verifier's modes (rewards/logic.py)
VERIFIER_MODES = ("one_pass", "cache", "batched")


# -- `sgrpo train --step-scorer` and the verl plugin's SGRPO_STEP_SCORER: KIND=FOLDER[,KEY=VALUE...] -------------
STEP_SCORER_KEYS = {"verifier": ("weight", "mode", "batch_size", "yes", "no"),
                    "prm": ("weight", "step_tag", "good_token", "bad_token", "label_ids", "batch_size")}
DEFAULT_STEP_SCORER_WEIGHT = 0.3


def parse_step_scorer(spec: str) -> tuple[str, str, float, dict]:
    """``KIND=FOLDER[,KEY=VALUE...]`` -> ``(kind, folder, weight, options)``: ``options`` the constructor keywords
    of :class:`~sgrpo_kernels.rewards.GenerativeVerifier` (``verifier``) or
    :class:`~sgrpo_kernels.rewards.ProcessRewardModel` (``prm``), typed (``batch_size`` an int, ``label_ids``
    ``BAD:GOOD`` a pair of ints). A value cannot hold a comma. ``ValueError`` saying what is wrong."""
    kind, separator, rest = spec.partition("=")
    if not separator or kind not in STEP_SCORER_KEYS or not rest.split(",")[0]:
        raise ValueError(f"{spec!r} is not KIND=FOLDER[,KEY=VALUE...] with KIND one of {', '.join(STEP_SCORER_KEYS)}")
    folder, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or key not in STEP_SCORER_KEYS[kind] or key in options:
            raise ValueError(f"{spec!r}: {pair!r} is not KEY=VALUE with a new KEY among "
                             f"{', '.join(STEP_SCORER_KEYS[kind])}")
        options[key] = _step_scorer_value(spec, key, value)
    return kind, folder, options.pop("weight", DEFAULT_STEP_SCORER_WEIGHT), options


def _step_scorer_value(spec: str, key: str, value: str):
    try:
        if key == "weight":
            weight = float(value)
            if not 0 < weight <= 1:
                raise ValueError
            return weight
        if key == "batch_size":
            if int(value) < 1:
                raise ValueError
            return int(value)
        if key == "label_ids":
            bad, good = (int(index) for index in value.split(":"))
            return (bad, good)
    except ValueError:
        expected = {"weight": "a number in (0, 1]", "batch_size": "an integer >= 1",
                    "label_ids": "BAD:GOOD, two class indices"}[key]
        raise ValueError(f"{spec!r}: {key} must be {expected}, got {value!r}") from None
    if key == "mode" and value not in VERIFIER_MODES:
        raise ValueError(f"{spec!r}: mode must be one of {', '.join(VERIFIER_MODES)}, got {value!r}")
    if not value:
        raise ValueError(f"{spec!r}: {key} is empty")
    return value
