"""Hugging Face ``transformers`` causal LMs -> what the fused linear path needs, without computing logits."""

from __future__ import annotations

import torch


def output_projection(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head of a causal LM as ``(weight [V, H], bias [V] or None)``.

    With tied embeddings the weight *is* the input-embedding parameter, so gradients reach it as usual.
    Raises ``NotImplementedError`` for heads that are not one affine map of the final hidden state
    (logit soft-capping, logit scaling): the fused path would silently compute another function; and
    ``RuntimeError`` for a head that FSDP2 holds sharded at the time of the call.
    """
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__} applies {attribute}={value} to its logits; "
                                      "the fused linear loss supports plain linear LM heads only")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(f"the output embedding of {type(model).__name__} is a {type(head).__name__}, "
                                  "not an nn.Linear")
    if hasattr(head.weight, "full_tensor"):       # a DTensor: FSDP2 has sharded the head at this point
        raise RuntimeError("the LM head weight is sharded (a DTensor). Under FSDP2, read it after the forward of "
                           "the root module, which keeps its parameters unsharded until the backward, and do not "
                           "fully_shard the head on its own (see the README, multi-process training)")
    return head.weight, head.bias


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                             completion_length: int, **model_kwargs):
    """Final hidden states that score the completion tokens, and the LM head that turns them into logits.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``), any wrapper exposing
            ``get_decoder()`` and ``get_output_embeddings()``.
        input_ids: ``[B, P + T]`` prompt followed by completion (prompts left-padded, completions
            right-padded, as TRL lays them out); attention_mask: ``[B, P + T]`` or ``None``.
        completion_length: ``T``, the number of completion positions at the end of ``input_ids``.
        model_kwargs: passed to the decoder (e.g. ``position_ids``).

    Returns:
        ``(hidden [B, T, H], weight [V, H], bias [V] or None)`` with ``hidden[:, t]`` the state that predicts
        ``input_ids[:, P + t]``: ``hidden @ weight.T + bias`` equals ``model(...).logits[:, P - 1 : -1]``.
    """
    if not 1 <= completion_length < input_ids.shape[1]:
        raise ValueError(f"completion_length must be in [1, {input_ids.shape[1] - 1}] (at least one prompt "
                         f"token precedes the completion), got {completion_length}")
    weight, bias = output_projection(model)
    decoder = model.get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, -completion_length - 1:-1], weight, bias
