"""Logical coherence of each step: a generative verifier (P("Yes") of a causal LM) or a rule for toy tasks."""

from __future__ import annotations

import re

import torch

from .base import SentenceReward
from .safe_math import equations

_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


class GenerativeVerifier(SentenceReward):
    """Generative verifier (Zhang et al., "Generative Verifiers"): the reward of step ``s`` is
    ``P(yes) / (P(yes) + P(no))`` for the next token after the prompt

        context_template.format(question=...) + step_0 + ... + step_s + judge_template

    Each piece is tokenized on its own and the token lists are concatenated, so the prompt of step
    ``s + 1`` extends the context of step ``s`` token for token. With ``reuse_cache=True`` each answer is
    run once through the model and every step's judgement reuses that KV cache (cropped to the end of the
    step); otherwise all prompts are batched with left padding, ``batch_size`` at a time. Both give the
    same scores.

    Args:
        model: a Hugging Face causal LM (in eval mode); tokenizer: its tokenizer.
        yes, no: the answer words; their first token is compared (mind the leading space of BPE vocabularies).
    """

    def __init__(self, model, tokenizer, *, context_template: str = "Question: {question}\nSolution steps:\n",
                 judge_template: str = "\nIs the last step above correct and logically valid? Answer Yes or No:",
                 yes: str = " Yes", no: str = " No", batch_size: int = 16, reuse_cache: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.context_template, self.judge_template = context_template, judge_template
        self.yes_id, self.no_id = self._first_token(yes), self._first_token(no)
        if self.yes_id == self.no_id:
            raise ValueError(f"yes={yes!r} and no={no!r} start with the same token")
        self.batch_size, self.reuse_cache = batch_size, reuse_cache
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{word!r} encodes to no token")
        return ids[0]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _pieces(self, question: str, sentences: list[str]):
        """Token ids of the context, of each step and of the judge suffix."""
        bos = [self.tokenizer.bos_token_id] if getattr(self.tokenizer, "bos_token_id", None) is not None else []
        return (bos + self._encode(self.context_template.format(question=question)),
                [self._encode(sentence) for sentence in sentences], self._encode(self.judge_template))

    def _yes_probability(self, logits: torch.Tensor) -> list[float]:
        pair = logits[..., [self.yes_id, self.no_id]].double()
        return torch.softmax(pair, dim=-1)[..., 0].tolist()

    @torch.no_grad()
    def __call__(self, questions, answers, references=None):
        if self.reuse_cache:
            return [self._score_with_cache(question, list(sentences)) for question, sentences in
                    zip(questions, answers, strict=True)]
        prompts, owners = [], []
        for index, (question, sentences) in enumerate(zip(questions, answers, strict=True)):
            context, steps, judge = self._pieces(question, list(sentences))
            for step in range(len(steps)):
                prompts.append(context + [token for piece in steps[:step + 1] for token in piece] + judge)
                owners.append(index)
        scores = self._score_batched(prompts)
        result = [[] for _ in answers]
        for owner, score in zip(owners, scores):
            result[owner].append(score)
        return result

    def _score_batched(self, prompts: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, prompt in enumerate(chunk):            # left padding: every prompt ends at the last column
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device)).logits[:, -1]
            scores += self._yes_probability(logits)
        return scores

    def _score_with_cache(self, question: str, sentences: list[str]) -> list[float]:
        """One pass over the whole answer, then each step's judgement on the cache cropped to that step."""
        if not sentences:
            return []
        device = next(self.model.parameters()).device
        context, steps, judge = self._pieces(question, sentences)
        full = context + [token for piece in steps for token in piece]
        cache = self.model(input_ids=torch.tensor([full], device=device), use_cache=True).past_key_values
        ends, end = [], len(context)
        for piece in steps:
            end += len(piece)
            ends.append(end)
        scores = [0.0] * len(steps)
        judge_ids = torch.tensor([judge], device=device)
        for step in reversed(range(len(steps))):           # cropping only ever shortens the cache
            surplus = cache.get_seq_length() - ends[step]
            if surplus > 0:
                cache.crop(-surplus)                          # negative: drop that many trailing positions
            logits = self.model(input_ids=judge_ids, past_key_values=cache, use_cache=True).logits[:, -1]
            scores[step] = self._yes_probability(logits)[0]
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
