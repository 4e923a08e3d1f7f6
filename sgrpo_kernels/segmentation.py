"""Sampled completions -> sentences: ``segment_ids [B, T]`` for the loss and the sentence texts for the rewards.

The completion is decoded token by token (a streaming decoder, so multi-byte characters split across
byte-level tokens come out whole), which gives every token the character position where its text starts.
The text is cut into pieces by the mode's rule; a token belongs to the piece where its text starts, so a
token that straddles a boundary (byte-level BPE merges such as ``".\\n"``) goes to the earlier sentence.
Pieces that are only whitespace, or in which no token starts, join their neighbour, so every sentence
has at least one token and ``"".join(texts[b])`` is exactly the decoded completion.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

SEGMENT_MODES = ("sentence", "line", "step", "token", "output")

# Words whose trailing "." does not end a sentence (compared in lower case, without that final dot).
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "al", "approx", "mr", "mrs", "ms", "dr", "prof", "st",
                           "fig", "eq", "eqs", "no", "vol", "p", "pp", "resp", "incl", "min", "max", "ca"})
_NEWLINE_RUN = re.compile(r"\n+")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_CJK_END = re.compile(r"[。！？；]+[”’」』）)\]]*")
_ASCII_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_LIST_MARKER = re.compile(r"\s*(?:\d+|[A-Za-z]|[ivxlcdm]+)")
_WORD_BEFORE = re.compile(r"([A-Za-z](?:[A-Za-z.]*[A-Za-z])?)$")


@dataclass
class Segmentation:
    """``segment_ids [B, T]`` (long, -1 on padding and after EOS), ``num_sentences [B]`` (long) and
    ``texts[b]`` (the sentences of row ``b``, whose concatenation is its decoded completion)."""

    segment_ids: torch.Tensor
    num_sentences: torch.Tensor
    texts: list[list[str]]


def sentence_cuts(text: str) -> list[int]:
    """Cut positions after ``. ! ?`` (followed by whitespace), ``。！？；`` and newlines.

    Not after decimals (``3.14``: no whitespace follows), numbered list markers at a line start (``1.``,
    ``a.``, ``iv.``) or common abbreviations (``e.g.``). The whitespace after a terminator starts the next
    sentence, where byte-level tokenizers attach it (``" Next"``).
    """
    cuts = {match.end() for match in _NEWLINE_RUN.finditer(text)}
    cuts.update(match.end() for match in _CJK_END.finditer(text))
    for match in _ASCII_END.finditer(text):
        start = match.start()
        if match.group().startswith(".") and not match.group().startswith(".."):
            line_start = text.rfind("\n", 0, start) + 1
            if _LIST_MARKER.fullmatch(text, line_start, start):
                continue
            word = _WORD_BEFORE.search(text, 0, start)
            if word and word.group(1).lower() in ABBREVIATIONS:
                continue
        cuts.add(match.end())
    return sorted(cut for cut in cuts if 0 < cut < len(text))


def line_cuts(text: str) -> list[int]:
    return [match.end() for match in _NEWLINE_RUN.finditer(text) if match.end() < len(text)]


def step_cuts(text: str) -> list[int]:
    return [match.end() for match in _BLANK_LINES.finditer(text) if match.end() < len(text)]


def piece_starts_of(text: str, cuts: list[int]) -> list[int]:
    """Start positions of the pieces between ``cuts``, after whitespace-only pieces joined their neighbour
    (the piece before; a whitespace-only first piece joins the next)."""
    bounds = [0] + list(cuts) + [len(text)]
    starts = [0]
    for index in range(1, len(bounds) - 1):
        if text[bounds[index]:bounds[index + 1]].strip() and text[starts[-1]:bounds[index]].strip():
            starts.append(bounds[index])
    return starts


def split_text(text: str, mode: str = "sentence") -> list[str]:
    """The pieces of ``text`` under a text mode's rule, before they are mapped onto tokens."""
    cuts = {"sentence": sentence_cuts, "line": line_cuts, "step": step_cuts}[mode](text)
    bounds = piece_starts_of(text, cuts) + [len(text)]
    return [text[bounds[index]:bounds[index + 1]] for index in range(len(bounds) - 1)]


def decode_with_starts(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The decoded text of ``ids`` (special tokens skipped) and the character index where each token starts.

    Uses the fast tokenizer's streaming decoder when there is one (linear time, exact for byte-level BPE);
    otherwise decodes growing prefixes.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
        streaming = isinstance(backend, Tokenizer)
    except ImportError:
        streaming = False
    starts, pieces, length = [], [], 0
    if streaming:
        stream = DecodeStream(skip_special_tokens=True)
        for token in ids:
            starts.append(length)
            chunk = stream.step(backend, token)
            if chunk:
                pieces.append(chunk)
                length += len(chunk)
        return "".join(pieces), starts
    previous = ""
    for end in range(1, len(ids) + 1):
        starts.append(len(previous.rstrip("\ufffd")))
        previous = tokenizer.decode(ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return previous, starts


class Segmenter:
    """Split sampled completions into sentences and map them onto their tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones decode in linear time) or a ``tokenizers.Tokenizer``.
        mode: ``"sentence"`` (after ``. ! ?`` + whitespace, ``。！？；`` and newlines), ``"line"`` (newlines),
            ``"step"`` (blank lines), ``"token"`` (every token its own segment: token-level GRPO) or
            ``"output"`` (one segment per completion: output-level GRPO).
        pattern: a regular expression whose match ends are the cut positions; replaces the mode's rule
            (for the text modes).
        max_sentences: merge everything from sentence ``max_sentences - 1`` on into the last one.
        eos_token_id: tokens after the first one are not scored (the EOS itself is, with the last sentence);
            defaults to the tokenizer's.

    ``segmenter(completion_ids [B, T], mask=None)`` returns a :class:`Segmentation`; ``mask [B, T]`` (1 =
    completion token) marks padding, which gets ``-1`` like everything after EOS.
    """

    def __init__(self, tokenizer, mode: str = "sentence", pattern: str | None = None, *,
                 max_sentences: int | None = None, eos_token_id: int | None = None):
        if mode not in SEGMENT_MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, SEGMENT_MODES))}, got {mode!r}")
        if pattern is not None and mode in ("token", "output"):
            raise ValueError(f"pattern applies to the text modes, not to mode={mode!r}")
        if max_sentences is not None and (isinstance(max_sentences, bool) or not isinstance(max_sentences, int)
                                          or max_sentences < 1):
            raise ValueError(f"max_sentences must be a positive int or None, got {max_sentences!r}")
        self.tokenizer, self.mode, self.max_sentences = tokenizer, mode, max_sentences
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)

    def cuts(self, text: str) -> list[int]:
        """Cut positions of ``text`` under this segmenter's rule."""
        if self.pattern is not None:
            return sorted({match.end() for match in self.pattern.finditer(text) if 0 < match.end() < len(text)})
        return {"sentence": sentence_cuts, "line": line_cuts, "step": step_cuts}[self.mode](text)

    def __call__(self, completion_ids: torch.Tensor, mask: torch.Tensor | None = None) -> Segmentation:
        if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
            raise ValueError("completion_ids must be a [B, T] tensor")
        if mask is not None and tuple(mask.shape) != tuple(completion_ids.shape):
            raise ValueError(f"mask must have the shape of completion_ids {tuple(completion_ids.shape)}")
        batch, length = completion_ids.shape
        segment_ids = torch.full((batch, length), -1, dtype=torch.long)
        num_sentences = torch.zeros(batch, dtype=torch.long)
        texts = []
        ids_rows = completion_ids.tolist()
        mask_rows = mask.bool().tolist() if mask is not None else [[True] * length] * batch
        for row, (ids, valid) in enumerate(zip(ids_rows, mask_rows)):
            positions = self._scored_positions(ids, valid)
            row_segments, row_texts = self._segment_row([ids[position] for position in positions])
            segment_ids[row, positions] = torch.tensor(row_segments, dtype=torch.long)
            num_sentences[row] = len(row_texts)
            texts.append(row_texts)
        return Segmentation(segment_ids.to(completion_ids.device), num_sentences.to(completion_ids.device), texts)

    def _scored_positions(self, ids: list[int], valid: list[bool]) -> list[int]:
        positions = []
        for position, (token, keep) in enumerate(zip(ids, valid)):
            if keep:
                positions.append(position)
                if token == self.eos_token_id:
                    break
        return positions

    def _segment_row(self, ids: list[int]) -> tuple[list[int], list[str]]:
        """Segment index of every token and the sentence texts of one completion."""
        if not ids:
            return [], []
        text, starts = decode_with_starts(self.tokenizer, ids)
        if self.mode == "output":
            return [0] * len(ids), [text]
        if self.mode == "token":
            ends = starts[1:] + [len(text)]
            return list(range(len(ids))), [text[start:end] for start, end in zip(starts, ends)]
        piece_starts = piece_starts_of(text, self.cuts(text))
        token_pieces = [bisect.bisect_right(piece_starts, start) - 1 for start in starts]
        # a piece in which no token starts joins the piece before it (the first piece always has token 0)
        kept = sorted(set(token_pieces))
        piece_starts = [piece_starts[index] for index in kept]
        if self.max_sentences is not None:
            piece_starts = piece_starts[:self.max_sentences]
        segments = [bisect.bisect_right(piece_starts, start) - 1 for start in starts]
        bounds = piece_starts + [len(text)]
        return segments, [text[bounds[index]:bounds[index + 1]] for index in range(len(piece_starts))]
