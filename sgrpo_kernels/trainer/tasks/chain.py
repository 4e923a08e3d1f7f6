"""Offline long-chain task: a running value mod 10 updated by ``S`` labelled steps, to study credit assignment.

Problem:   ``Start 7. Steps: a b k d.``
Solution:  ``a: 7+1=8. b: 8+3=1. k: 1+6=7. d: 7+2=9. Answer: 9``      (one step per sentence, then the answer)

Each label stands for a fixed operand, a *fact* of the task (``a`` is 1, ``b`` is 3, …) that the question never
states: every step is a recall plus one addition mod 10, and a chain of ``S`` steps holds ``S`` chances to recall
a fact wrongly. ``sloppy_demonstrations`` writes a chosen set of facts wrongly with a given probability in the
SFT data (always the same wrong operand per fact, the chain continuing from the value written), so that the
warm-started policy gets exactly those steps wrong part of the time, and every other step right: the situation
where per-step credit should matter. Measured after 2000 SFT steps of the tiny model at length 6, 26 facts, 8 of
them mis-taught at 0.6 with a *random* wrong operand each time: sampled steps recalled the mis-taught facts wrongly
63 % of the time and the others never, but greedy decoding picked the right fact every time (40 % against 7.5 %
for each wrong one) and held-out greedy accuracy was already 1.0; hence one consistent misconception per fact.

Rewards (one score per sentence): :class:`ChainStep` scores a step 1 when it is local-correct: its label is the
question's next label, its left operand is the previous written result (the start value for the first step), its
right operand is the label's fact and its sum mod 10 holds; the ``Answer:`` sentence scores 1 when it equals the
true final value; anything else 0. With ``step_noise = p`` every sentence but the answer line has its score
flipped (1 - score) with probability ``p``, drawn from a generator seeded once (``noise_seed``): a noisy step
scorer, as a process reward model or a verifier is, while the final answer's check stays exact.
:class:`BinaryOutcome` gives every sentence the answer's outcome (one reward per answer: the R1 baseline).
:func:`step_errors` reads which steps of a completion recalled their fact wrongly.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, replace

from ...choices import CHAIN_MAX_FACTS, CHAIN_MAX_LENGTH, CHAIN_MAX_OPERAND
from ...rewards import CompositeReward, SentenceReward
from .arith import Problem, final_answer, is_correct, read_jsonl, write_jsonl

__all__ = ["ChainConfig", "ChainStep", "BinaryOutcome", "Problem", "facts", "mistaught_labels", "misconceptions",
           "misconception_choices", "make_dataset", "fact_error_rates", "per_fact_error_rates",
           "sloppy_demonstrations", "reward", "step_errors", "is_correct", "final_answer", "read_jsonl",
           "write_jsonl"]

LABELS = (string.ascii_lowercase + string.ascii_uppercase)[:CHAIN_MAX_FACTS]
MODULUS = CHAIN_MAX_OPERAND + 1
_QUESTION = re.compile(r"Start (\d)\. Steps: ([A-Za-z](?: [A-Za-z])*)\.")
_STEP = re.compile(r"^\s*([A-Za-z]): (\d+)\+(\d+)=(\d+)\.?\s*$")


@dataclass(frozen=True)
class ChainConfig:
    """``length`` steps per problem over ``num_facts`` labels, each fact an operand in ``[1, max_operand]``
    drawn with ``facts_seed`` (which also picks the mis-taught facts and their misconceptions: any seed is a task
    instance); ``mistaught`` of the facts are demonstrated wrongly with probability ``error_rate`` by
    :func:`sloppy_demonstrations`."""

    length: int = 6
    num_facts: int = 26
    max_operand: int = 9
    mistaught: int = 0
    error_rate: float = 0.6
    facts_seed: int = 0

    def __post_init__(self):
        if not 1 <= self.length <= CHAIN_MAX_LENGTH:
            raise ValueError(f"length must lie in [1, {CHAIN_MAX_LENGTH}], got {self.length}")
        if not 1 <= self.num_facts <= len(LABELS):
            raise ValueError(f"num_facts must lie in [1, {len(LABELS)}], got {self.num_facts}")
        if not 1 <= self.max_operand <= MODULUS - 1:
            raise ValueError(f"max_operand must lie in [1, {MODULUS - 1}], got {self.max_operand}")
        if not 0 <= self.mistaught <= self.num_facts:
            raise ValueError(f"mistaught must lie in [0, num_facts={self.num_facts}], got {self.mistaught}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must lie in [0, 1], got {self.error_rate}")
        if self.mistaught and self.max_operand < 2:
            raise ValueError("a mis-taught fact needs a wrong operand to write: max_operand must be >= 2")
        if self.facts_seed < 0:
            raise ValueError(f"facts_seed must be >= 0, got {self.facts_seed}")
        if self.mistaught and not misconception_choices(self):
            raise ValueError(f"facts seed {self.facts_seed}: the {self.mistaught} mis-taught facts hold every operand "
                             f"in [1, {self.max_operand}] between them, so none is left as a misconception that "
                             "is no other mis-taught fact's operand; choose fewer mis-taught facts, a larger "
                             "operand range or another facts seed")


def facts(config: ChainConfig) -> dict[str, int]:
    """Each label's operand (the task's facts), fixed by ``config.facts_seed``."""
    rng = random.Random(config.facts_seed)
    return {label: rng.randint(1, config.max_operand) for label in LABELS[:config.num_facts]}


def mistaught_labels(config: ChainConfig) -> list[str]:
    """The ``config.mistaught`` labels that :func:`sloppy_demonstrations` writes wrongly (fixed by the seed)."""
    rng = random.Random(config.facts_seed + 1)
    return sorted(rng.sample(LABELS[:config.num_facts], config.mistaught))


def _solution(start: int, labels: list[str], operands: list[int]) -> tuple[str, int]:
    value, steps = start, []
    for label, operand in zip(labels, operands, strict=True):
        result = (value + operand) % MODULUS
        steps.append(f"{label}: {value}+{operand}={result}.")
        value = result
    return " ".join(steps) + f" Answer: {value}", value


def make_problem(rng: random.Random, config: ChainConfig, table: dict[str, int]) -> Problem:
    start = rng.randrange(MODULUS)
    labels = [rng.choice(LABELS[:config.num_facts]) for _ in range(config.length)]
    solution, value = _solution(start, labels, [table[label] for label in labels])
    return Problem(question=f"Start {start}. Steps: {' '.join(labels)}.", solution=solution, answer=str(value))


def make_dataset(count: int, seed: int, **options) -> list[Problem]:
    """``count`` problems of the chain task of ``ChainConfig(**options)``, drawn with ``seed``."""
    config = ChainConfig(**options)
    table, rng = facts(config), random.Random(seed)
    return [make_problem(rng, config, table) for _ in range(count)]


def question_steps(question: str) -> tuple[int, list[str]]:
    """``"Start 7. Steps: a b k."`` -> ``(7, ["a", "b", "k"])``."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a chain question: {question!r}")
    return int(match.group(1)), match.group(2).split()


def misconception_choices(config: ChainConfig) -> list[int]:
    """The operands a misconception may take: those that no mis-taught fact holds as its true operand.

    Were a mis-taught fact taught another mis-taught fact's operand (``d`` written as ``u``'s value while ``u`` is
    written as ``d``'s), repairing one would teach the other's error: with ``facts_seed=0`` and the earlier rule (any
    wrong operand) a tiny model repaired one of such a pair at the expense of the other in 14 of 18 runs, a ceiling
    of the task instance rather than of the learner. Excluding every mis-taught operand rules out swaps and cycles.
    """
    table = facts(config)
    held = {table[label] for label in mistaught_labels(config)}
    return [value for value in range(1, config.max_operand + 1) if value not in held]


def misconceptions(config: ChainConfig) -> dict[str, int]:
    """The one wrong operand that the demonstrations write for each mis-taught label (fixed by the seed): a
    consistent misconception, so that at ``error_rate > 0.5`` even the greedy policy recalls the wrong fact. It is
    never a mis-taught fact's true operand (:func:`misconception_choices`)."""
    choices, rng = misconception_choices(config), random.Random(config.facts_seed + 2)
    return {label: rng.choice(choices) for label in mistaught_labels(config)}


def sloppy_demonstrations(problems: list[Problem], config: ChainConfig, seed: int = 0) -> list[Problem]:
    """A copy whose solutions write each step of a mis-taught label (:func:`mistaught_labels`) with its
    misconception (:func:`misconceptions`) with probability ``config.error_rate``, the chain continuing from the
    value written (so the written answer follows the written steps). Questions and reference answers stay true."""
    table, wrong = facts(config), misconceptions(config)
    rng = random.Random(seed)
    out = []
    for problem in problems:
        start, labels = question_steps(problem.question)
        operands = []
        for label in labels:
            operand = table[label]
            if label in wrong and rng.random() < config.error_rate:
                operand = wrong[label]
            operands.append(operand)
        out.append(replace(problem, solution=_solution(start, labels, operands)[0]))
    return out


def _walk(question: str, sentences: list[str]):
    """One item per sentence: ``("answer", stated)``, ``("step", k, label_expected, left_expected, (label, left,
    right, result))`` for the ``k``-th parsable step within the question's steps, or ``("other",)``."""
    left_expected, labels = question_steps(question)
    step = 0
    for sentence in sentences:
        stated = final_answer(sentence)
        if stated is not None:
            yield "answer", stated
            continue
        match = _STEP.match(sentence)
        if match is None or step >= len(labels):
            yield ("other",)
            continue
        label, left, right, result = match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))
        yield "step", step, labels[step], left_expected, (label, left, right, result)
        left_expected, step = result, step + 1


class ChainStep(SentenceReward):
    """A step scores 1 when it is right from where it stands (module docstring): the question's next label,
    the previous written result on the left, the label's fact on the right, the sum mod 10. The ``Answer:``
    sentence scores 1 when it equals the reference (the true final value). Anything else scores 0.

    ``step_noise``: the probability in ``[0, 1)`` that a sentence other than the answer line gets the opposite
    score (a noisy step scorer); the flips come from ``random.Random(noise_seed)``, one draw per such sentence in
    the order the answers are scored, so a run that scores the same answers in the same order gets the same flips.

    ``final_outcome``: the last sentence of an answer scores the answer's outcome whatever it is: 1 when it states
    the right final value, 0 otherwise (a step, or a sentence cut by the length limit, states no answer). With the
    answers' last sentences normalised apart (``group_sentence_advantages(baseline="split_final")``) their pool
    then compares outcomes only, so stopping after a right step is not scored as a right answer.
    """

    def __init__(self, table: dict[str, int], step_noise: float = 0.0, noise_seed: int = 0,
                 final_outcome: bool = False):
        if not 0.0 <= step_noise < 1.0:
            raise ValueError(f"step_noise must lie in [0, 1), got {step_noise}")
        self.table, self.step_noise, self.final_outcome = dict(table), step_noise, final_outcome
        self.noise = random.Random(noise_seed)

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        scores = []
        for index, (kind, *fields) in enumerate(_walk(question, sentences)):
            if self.final_outcome and index == len(sentences) - 1:
                scores.append(float(kind == "answer" and fields[0] == str(reference)))
                continue
            if kind == "answer":
                scores.append(float(fields[0] == str(reference)))
                continue
            if kind == "step":
                _, label_expected, left_expected, (label, left, right, result) = fields
                score = float(label == label_expected and left == left_expected
                              and right == self.table[label] and result == (left + right) % MODULUS)
            else:
                score = 0.0
            if self.step_noise and self.noise.random() < self.step_noise:
                score = 1.0 - score
            scores.append(score)
        return scores


class BinaryOutcome(SentenceReward):
    """Every sentence of an answer scores its outcome: 1 when the final ``Answer:`` equals the reference."""

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        outcome = float(bool(sentences) and final_answer(sentences[-1]) == str(reference))
        return [outcome] * len(sentences)


def reward(config: ChainConfig | None = None, outcome_only: bool = False, step_noise: float = 0.0,
           noise_seed: int = 0, final_outcome: bool = False) -> CompositeReward:
    """The task's sentence reward: local step correctness plus the answer's outcome (:class:`ChainStep`, each
    step's score flipped with probability ``step_noise``, the last sentence scored as the outcome with
    ``final_outcome``), or the binary outcome on every sentence (``outcome_only``, exact)."""
    if outcome_only:
        if step_noise or final_outcome:
            raise ValueError("step_noise and final_outcome shape the step reward; the outcome-only reward has none")
        return CompositeReward({"outcome": BinaryOutcome()}, {"outcome": 1.0})
    step = ChainStep(facts(config or ChainConfig()), step_noise, noise_seed, final_outcome)
    return CompositeReward({"step": step}, {"step": 1.0})


def step_errors(question: str, sentences: list[str], config: ChainConfig) -> list[tuple[str, bool]]:
    """``(label, recalled wrongly)`` for each parsable step of a completion (its sentences): whether the right
    operand it wrote differs from the label's fact. The error rate on the mis-taught facts is the share of
    ``True`` among their labels."""
    table = facts(config)
    return [(fields[3][0], fields[3][2] != table.get(fields[3][0], -1))
            for kind, *fields in _walk(question, sentences) if kind == "step"]


def fact_error_rates(questions: list[str], answers: list[list[str]], config: ChainConfig) -> dict[str, float]:
    """Share of steps that recalled their fact wrongly, over answers given as sentences: on the mis-taught
    facts (``mistaught``) and on the others (``other``); ``nan`` where no such step was written."""
    wrong = set(mistaught_labels(config))
    counts = {"mistaught": [0, 0], "other": [0, 0]}
    for question, sentences in zip(questions, answers, strict=True):
        for label, is_wrong in step_errors(question, sentences, config):
            bucket = counts["mistaught" if label in wrong else "other"]
            bucket[0] += is_wrong
            bucket[1] += 1
    return {name: errors / total if total else float("nan") for name, (errors, total) in counts.items()}


def per_fact_error_rates(questions: list[str], answers: list[list[str]], config: ChainConfig) -> dict[str, list[int]]:
    """``{label: [steps that recalled it wrongly, steps that wrote it]}`` over answers given as sentences, for every
    label written at least once: the per-fact view of :func:`fact_error_rates`."""
    counts: dict[str, list[int]] = {}
    for question, sentences in zip(questions, answers, strict=True):
        for label, is_wrong in step_errors(question, sentences, config):
            bucket = counts.setdefault(label, [0, 0])
            bucket[0] += is_wrong
            bucket[1] += 1
    return dict(sorted(counts.items()))
