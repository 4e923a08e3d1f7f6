"""The tiny model and character tokenizer, kept at their old import path: they live in :mod:`sgrpo_kernels.models`
(below the rewards and the trainer, which both load model folders)."""

from ..models import (  # noqa: F401  (re-exported)
    CHAR_TOKENIZER_MARK,
    CHARACTERS,
    SPECIAL_TOKENS,
    char_tokenizer,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
    tiny_model,
)
