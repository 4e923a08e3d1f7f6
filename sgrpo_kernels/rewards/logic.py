"""Logical coherence of each step: a generative verifier (P("Yes") of a causal LM) or a rule for toy tasks."""

from __future__ import annotations

import itertools
import re

import torch

from ..choices import VERIFIER_MODES
from .base import SentenceReward
from .model_scoring import (
    bos,
    cache_keyword,
    check_lengths,
    check_one_pass,
    device_of,
    encode,
    first_of_pair,
    in_batches,
    left_pad,
    one_pass_attention,
    pad_id,
    positive_int,
    returned_cache,
    segment,
    sentence_lists,
    token_logits,
)
from .safe_math import equations

MODES = VERIFIER_MODES
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


class GenerativeVerifier(SentenceReward):
    """Generative verifier (Zhang et al., "Generative Verifiers"): the reward of step ``s`` is
    ``P(yes) / (P(yes) + P(no))`` for the next token after the prompt

        context_template.format(question=...) + step_0 + ... + step_s + judge_template

    Each piece is tokenized on its own and the token lists are concatenated, so the prompt of step
    ``s + 1`` extends the context of step ``s`` token for token. Three ways to run it, with the same scores:

    - ``mode="one_pass"`` (default): each answer's tokens once, followed by one copy of the judge suffix per step;
      copy ``s`` sees only the prefix that ends at step ``s`` and itself (position ids that continue from the end
      of step ``s``). ``batch_size`` answers, left-padded, per forward, whose attention layers run
      ``model_scoring.segment_attention`` instead of the model's own implementation: the answer attends itself
      causally and each copy its prefix and itself, so no masked-out key is ever computed. Needs a model whose
      attention goes through transformers' attention interface (``_supports_attention_backend``), without
      soft-capped attention scores.
    - ``mode="cache"``: per answer, one forward over the answer, then one batch-1 forward of the judge suffix per
      step on the KV cache cropped to the end of that step (``S + 1`` forwards; any attention implementation).
    - ``mode="batched"``: every step's whole prompt on its own, ``batch_size`` prompts per forward (left padding).

    Only the ``yes``/``no`` rows of the LM head are applied, to the hidden states that end each judge suffix.
    ``one_pass`` and ``cache`` compute the same attention; ``one_pass`` runs it in one forward instead of
    ``S + 1`` per answer (README, "Step scorers").

    Args:
        model: a Hugging Face causal LM (in eval mode); tokenizer: its tokenizer.
        mode: ``"one_pass"``, ``"cache"`` or ``"batched"``. batch_size: answers (one_pass) or prompts (batched)
            per forward, ``>= 1``.
        yes, no: the answer words; their first token is compared (mind the leading space of BPE vocabularies).

    Calling it with ``B`` questions and ``B`` answers (lists of sentences) returns ``B`` lists of float scores in
    ``(0, 1)``, one per sentence. An answer whose longest prompt exceeds the model's ``max_position_embeddings``,
    or ``mode="one_pass"`` on a model it cannot run, raises ``ValueError`` before any forward.
    """

    def __init__(self, model, tokenizer, *, mode: str = "one_pass", batch_size: int = 16,
                 context_template: str = "Question: {question}\nSolution steps:\n",
                 judge_template: str = "\nIs the last step above correct and logically valid? Answer Yes or No:",
                 yes: str = " Yes", no: str = " No"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.batch_size = positive_int(batch_size, "batch_size")
        self.context_template, self.judge_template = context_template, judge_template
        self.yes_id, self.no_id = self._first_token(yes), self._first_token(no)
        if self.yes_id == self.no_id:
            raise ValueError(f"yes={yes!r} and no={no!r} start with the same token")
        if not encode(tokenizer, judge_template):
            raise ValueError("judge_template encodes to no token")
        self.pad_id = pad_id(tokenizer)
        if mode == "one_pass":
            check_one_pass(model, 0, fallback="cache")

    def _first_token(self, word: str) -> int:
        ids = encode(self.tokenizer, word)
        if not ids:
            raise ValueError(f"{word!r} encodes to no token")
        return ids[0]

    def _pieces(self, question: str, sentences: list[str]):
        """Token ids of the context, of each step and of the judge suffix."""
        tokenizer = self.tokenizer
        return (bos(tokenizer) + encode(tokenizer, self.context_template.format(question=question)),
                [encode(tokenizer, sentence) for sentence in sentences], encode(tokenizer, self.judge_template))

    def _read(self, rows, columns, **inputs):
        """``(P(yes)/(P(yes)+P(no)) at each (row, column), the forward's outputs)``."""
        logits, outputs = token_logits(self.model, [self.yes_id, self.no_id], rows, columns, **inputs)
        return first_of_pair(logits), outputs

    @torch.no_grad()
    def __call__(self, questions, answers, references=None):
        answers = sentence_lists(questions, answers)
        pieces = [self._pieces(question, sentences) for question, sentences in zip(questions, answers)]
        lengths = [len(context) + sum(map(len, steps)) + len(judge) for context, steps, judge in pieces]
        check_lengths(self.model, lengths, "context, steps and judge suffix")
        num_steps = lambda item: len(item[1])
        if self.mode == "one_pass":
            check_one_pass(self.model, max(lengths, default=0), fallback="cache")
            return in_batches(pieces, num_steps, self.batch_size, self._score_one_pass)
        if self.mode == "cache":
            return in_batches(pieces, num_steps, 1, lambda chunk: [self._score_with_cache(*chunk[0])])
        prompts = [(index, context + [token for piece in steps[:step + 1] for token in piece] + judge)
                   for index, (context, steps, judge) in enumerate(pieces) for step in range(len(steps))]
        result = [[] for _ in answers]
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            for (index, _), score in zip(chunk, self._score_prompts([prompt for _, prompt in chunk])):
                result[index].append(score)
        return result

    def _score_prompts(self, prompts: list[list[int]]) -> list[float]:
        """One forward of whole prompts, left-padded so that each ends at the last column."""
        device = device_of(self.model)
        ids, mask, positions = left_pad(prompts, self.pad_id)
        rows = torch.arange(len(prompts), device=device)
        columns = torch.full_like(rows, ids.shape[1] - 1)
        scores, _ = self._read(rows, columns, input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device))
        return scores

    def _score_one_pass(self, pieces) -> list[list[float]]:
        """One forward for a batch of answers (``_one_pass_batch``) through ``segment_attention``."""
        ids, positions, segments, (rows, columns) = _one_pass_batch(pieces, self.pad_id, device_of(self.model))
        with one_pass_attention(self.model):
            scores, _ = self._read(rows, columns, input_ids=ids, position_ids=positions, segments=segments)
        bounds = [0, *itertools.accumulate(len(steps) for _, steps, _ in pieces)]
        return [scores[bounds[row]:bounds[row + 1]] for row in range(len(pieces))]

    def _score_with_cache(self, context, steps, judge) -> list[float]:
        """One pass over the whole answer, then each step's judgement on the cache cropped to that step."""
        device = device_of(self.model)
        keyword = cache_keyword(self.model.get_decoder())
        full = context + [token for piece in steps for token in piece]
        last = torch.zeros(1, dtype=torch.long, device=device)
        _, outputs = self._read(last, last, input_ids=torch.tensor([full], device=device), use_cache=True)
        cache = returned_cache(outputs)
        ends, end = [], len(context)
        for piece in steps:
            end += len(piece)
            ends.append(end)
        scores = [0.0] * len(steps)
        judge_ids = torch.tensor([judge], device=device)
        column = torch.full((1,), len(judge) - 1, device=device)
        for step in reversed(range(len(steps))):           # cropping only ever shortens the cache
            surplus = cache.get_seq_length() - ends[step]
            if surplus > 0:
                cache.crop(-surplus)                          # negative: drop that many trailing positions
            (scores[step],), _ = self._read(last, column, input_ids=judge_ids, use_cache=True, **{keyword: cache})
        return scores


def _one_pass_batch(pieces, pad: int, device: torch.device):
    """Answers laid out for ``mode="one_pass"``, left-padded to the widest row: each answer's tokens (context and
    steps) once, then one copy of the judge suffix per step.

    Returns ``ids, positions`` ``[B, W]`` int64 (copy ``s`` continues the position ids of the answer from the end
    of step ``s``), the ``segments`` of ``segment_attention`` (the answer causally; copy ``s`` the answer up to the
    end of step ``s``, then itself causally) and the columns read, ``(rows, columns)`` ``[ΣS]`` int64: the last
    column of each copy, answer by answer.
    """
    rows = [context + [token for piece in steps for token in piece] + judge * len(steps)
            for context, steps, judge in pieces]
    ids, _, _ = left_pad(rows, pad)
    positions = torch.zeros_like(ids)
    segments, reads = [], []
    for row, (context, steps, judge) in enumerate(pieces):
        first, width = ids.shape[1] - len(rows[row]), len(judge)
        ends = list(itertools.accumulate(map(len, steps), initial=len(context)))[1:]   # tokens up to each step's end
        answer_end = first + ends[-1]
        positions[row, first:answer_end] = torch.arange(ends[-1])
        segments.append(segment(row, slice(first, answer_end), None, device))
        for step, end in enumerate(ends):
            start = answer_end + step * width
            positions[row, start:start + width] = torch.arange(end, end + width)
            segments.append(segment(row, slice(start, start + width), slice(first, first + end), device))
            reads.append((row, start + width - 1))
    read_rows, read_columns = torch.tensor(reads, device=device).T
    return ids.to(device), positions.to(device), segments, (read_rows, read_columns)


class NumberProvenanceLogic(SentenceReward):
    """Rule-based logic for arithmetic word problems: a step is coherent when the numbers it computes with
    (the left sides of its equations, or any number of the final-answer sentence) were given in the
    question or appeared in an earlier step. Score = the fraction of such numbers; 1 when there are none.
    """

    def score(self, question: str, sentences: list[str], reference) -> list[float]:
        known = set(_NUMBER.findall(question))
        scores = []
        for sentence in sentences:
            operands = [number for sides in equations(sentence) for side in sides[:-1]
                        for number in _NUMBER.findall(side)]
            if not equations(sentence):
                operands = _NUMBER.findall(sentence)
            used = [_canonical(number) for number in operands]
            supported = sum(number in {_canonical(value) for value in known} for number in used)
            scores.append(supported / len(used) if used else 1.0)
            known.update(_NUMBER.findall(sentence))
        return scores


def _canonical(number: str) -> str:
    value = float(number)
    return str(int(value)) if value.is_integer() else repr(value)
