"""Segmenter on a byte-level BPE tokenizer trained here, whose merges cross sentence boundaries."""

import random

import pytest
import torch
from cases import train_byte_level_bpe

from sgrpo_kernels import Segmenter
from sgrpo_kernels.segmentation import split_text

tokenizers = pytest.importorskip("tokenizers", reason="the segmenter's tests train a tokenizer with `tokenizers`")
transformers = pytest.importorskip("transformers", reason="the segmenter works on Hugging Face tokenizers")

CORPUS = [
    "First, we compute 3.14 * 2 = 6.28. Then we add 1.\nSo the total is 7.28!",
    "1. Read the question.\n2. Solve it, e.g. by factoring.\n\nAnswer: 42",
    "Is it prime? Yes. It has no divisors other than 1 and itself.",
    "首先，计算 12 + 30 = 42。然后检查结果！最后写出答案；答案是 42。",
    "我们有 3 个苹果。\n再买 2 个，一共 5 个？对。",
    "Let x = 5. Then 2x = 10. Mr. Smith agrees, i.e. the result holds.\n\nAnswer: 10",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(CORPUS, vocab_size=600)


def encode_batch(tokenizer, texts, pad_to=None):
    rows = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in texts]
    length = pad_to or max(map(len, rows)) + 3
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row)
        mask[index, :len(row)] = 1
    return ids, mask


def test_merges_really_cross_boundaries(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(CORPUS[0]))
    assert any(("." in piece or "!" in piece) and len(piece) > 1 and piece[-1] != "." for piece in pieces)


@pytest.mark.parametrize("mode", ["sentence", "line", "step", "token", "output"])
def test_invariants(tokenizer, mode):
    texts = CORPUS + ["   leading spaces. and\n\n\n  trailing  \n", "x"]
    ids, mask = encode_batch(tokenizer, texts)
    result = Segmenter(tokenizer, mode)(ids, mask)
    assert result.segment_ids.dtype == torch.long and result.segment_ids.shape == ids.shape
    for row, text in enumerate(texts):
        segments = result.segment_ids[row]
        scored = segments[segments >= 0]
        assert scored.numel() == int(mask[row].sum())                       # padding is -1, EOS is scored
        assert torch.all(scored[1:] >= scored[:-1])                          # non-decreasing along the row
        assert int(scored.min()) == 0 and int(scored.max()) == result.num_sentences[row] - 1
        assert len(torch.unique(scored)) == result.num_sentences[row]     # every sentence has a token
        assert "".join(result.texts[row]) == text                            # nothing lost or duplicated
        assert result.texts[row] and all(piece.strip() or mode == "token" for piece in result.texts[row])


@pytest.fixture(scope="module")
def byte_tokenizer():
    """No merges: one token per byte, so a Chinese character spans three tokens."""
    return train_byte_level_bpe(CORPUS, vocab_size=258, repeat=1)


SENTENCE_CASES = [
    ("First, we compute 3.14 * 2 = 6.28. Then we add 1.\nSo the total is 7.28!",
     ["First, we compute 3.14 * 2 = 6.28.", " Then we add 1.\n", "So the total is 7.28!"]),
    ("首先，计算 12 + 30 = 42。然后检查结果！最后写出答案；答案是 42。",
     ["首先，计算 12 + 30 = 42。", "然后检查结果！", "最后写出答案；", "答案是 42。"]),
    ("1. Read the question.\n2. Solve it, e.g. by factoring.\nMr. Smith agrees, i.e. it holds.",
     ["1. Read the question.\n", "2. Solve it, e.g. by factoring.\n", "Mr. Smith agrees, i.e. it holds."]),
    ('Is it "prime?" Yes.  (Checked.) Next', ['Is it "prime?"', " Yes.", "  (Checked.)", " Next"]),
    ("\n\nStart. End.\n\n", ["\n\nStart.", " End.\n\n"]),
]


@pytest.mark.parametrize("text,expected", SENTENCE_CASES)
def test_sentence_rules(text, expected, byte_tokenizer):
    assert split_text(text) == expected
    ids, mask = encode_batch(byte_tokenizer, [text])           # one token per byte: the text rule shows through
    assert Segmenter(byte_tokenizer)(ids, mask).texts[0] == expected


def test_line_and_step_rules():
    text = "a = 1\nb = 2\n\n  \nc = 3\n"
    assert split_text(text, "line") == ["a = 1\n", "b = 2\n\n  \n", "c = 3\n"]
    assert split_text(text, "step") == ["a = 1\nb = 2\n\n  \n", "c = 3\n"]


def test_straddling_token_belongs_to_where_it_starts(tokenizer):
    text = CORPUS[0]
    ids, mask = encode_batch(tokenizer, [text])
    result = Segmenter(tokenizer)(ids, mask)
    pieces = split_text(text)
    assert len(result.texts[0]) <= len(pieces)                 # merged tokens can only join sentences
    for sentence in result.texts[0]:                           # and always along the rule's cuts
        assert any(sentence.startswith(piece) for piece in pieces)


def test_pattern_and_max_sentences(byte_tokenizer):
    text = "Let x = 5. Then 2x = 10. Mr. Smith agrees.\n\nAnswer: 10"
    ids, mask = encode_batch(byte_tokenizer, [text])
    assert Segmenter(byte_tokenizer, pattern=r"= \d+")(ids, mask).texts[0] == [
        "Let x = 5", ". Then 2x = 10", ". Mr. Smith agrees.\n\nAnswer: 10"]
    capped = Segmenter(byte_tokenizer, max_sentences=2)(ids, mask)
    assert capped.texts[0] == ["Let x = 5.", " Then 2x = 10. Mr. Smith agrees.\n\nAnswer: 10"]


def test_token_and_output_modes_match_the_loss_edge_cases(tokenizer):
    ids, mask = encode_batch(tokenizer, CORPUS[:2])
    tokens = Segmenter(tokenizer, "token")(ids, mask)
    output = Segmenter(tokenizer, "output")(ids, mask)
    for row in range(2):
        count = int(mask[row].sum())
        assert tokens.segment_ids[row, :count].tolist() == list(range(count))
        assert output.segment_ids[row, :count].tolist() == [0] * count and output.num_sentences[row] == 1


def test_tokens_after_eos_are_not_scored(tokenizer):
    ids, _ = encode_batch(tokenizer, ["Done. Really."])
    eos_position = ids[0].tolist().index(tokenizer.eos_token_id)
    ids[0, eos_position + 1:] = torch.tensor(tokenizer.encode("More. Text.")[:ids.shape[1] - eos_position - 1])
    result = Segmenter(tokenizer)(ids)
    assert (result.segment_ids[0, eos_position + 1:] == -1).all()
    assert result.segment_ids[0, eos_position] == result.num_sentences[0] - 1
    assert "".join(result.texts[0]) == "Done. Really."


def test_random_texts_keep_every_character(tokenizer):
    generator = random.Random(0)
    alphabet = list("abc xyz.!?。；\n0123456789 ") + ["e.g. ", "3.5", "1. ", "首先", "答案"]
    texts = ["".join(generator.choice(alphabet) for _ in range(generator.randint(1, 60))) for _ in range(40)]
    ids, mask = encode_batch(tokenizer, texts)
    for mode in ("sentence", "line", "step"):
        result = Segmenter(tokenizer, mode)(ids, mask)
        for row, text in enumerate(texts):
            assert "".join(result.texts[row]) == text
            scored = result.segment_ids[row][result.segment_ids[row] >= 0]
            assert torch.all(scored[1:] >= scored[:-1]) and int(scored.max()) == result.num_sentences[row] - 1


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="mode"):
        Segmenter(tokenizer, "paragraph")
    with pytest.raises(ValueError, match="pattern"):
        Segmenter(tokenizer, "token", pattern=r"\n")
    with pytest.raises(ValueError, match="max_sentences"):
        Segmenter(tokenizer, max_sentences=0)
