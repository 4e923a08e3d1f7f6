"""Sentence rewards: correctness, logic and format terms, model-based step scorers (a generative verifier, a process
reward model), their composite, min-form credit, and the code sandbox.

Every reward maps ``(questions, answers, references)`` with answers given as lists of sentences to one
score in ``[0, 1]`` per sentence; :class:`CompositeReward` combines them with weights that sum to 1.
"""

from .base import SentenceReward
from .composite import CompositeReward, MinForm
from .correctness import CodeTestCorrectness, MathStepCorrectness, answers_match, extract_code
from .format import ANSWER_LINE, THINK_BLOCK, FormatReward
from .logic import GenerativeVerifier, NumberProvenanceLogic
from .prm import ProcessRewardModel
from .safe_math import equation_holds, equations, safe_eval
from .sandbox import SandboxResult, SandboxUnavailableError, require_sandbox, run_python

__all__ = ["ANSWER_LINE", "THINK_BLOCK", "CodeTestCorrectness", "CompositeReward", "FormatReward",
           "GenerativeVerifier", "MathStepCorrectness", "MinForm", "NumberProvenanceLogic", "ProcessRewardModel",
           "SandboxResult", "SandboxUnavailableError", "SentenceReward", "answers_match", "equation_holds",
           "equations", "extract_code", "require_sandbox", "run_python", "safe_eval"]
