"""Discriminative process reward models: a step tag after each sentence, every step scored in one forward."""

from __future__ import annotations

import torch

from .base import SentenceReward
from .model_scoring import (
    bos,
    check_lengths,
    device_of,
    encode,
    first_of_pair,
    in_batches,
    left_pad,
    pad_id,
    positive_int,
    sentence_lists,
    single_token,
    token_logits,
)


class ProcessRewardModel(SentenceReward):
    """A process reward model (PRM) read at a step tag inserted after each sentence of the answer:

        context_template.format(question=...) + step_0 + tag + step_1 + tag + ... + step_{S-1} + tag

    (each piece tokenized on its own, the tag as its one token id), ``batch_size`` answers per forward, left-padded.
    The score of step ``s`` is read at its tag, and depends only on the tokens up to it (causal attention), so it
    equals scoring that prefix on its own. Two heads:

    - causal LM (``good_token``, ``bad_token``; Math-Shepherd): ``P(good) / (P(good) + P(bad))`` of the next token
      after the tag, e.g. ``step_tag="ки", good_token="+", bad_token="-"``. Only the two head rows are applied.
    - token classification (``label_ids=(bad, good)`` class indices; Qwen2.5-Math-PRM, a ``[B, W, C]`` head such as
      ``Qwen2ForTokenClassification``): the softmax of the two classes at the tag, the ``good`` one's
      probability, e.g. ``step_tag="<extra_0>", label_ids=(0, 1)``.

    Args:
        model: the PRM (eval mode); tokenizer: its tokenizer.
        step_tag, good_token, bad_token: strings the tokenizer encodes as exactly one token each.
        label_ids: ``(bad, good)`` class indices of a classification head, distinct and ``< num_labels``.
        batch_size: answers per forward, ``>= 1``. context_template: the text before the first step.

    Calling it with ``B`` questions and ``B`` answers (lists of sentences) returns ``B`` lists of float scores in
    ``(0, 1)``, one per sentence. Bad options, and an answer longer than the model's ``max_position_embeddings``,
    raise ``ValueError`` before any forward.
    """

    def __init__(self, model, tokenizer, *, step_tag: str, good_token: str | None = None,
                 bad_token: str | None = None, label_ids: tuple[int, int] | None = None, batch_size: int = 16,
                 context_template: str = "{question}\n"):
        self.model, self.tokenizer, self.context_template = model, tokenizer, context_template
        self.batch_size = positive_int(batch_size, "batch_size")
        self.tag_id = single_token(tokenizer, step_tag, "step_tag")
        self.pad_id = pad_id(tokenizer)
        if label_ids is None:
            if good_token is None or bad_token is None:
                raise ValueError("give good_token and bad_token (a causal-LM head) or label_ids (a classification "
                                 "head)")
            self.pair = [single_token(tokenizer, good_token, "good_token"),
                         single_token(tokenizer, bad_token, "bad_token")]
            if self.pair[0] == self.pair[1]:
                raise ValueError(f"good_token={good_token!r} and bad_token={bad_token!r} are the same token")
            self.classifier = False
        else:
            if good_token is not None or bad_token is not None:
                raise ValueError("label_ids (a classification head) excludes good_token and bad_token")
            self.pair = self._labels(label_ids)[::-1]            # (good, bad): the score is the first's
            self.classifier = True

    def _labels(self, label_ids) -> list[int]:
        num_labels = getattr(self.model.config, "num_labels", None)
        if (not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2
                or not all(isinstance(index, int) and not isinstance(index, bool) and index >= 0
                           for index in label_ids) or label_ids[0] == label_ids[1]):
            raise ValueError(f"label_ids must be two distinct class indices (bad, good), got {label_ids!r}")
        if num_labels is not None and max(label_ids) >= num_labels:
            raise ValueError(f"label_ids {tuple(label_ids)} name a class >= the head's num_labels={num_labels}")
        return list(label_ids)

    def _tokens(self, question: str, sentences: list[str]) -> tuple[list[int], list[int]]:
        """The answer's token ids with a tag after each step, and the tags' indices."""
        tokens = bos(self.tokenizer) + encode(self.tokenizer, self.context_template.format(question=question))
        tags = []
        for sentence in sentences:
            tokens += encode(self.tokenizer, sentence) + [self.tag_id]
            tags.append(len(tokens) - 1)
        return tokens, tags

    @torch.no_grad()
    def __call__(self, questions, answers, references=None):
        answers = sentence_lists(questions, answers)
        encoded = [self._tokens(question, sentences) for question, sentences in zip(questions, answers)]
        check_lengths(self.model, [len(tokens) for tokens, _ in encoded], "context and steps with their tags")
        return in_batches(encoded, lambda item: len(item[1]), self.batch_size, self._score)

    def _score(self, encoded) -> list[list[float]]:
        device = device_of(self.model)
        ids, mask, positions = left_pad([tokens for tokens, _ in encoded], self.pad_id)
        width = ids.shape[1]
        rows = torch.cat([torch.full((len(tags),), row) for row, (_, tags) in enumerate(encoded)]).to(device)
        columns = torch.cat([width - len(tokens) + torch.tensor(tags) for tokens, tags in encoded]).to(device)
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
        if self.classifier:
            logits = self.model(**inputs).logits[rows, columns][:, self.pair]
        else:
            logits, _ = token_logits(self.model, self.pair, rows, columns, **inputs)
        scores = first_of_pair(logits)
        bounds = torch.tensor([0] + [len(tags) for _, tags in encoded]).cumsum(0).tolist()
        return [scores[bounds[row]:bounds[row + 1]] for row in range(len(encoded))]
