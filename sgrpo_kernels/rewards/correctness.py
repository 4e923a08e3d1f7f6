"""Correctness of each sentence: its arithmetic (math steps), the final answer (math-verify), or tests (code)."""

from __future__ import annotations

import re
import threading
import unicodedata

from .base import SentenceReward
from .safe_math import equation_holds, equations
from .sandbox import SandboxResult, require_sandbox, run_python

# A sentence that states the final answer: "Answer: 42", "the answer is 42", "答案是 42", "\boxed{42}".
FINAL_ANSWER = re.compile(r"(?i)(\banswer\b\s*(?:is|[:：=])|答案|最终结果|\\boxed\{)")
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def _for_parsing(text: str) -> str:
    """NFKC turns full-width forms (Chinese "：", "４２") into ASCII; math-verify misses "Answer:42" without
    the space after the colon."""
    return re.sub(r":(?=\S)", ": ", unicodedata.normalize("NFKC", text))


def answers_match(reference: str, text: str) -> bool:
    """Whether ``text`` states an answer equivalent to ``reference`` (math-verify: LaTeX, fractions, sets...)."""
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_for_parsing(reference), parsing_timeout=timeout)
    predicted = parse(_for_parsing(text), parsing_timeout=timeout)
    return bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)


class MathStepCorrectness(SentenceReward):
    """Per sentence: the final-answer sentence scores 1 if math-verify finds it equal to the reference;
    a sentence with arithmetic equations scores the fraction of them that hold (``12 + 30 = 42``, also
    ``×``, ``÷``, full-width signs); any other sentence scores ``neutral`` (nothing to check).

    ``reference``: the ground-truth final answer as a string (``None``: the final answer is not checked).
    """

    def __init__(self, neutral: float = 0.5):
        if not 0.0 <= neutral <= 1.0:
            raise ValueError(f"neutral must lie in [0, 1], got {neutral}")
        self.neutral = neutral

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        scores = []
        for sentence in sentences:
            if reference is not None and FINAL_ANSWER.search(sentence):
                scores.append(1.0 if answers_match(str(reference), sentence) else 0.0)
                continue
            verdicts = [verdict for sides in equations(sentence) if (verdict := equation_holds(sides)) is not None]
            scores.append(sum(verdicts) / len(verdicts) if verdicts else self.neutral)
        return scores


def extract_code(answer: str) -> str:
    """The last fenced Python block of an answer, or the whole answer when it has none."""
    blocks = _CODE_BLOCK.findall(answer)
    return blocks[-1] if blocks else answer


class CodeTestCorrectness(SentenceReward):
    """The fraction of tests the answer's program passes in the sandbox, given to every sentence.

    ``reference``: a list of tests, each ``{"stdin": str, "stdout": str}`` (output compared after stripping
    trailing whitespace) or ``{"assert": str}`` (Python appended to the program; passing = exit status 0).

    Programs run through :func:`~sgrpo_kernels.rewards.sandbox.run_python`: bubblewrap isolates the
    filesystem, network and processes, rlimits bound time and memory. The constructor raises
    :class:`~sgrpo_kernels.rewards.sandbox.SandboxUnavailableError` when bubblewrap is missing or unusable,
    so that training fails at setup rather than at the first reward. ``unsafe_allow_without_sandbox=True``
    runs the programs with resource limits only instead (with a warning): they can then read and write the
    user's files and reach the network.
    """

    def __init__(self, timeout_s: float = 5, memory_mb: int = 512, *, unsafe_allow_without_sandbox: bool = False):
        require_sandbox(unsafe_allow_without_sandbox=unsafe_allow_without_sandbox)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.unsafe_allow_without_sandbox = unsafe_allow_without_sandbox

    def _run(self, code: str, stdin: str = "") -> SandboxResult:
        return run_python(code, stdin=stdin, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                          unsafe_allow_without_sandbox=self.unsafe_allow_without_sandbox)

    def passed(self, code: str, test: dict) -> bool:
        if "assert" in test:
            result = self._run(code + "\n\n" + test["assert"] + "\n")
            return result.returncode == 0 and not result.timed_out
        result = self._run(code, stdin=test.get("stdin", ""))
        return (result.returncode == 0 and not result.timed_out
                and result.stdout.rstrip() == str(test["stdout"]).rstrip())

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        if not reference:
            raise ValueError("CodeTestCorrectness needs a non-empty list of tests as the reference")
        code = extract_code("".join(sentences))
        fraction = sum(self.passed(code, test) for test in reference) / len(reference)
        return [fraction] * len(sentences)
