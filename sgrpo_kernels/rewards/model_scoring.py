"""What the model-based step scorers share: checks that run before any forward, padding, and reading the logits
of a few vocabulary entries at chosen positions without computing ``[batch, length, vocab]`` logits."""

from __future__ import annotations

import inspect

import torch

from ..integrations.hf import output_projection

# attention implementations of transformers that apply a custom 4-D float mask as given (flash attention only
# knows causal masks and padding)
MASKABLE_ATTENTION = ("eager", "sdpa", "flex_attention")


def sentence_lists(questions, answers) -> list[list[str]]:
    """The answers as lists of sentences, one per question (``ValueError`` otherwise)."""
    answers = [list(sentences) for sentences in answers]
    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions for {len(answers)} answers")
    return answers


def in_batches(encoded: list, num_steps, batch_size: int, score) -> list[list[float]]:
    """``score(chunk)`` on chunks of ``batch_size`` encoded answers with ``num_steps(item) >= 1`` (in order); an
    answer without steps gets ``[]``. ``score`` returns one list of scores per answer of its chunk."""
    scored = [index for index, item in enumerate(encoded) if num_steps(item)]
    result = [[] for _ in encoded]
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        for index, scores in zip(chunk, score([encoded[index] for index in chunk]), strict=True):
            result[index] = scores
    return result


def single_token(tokenizer, text: str, name: str) -> int:
    """The id of ``text`` when the tokenizer encodes it as exactly one token; otherwise ``ValueError``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{name}={text!r} must be exactly one token of the tokenizer; it encodes to {len(ids)} "
                         f"tokens {ids}")
    return ids[0]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def bos(tokenizer) -> list[int]:
    """``[bos_token_id]``, or ``[]`` for a tokenizer without one."""
    token = getattr(tokenizer, "bos_token_id", None)
    return [token] if token is not None else []


def pad_id(tokenizer) -> int:
    token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if token is None else token


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_limit(model) -> int | None:
    """``max_position_embeddings`` of the model's (text) config, or ``None`` when it declares none."""
    return getattr(_config(model), "max_position_embeddings", None)


def check_lengths(model, lengths: list[int], what: str) -> None:
    """``ValueError`` when one of ``lengths`` (tokens of answer ``i``) exceeds the model's context."""
    limit = context_limit(model)
    if limit is None:
        return
    for index, length in enumerate(lengths):
        if length > limit:
            raise ValueError(f"answer {index} needs {length} tokens ({what}), more than the model's context "
                             f"max_position_embeddings={limit}")


def attention_implementation(model) -> str:
    return str(getattr(_config(model), "_attn_implementation", None) or "eager")


def check_maskable(model, longest: int, fallback: str) -> None:
    """``ValueError`` when the model cannot take a custom 4-D attention mask (flash attention), or when sliding-
    window layers would see a sequence longer than their window (a custom mask is used as given, for every
    layer); ``fallback`` names the mode that works."""
    implementation = attention_implementation(model)
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(f"mode='one_pass' needs an attention implementation that takes a 4-D attention mask "
                         f"({', '.join(MASKABLE_ATTENTION)}); this model uses {implementation!r}: pass "
                         f"mode={fallback!r}, or load the model with attn_implementation='sdpa'")
    config = _config(model)
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding and window is not None and longest > window:
        raise ValueError(f"mode='one_pass' gives every layer one 4-D mask, but this model has sliding-window layers "
                         f"(window {window}) and a prompt of {longest} tokens: pass mode={fallback!r}")


def additive_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """``[B, 1, Q, K]`` mask from ``allowed`` ``[B, Q, K]`` bool: bool for sdpa, else 0 / dtype-min in the model's
    dtype (eager and flex attention add it to the scores)."""
    allowed = allowed.unsqueeze(1)
    if attention_implementation(model) == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                         torch.finfo(dtype).min)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, positions)`` ``[B, W]`` int64: rows left-padded to the longest, positions from 0 at each
    row's first token."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def cache_keyword(module) -> str:
    """The name under which ``module.forward`` takes a KV cache: ``cache`` (transformers >= 5.25) or
    ``past_key_values`` (older)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs["past_key_values"]


def token_logits(model, token_ids: list[int], rows: torch.Tensor, columns: torch.Tensor, **inputs):
    """Logits of the vocabulary entries ``token_ids`` at positions ``(rows[k], columns[k])`` of a causal LM.

    The decoder runs once (``model.get_decoder()``) and only the head rows of ``token_ids`` are applied to the
    gathered hidden states; a head that is not one linear map (logit soft-capping) runs the whole model instead.

    Returns:
        ``(logits [K, len(token_ids)] float64, outputs of the forward)``.
    """
    index = torch.tensor(token_ids, device=rows.device)
    try:
        weight, bias = output_projection(model)
    except NotImplementedError:
        outputs = model(**inputs)
        return outputs.logits[rows, columns][:, index].double(), outputs
    outputs = model.get_decoder()(**inputs)
    hidden = outputs.last_hidden_state[rows, columns]
    logits = hidden @ weight[index].T
    if bias is not None:
        logits = logits + bias[index]
    return logits.double(), outputs


def first_of_pair(logits: torch.Tensor) -> list[float]:
    """``softmax(logits [K, 2])[:, 0]``: the first entry's probability renormalised over the two."""
    return torch.softmax(logits.double(), dim=-1)[:, 0].tolist()
