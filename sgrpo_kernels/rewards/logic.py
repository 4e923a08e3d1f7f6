"""Logical coherence of each step: a generative verifier (P("Yes") of a causal LM) or a rule for toy tasks."""

from __future__ import annotations

import re

import torch

from .base import SentenceReward
from .model_scoring import (
    additive_mask,
    bos,
    cache_keyword,
    check_lengths,
    check_maskable,
    device_of,
    encode,
    first_of_pair,
    in_batches,
    left_pad,
    pad_id,
    positive_int,
    returned_cache,
    sentence_lists,
    token_logits,
)
from .safe_math import equations

MODES = ("one_pass", "cache", "batched")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


class GenerativeVerifier(SentenceReward):
    """Generative verifier (Zhang et al., "Generative Verifiers"): the reward of step ``s`` is
    ``P(yes) / (P(yes) + P(no))`` for the next token after the prompt

        context_template.format(question=...) + step_0 + ... + step_s + judge_template

    Each piece is tokenized on its own and the token lists are concatenated, so the prompt of step
    ``s + 1`` extends the context of step ``s`` token for token. Three ways to run it, with the same scores:

    - ``mode="one_pass"`` (default): each answer's tokens once, followed by one copy of the judge suffix per step;
      copy ``s`` sees only the prefix that ends at step ``s`` and itself (a ``[B, 1, Q, K]`` attention mask and
      position ids that continue from the end of step ``s``). ``batch_size`` answers, left-padded, per forward.
      Needs an attention implementation that takes a 4-D mask (eager, sdpa, flex attention; not flash attention).
    - ``mode="cache"``: per answer, one forward over the answer, then one batch-1 forward of the judge suffix per
      step on the KV cache cropped to the end of that step (``S + 1`` forwards; any attention implementation).
    - ``mode="batched"``: every step's whole prompt on its own, ``batch_size`` prompts per forward (left padding).

    Only the ``yes``/``no`` rows of the LM head are applied, to the hidden states that end each judge suffix.
    ``one_pass``'s attention is dense over the answer and its ``S`` judge copies (``W = T + S·m`` keys per row): on an
    attention-bound model it beats ``cache`` at short answers and loses at long ones (README, "Step scorers").

    Args:
        model: a Hugging Face causal LM (in eval mode); tokenizer: its tokenizer.
        mode: ``"one_pass"``, ``"cache"`` or ``"batched"``. batch_size: answers (one_pass) or prompts (batched)
            per forward, ``>= 1``.
        yes, no: the answer words; their first token is compared (mind the leading space of BPE vocabularies).

    Calling it with ``B`` questions and ``B`` answers (lists of sentences) returns ``B`` lists of float scores in
    ``(0, 1)``, one per sentence. An answer whose longest prompt exceeds the model's ``max_position_embeddings``,
    or ``mode="one_pass"`` on a model that cannot take a 4-D mask, raises ``ValueError`` before any forward.
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
            check_maskable(model, 0, fallback="cache")

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
            check_maskable(self.model, max(lengths, default=0), fallback="cache")
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
        """One forward for a batch of answers, each ``context + steps + judge × S``, left-padded to width ``W``.

        Per token: its position id, its copy (``-1`` for the answer, ``s`` for step ``s``'s judge suffix, ``-2`` for
        padding) and the end of the prefix it may see (``e_s``, the position after step ``s``, for copy ``s``).
        Query ``q`` attends key ``k`` when ``pos_k <= pos_q`` and either ``k`` is an answer token before the
        query's prefix end or both are in the same judge copy; padding queries attend themselves only.
        """
        device = device_of(self.model)
        rows, copies, positions, prefix_ends, reads = [], [], [], [], []
        for context, steps, judge in pieces:
            ends = torch.tensor([len(context) + sum(map(len, steps[:step + 1])) for step in range(len(steps))])
            length, count, width = int(ends[-1]), len(steps), len(judge)
            rows.append(context + [token for piece in steps for token in piece] + judge * count)
            copies.append(torch.cat([torch.full((length,), -1), torch.arange(count).repeat_interleave(width)]))
            positions.append(torch.cat([torch.arange(length), (ends[:, None] + torch.arange(width)).reshape(-1)]))
            prefix_ends.append(torch.cat([torch.full((length,), length), ends.repeat_interleave(width)]))
            reads.append(length + width * torch.arange(1, count + 1) - 1)
        ids, _, _ = left_pad(rows, self.pad_id)
        batch, total = ids.shape
        copy = torch.full((batch, total), -2)
        position = torch.zeros(batch, total, dtype=torch.long)
        prefix_end = torch.zeros(batch, total, dtype=torch.long)
        for row, tokens in enumerate(rows):
            start = total - len(tokens)
            copy[row, start:], position[row, start:], prefix_end[row, start:] = \
                copies[row], positions[row], prefix_ends[row]
        copy, position, prefix_end = copy.to(device), position.to(device), prefix_end.to(device)
        causal = position[:, None, :] <= position[:, :, None]                        # [B, Q, K]
        answer_key = (copy[:, None, :] == -1) & (position[:, None, :] < prefix_end[:, :, None])
        same_copy = (copy[:, None, :] == copy[:, :, None]) & (copy[:, None, :] >= 0)
        allowed = causal & (answer_key | same_copy) | torch.eye(total, dtype=torch.bool, device=device)
        row_index = torch.cat([torch.full((len(read),), row) for row, read in enumerate(reads)]).to(device)
        column_index = torch.cat([total - len(tokens) + read for tokens, read in zip(rows, reads)]).to(device)
        scores, _ = self._read(row_index, column_index, input_ids=ids.to(device),
                               attention_mask=additive_mask(allowed, self.model), position_ids=position)
        bounds = torch.tensor([0] + [len(read) for read in reads]).cumsum(0).tolist()
        return [scores[bounds[row]:bounds[row + 1]] for row in range(len(rows))]

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
