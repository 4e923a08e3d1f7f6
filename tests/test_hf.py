"""The Hugging Face helper: hidden states of the completion positions and the LM head of a local tiny model."""

import pytest
import torch
from cases import assert_relative_close

import sgrpo_kernels as sk
from sgrpo_kernels.integrations.hf import completion_hidden_states, output_projection

transformers = pytest.importorskip("transformers", reason="the helper is for transformers models (train extra)")


def tiny_model(tie: bool, family: str = "qwen2"):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tie)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).double()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).double()


def batch(prompt=6, completion=5):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, prompt + completion), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0                       # a left-padded prompt
    segment_ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, -1], [0, 0, 0, 0, 0]])
    return input_ids, attention_mask, segment_ids


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hidden_times_head_equals_model_logits(tie, family):
    model = tiny_model(tie, family)
    input_ids, attention_mask, _ = batch()
    hidden, weight, bias = completion_hidden_states(model, input_ids, attention_mask, completion_length=5)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -6:-1]
    assert hidden.shape == (3, 5, 32) and weight.shape == (97, 32)
    assert_relative_close(hidden @ weight.T + (0 if bias is None else bias), logits, 1e-12, "logits")
    assert (weight is model.get_input_embeddings().weight) == tie


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_gradients_reach_the_model(tie):
    input_ids, attention_mask, segment_ids = batch()
    completion_ids = input_ids[:, -5:]
    advantages = torch.tensor([[0.5, -1.0, 0.0], [1.5, 0.2, -0.3], [-0.7, 0.0, 0.0]], dtype=torch.float64)
    gradients = {}
    for path in ("fused", "logits"):
        model = tiny_model(tie)
        if path == "fused":
            hidden, weight, bias = completion_hidden_states(model, input_ids, attention_mask, completion_length=5)
            loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, completion_ids, segment_ids, advantages,
                                                      bias=bias, backend="torch", chunk_size=4)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -6:-1]
            loss = sk.sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, backend="reference")
        loss.backward()
        gradients[path] = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                           if parameter.grad is not None}
    assert gradients["fused"].keys() == gradients["logits"].keys()
    assert "model.embed_tokens.weight" in gradients["fused"]
    for name, expected in gradients["logits"].items():
        assert_relative_close(gradients["fused"][name], expected, 1e-9, name)


def test_unsupported_heads_are_refused():
    model = tiny_model(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        output_projection(model)
    with pytest.raises(ValueError, match="completion_length"):
        completion_hidden_states(tiny_model(True), torch.zeros(1, 4, dtype=torch.long), completion_length=4)
