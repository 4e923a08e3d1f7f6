"""A tiny causal LM and a character-level tokenizer, built locally from a config (nothing is downloaded), and the
loading and saving of model folders that the trainer, the step scorers and the command line share."""

from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + " +-*/=.,:?()\n"


def char_tokenizer():
    """One token per character (fast tokenizer with offsets; special tokens ``<pad> <bos> <eos> <unk>``)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    tokenizer.sgrpo_char_tokenizer = True
    return tokenizer


def tiny_model(tokenizer, *, hidden_size: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    """A small Qwen2 (tied embeddings) sized to ``tokenizer``; about a million parameters by default."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config)


CHAR_TOKENIZER_MARK = "sgrpo_char_tokenizer"


def save_pretrained(model, tokenizer, path: str) -> None:
    """``save_pretrained`` both; marks a character tokenizer so that :func:`load_pretrained` restores it
    as is (``AutoTokenizer`` would pick the model family's tokenizer class and re-split the text)."""
    import json
    import os

    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if getattr(tokenizer, CHAR_TOKENIZER_MARK, False):
        config_path = os.path.join(path, "tokenizer_config.json")
        with open(config_path) as handle:
            config = json.load(handle)
        config[CHAR_TOKENIZER_MARK] = True
        with open(config_path, "w") as handle:
            json.dump(config, handle, indent=1)


def load_tokenizer(path: str):
    """The tokenizer of a local folder (no download); a marked character tokenizer as is (see
    :func:`save_pretrained`)."""
    import json
    import os

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_path = os.path.join(path, "tokenizer_config.json")
    marked = os.path.exists(config_path) and json.load(open(config_path)).get(CHAR_TOKENIZER_MARK, False)
    if not marked:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    tokenizer.sgrpo_char_tokenizer = True
    return tokenizer


def load_pretrained(path: str):
    """Causal LM and tokenizer from a local folder (no download); see :func:`save_pretrained`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), load_tokenizer(path)
