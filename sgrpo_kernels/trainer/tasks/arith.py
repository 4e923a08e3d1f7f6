"""Offline toy task: multi-step arithmetic with verifiable steps, for a tiny model on a laptop CPU.

Problem:   ``Compute 12 + 30 - 7.``
Solution:  ``12 + 30 = 42. 42 - 7 = 35. Answer: 35``   (one equation per sentence, then the answer)

The seed's three reward terms are real here: correctness (each step's equation holds and reaches the
question's running value at that step; the final answer equals the reference), logic (a step computes with
the numbers it should: the previous result, and the question's next operator and operand; the answer
repeats the last result), format (each step is ``a ± b = c.``, the last sentence is ``Answer: n``).

A looser logic rule (any number seen before is fine) is easy to game: a policy trained on it learned to
append extra, correct but pointless steps such as ``29 + 15 = 44.`` that dilute the penalty of a wrong
answer; and with correctness = "the equation holds" alone it learned to replace every subtraction by an
addition (right arithmetic, wrong problem). Both rules below close those doors.

``SIZES`` names two problem sizes: ``"arith"`` (operands up to 20, values up to 99) and ``"arith-small"``
(operands up to 9, values up to 49: fewer facts, so a tiny model learns them in a couple of CPU minutes).
``drop_answer_lines`` makes demonstrations that stop after the last step, as scraped solutions often do.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, replace

from ...rewards import CompositeReward, FormatReward, SentenceReward, equation_holds

STEP_PATTERN = r"^\s*\d+ [+-] \d+ = \d+\.$"
FINAL_PATTERN = r"^\s*Answer: -?\d+$"
DEFAULT_WEIGHTS = {"correctness": 0.5, "logic": 0.3, "format": 0.2}
SIZES = {"arith": {"max_operand": 20, "max_value": 99}, "arith-small": {"max_operand": 9, "max_value": 49}}
_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")
_QUESTION = re.compile(r"Compute (\d+)((?: [+-] \d+)+)\.")
_OPERATION = re.compile(r"([+-]) (\d+)")
_STEP = re.compile(r"^\s*(-?\d+) ([+-]) (-?\d+) = (-?\d+)\.?\s*$")


@dataclass
class Problem:
    question: str
    solution: str
    answer: str


def make_problem(rng: random.Random, max_operand: int = 20, max_value: int = 99) -> Problem:
    """2 or 3 additions/subtractions of numbers in ``[1, max_operand]``, every result in ``[0, max_value]``."""
    value = rng.randint(1, max_operand)
    expression, steps = str(value), []
    for _ in range(rng.choice((2, 3))):
        operand = rng.randint(1, max_operand)
        operator = "+" if value + operand <= max_value and (rng.random() < 0.5 or value - operand < 0) else "-"
        result = value + operand if operator == "+" else value - operand
        expression += f" {operator} {operand}"
        steps.append(f"{value} {operator} {operand} = {result}.")
        value = result
    return Problem(question=f"Compute {expression}.", solution=" ".join(steps) + f" Answer: {value}",
                   answer=str(value))


def make_dataset(count: int, seed: int, max_operand: int = 20, max_value: int = 99) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, max_operand, max_value) for _ in range(count)]


def drop_answer_lines(problems: list[Problem], fraction: float, seed: int = 0) -> list[Problem]:
    """A copy in which a random ``fraction`` of the solutions lose their final ``Answer:`` sentence (the
    question and reference answer stay): demonstrations that never state the result."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    rng = random.Random(seed)
    return [replace(problem, solution=problem.solution.rsplit(" Answer:", 1)[0]) if rng.random() < fraction
            else problem for problem in problems]


def write_jsonl(problems: list[Problem], path: str) -> None:
    with open(path, "w") as handle:
        for problem in problems:
            handle.write(json.dumps(asdict(problem)) + "\n")


def read_jsonl(path: str) -> list[Problem]:
    """Problems from a JSONL file of ``{"question", "answer"[, "solution"]}`` objects."""
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [Problem(question=record["question"], solution=record.get("solution", ""), answer=str(record["answer"]))
            for record in records]


def final_answer(completion: str) -> str | None:
    match = _ANSWER.search(completion.strip())
    return match.group(1) if match else None


def is_correct(completion: str, answer: str) -> bool:
    return final_answer(completion) == str(answer)


def question_operations(question: str) -> tuple[int, list[tuple[str, int]]]:
    """``"Compute 12 + 30 - 7."`` -> ``(12, [("+", 30), ("-", 7)])``."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not an arith question: {question!r}")
    return int(match.group(1)), [(sign, int(number)) for sign, number in _OPERATION.findall(match.group(2))]


def _walk(question: str, sentences: list[str]):
    """Read an answer the way the question prescribes. Yields one item per sentence:
    ``("answer", stated, last)`` for an ``Answer:`` sentence (``last``: the previous step's written result, or
    the question's first number); ``("step", k, left_expected, (left, sign, right, result), operation)`` for
    the ``k``-th parsable step within the question's operations (its four parts as written, strings);
    ``("other",)`` for anything else."""
    left_expected, operations = question_operations(question)
    step = 0
    for sentence in sentences:
        stated = final_answer(sentence)
        if stated is not None:
            yield "answer", stated, left_expected
            continue
        match = _STEP.match(sentence)
        if match is None or step >= len(operations):
            yield ("other",)
            continue
        left, sign, right, result = match.groups()
        yield "step", step, left_expected, (left, sign, right, result), operations[step]
        left_expected, step = int(result), step + 1


class StepLogic(SentenceReward):
    """Step ``k`` scores the share of its three parts that follow from the question and the previous step:
    left operand = the previous step's written result (the question's first number for ``k = 0``), operator
    and right operand = the question's ``k``-th operation. The ``Answer:`` sentence scores 1 when it repeats
    the last step's result. Steps beyond the question's operations, and unparsable sentences, score 0."""

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        scores = []
        for kind, *fields in _walk(question, sentences):
            if kind == "answer":
                stated, last = fields
                scores.append(float(stated == str(last)))
            elif kind == "step":
                _, left_expected, (left, sign, right, _), (wanted_sign, wanted_right) = fields
                scores.append((int(left) == left_expected) / 3 + (sign == wanted_sign) / 3
                              + (int(right) == wanted_right) / 3)
            else:
                scores.append(0.0)
        return scores


class StepCorrectness(SentenceReward):
    """Step ``k`` scores 1 when it does the right thing from where it stands: it applies the question's
    ``k``-th operation to the previous step's written result (the question's first number for ``k = 0``) and
    its equation holds. A step after a slip can therefore still score 1, so each step is judged on its own
    (with ``chained=True``, the older process label, a step scores 1 only when its result is also the
    question's running value, so everything after a slip scores 0). The ``Answer:`` sentence scores 1 when it
    equals the reference. Anything else scores 0."""

    def __init__(self, chained: bool = False):
        self.chained = chained

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        value, operations = question_operations(question)
        running = []
        for sign, operand in operations:
            value = value + operand if sign == "+" else value - operand
            running.append(value)
        scores = []
        for kind, *fields in _walk(question, sentences):
            if kind == "answer":
                scores.append(float(fields[0] == str(reference)))
            elif kind == "step":
                step, left_expected, (left, sign, right, result), operation = fields
                holds = bool(equation_holds([f"{left} {sign} {right}", result]))
                if self.chained:
                    scores.append(float(holds and int(result) == running[step]))
                else:
                    follows = int(left) == left_expected and (sign, int(right)) == operation
                    scores.append(float(holds and follows))
            else:
                scores.append(0.0)
        return scores


def reward(weights: dict | None = None, chained: bool = False) -> CompositeReward:
    """The composite sentence reward of this task (weights default to correctness 0.5, logic 0.3, format 0.2;
    ``chained`` selects the older correctness rule, see :class:`StepCorrectness`)."""
    return CompositeReward({"correctness": StepCorrectness(chained), "logic": StepLogic(),
                            "format": FormatReward(step_pattern=STEP_PATTERN, final_pattern=FINAL_PATTERN,
                                                   answer_patterns=(r"Answer: -?\d+\s*$",))},
                           weights or DEFAULT_WEIGHTS)
