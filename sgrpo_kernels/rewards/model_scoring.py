"""What the model-based step scorers share: checks that run before any forward, padding, and reading the logits
of a few vocabulary entries at chosen positions without computing ``[batch, length, vocab]`` logits."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import NamedTuple

import torch

from ..integrations.hf import output_projection

# the name under which mode="one_pass" registers ``segment_attention`` in transformers' attention interface
ONE_PASS_ATTENTION = "sgrpo_segment_attention"


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


def check_one_pass(model, longest: int, fallback: str) -> None:
    """``ValueError`` when ``mode='one_pass'`` cannot run ``model``: its attention layers do not take a function of
    transformers' attention interface with the forward's keyword arguments (``_supports_attention_backend``), its
    attention soft-caps the scores, or sliding-window layers would see a sequence longer than their window (the
    one-pass attention ignores windows); ``fallback`` names the mode that works."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"mode='one_pass' runs its own attention function through transformers' attention "
                         f"interface, which {type(model).__name__} does not take (_supports_attention_backend is "
                         f"False): pass mode={fallback!r}")
    config = _config(model)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"mode='one_pass' does not soft-cap attention scores as this model does "
                         f"(attn_logit_softcapping={config.attn_logit_softcapping}): pass mode={fallback!r}")
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding and window is not None and longest > window:
        raise ValueError(f"mode='one_pass' ignores sliding windows, but this model has sliding-window layers "
                         f"(window {window}) and a prompt of {longest} tokens: pass mode={fallback!r}")


@functools.cache
def _register_one_pass_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ONE_PASS_ATTENTION, segment_attention)


@contextlib.contextmanager
def one_pass_attention(model):
    """Runs the model's attention layers through ``segment_attention`` inside the block (registered in
    transformers' attention interface on first use), and through their own implementation again after it."""
    _register_one_pass_attention()
    config = _config(model)
    own = config._attn_implementation
    config._attn_implementation = ONE_PASS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = own


class Segment(NamedTuple):
    """Queries ``queries`` of row ``row`` attend every key column of ``prefix`` (``None``: no column) and their
    own columns causally (query ``q`` the keys ``[queries.start, q]``); ``mask`` is that as ``[Q, P + Q]`` bool,
    True where a query sees a key (``None`` without a prefix)."""
    row: int
    queries: slice
    prefix: slice | None
    mask: torch.Tensor | None


def segment(row: int, queries: slice, prefix: slice | None, device) -> Segment:
    """A ``Segment`` with its mask on ``device``."""
    if prefix is None:
        return Segment(row, queries, None, None)
    length, seen = queries.stop - queries.start, prefix.stop - prefix.start
    mask = torch.ones(length, seen + length, dtype=torch.bool, device=device).tril_(seen)
    return Segment(row, queries, prefix, mask)


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      scaling: float | None = None, *, segments: list[Segment] | None = None, softcap=None,
                      s_aux=None, **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function of transformers' attention interface (``one_pass_attention``): scaled dot-product
    attention of each of ``segments`` (a keyword of the forward) on the keys it sees, and of no other query.

    ``query [B, H, W, D]``, ``key``, ``value [B, H_kv, W, D]`` (``H`` a multiple of ``H_kv``); ``attention_mask``
    is ignored (the segments are the mask). Returns ``([B, W, H, D]`` in the query's dtype, ``None)``; a column
    in no segment (padding, which no segment sees) gets zeros.
    """
    if segments is None:
        raise ValueError(f"attention implementation {ONE_PASS_ATTENTION!r} needs segments=")
    if softcap is not None or s_aux is not None:
        raise ValueError(f"attention implementation {ONE_PASS_ATTENTION!r} has no soft-capping and no sinks")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    output = torch.zeros_like(query)
    for row, queries, prefix, mask in segments:
        rows = slice(row, row + 1)                              # 4-D inputs: torch's fused CPU kernel takes them
        keys, values = key[rows, :, queries], value[rows, :, queries]
        if prefix is not None:
            keys, values = torch.cat([key[rows, :, prefix], keys], 2), torch.cat([value[rows, :, prefix], values], 2)
        output[rows, :, queries] = torch.nn.functional.scaled_dot_product_attention(
            query[rows, :, queries], keys, values, attn_mask=mask, is_causal=prefix is None, scale=scaling)
    return output.transpose(1, 2), None


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
