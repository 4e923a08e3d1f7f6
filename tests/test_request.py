"""One request per call: the options and inputs are checked once and the backend resolved once, above the ops, on
both paths, eager and under ``torch.compile``; the custom ops' arguments come from the request's one field list."""

import dataclasses
import sys

import pytest
import torch

import sgrpo_kernels as sk
from sgrpo_kernels import config
from sgrpo_kernels.ops import backends, request

B, T, V, H = 2, 6, 40, 8


def counted_code():
    """The code objects whose calls are counted: option validation, input checks, backend resolution."""
    return {config.LossConfig.__post_init__.__code__: "options", config.check_loss_inputs.__code__: "inputs",
            backends.resolved_name.__wrapped__.__code__ if hasattr(backends.resolved_name, "__wrapped__")
            else backends.resolved_name.__code__: "resolution"}


def count_calls(function) -> dict:
    """How often ``function()`` (and everything it runs in Python, custom ops included) calls each counted code."""
    names = counted_code()
    counts = dict.fromkeys(names.values(), 0)

    def profile(frame, event, argument):
        if event == "call" and frame.f_code in names:
            counts[names[frame.f_code]] += 1
    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return counts


def inputs():
    torch.manual_seed(0)
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 1, 1, 1, -1, -1]])
    advantages = torch.randn(B, 3, dtype=torch.float64)
    old_logps = torch.randn(B, T, dtype=torch.float64) * 0.1 - 3.0
    return hidden, weight, ids, segment_ids, advantages, old_logps


def step(path: str):
    hidden, weight, ids, segment_ids, advantages, old_logps = inputs()

    def run():
        if path == "logits":
            loss = sk.sentence_grpo_loss(hidden @ weight.T, ids, segment_ids, advantages, old_logps, backend="torch",
                                         return_metrics=True, return_token_scores=True)[0]
        else:
            loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, ids, segment_ids, advantages, old_logps,
                                                      backend="torch", chunk_size=5)
        loss.backward()
        return loss.detach()
    return run


@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_one_validation_and_one_resolution_per_eager_call(path):
    assert count_calls(step(path)) == {"options": 1, "inputs": 1, "resolution": 1}


@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_compiled_calls_check_and_resolve_at_most_once_and_never_below_the_public_function(path):
    """A call that traces runs the public function's checks at most once each (the second call traces again: the
    parameters now hold gradients); a compiled call then runs the custom op's implementation, which neither
    validates nor resolves anything."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled = torch.compile(step(path), fullgraph=True, backend="aot_eager")
            for _ in range(2):
                traced = count_calls(compiled)
                assert all(count <= 1 for count in traced.values()), traced
            assert count_calls(compiled) == {"options": 0, "inputs": 0, "resolution": 0}
    finally:
        torch._dynamo.reset()


def test_the_ops_take_the_request_as_its_generated_field_list():
    """Every op's schema ends with the request's flat fields in order; packing and unpacking are inverse; the
    backward of each op returns one gradient slot per argument."""
    names = [name for name, _, _ in request.REQUEST_FIELDS]
    options = [field.name for field in dataclasses.fields(config.LossConfig)]
    assert names[2:2 + len(options)] == options                      # the config expands in place
    for op, tensors in (("sentence_grpo_loss", 4), ("fused_linear_sentence_grpo_loss", 6), ("token_logprobs", 2),
                        ("fused_linear_token_logprobs", 4)):
        schema = getattr(torch.ops.sgrpo_kernels, op).default._schema
        assert [argument.name for argument in schema.arguments][tensors:] == names, op
    built = request.LossRequest(config=config.LossConfig(eps_low=0.1, is_mode="token_mask"), backend="native",
                                with_metrics=True, old_logps=torch.zeros(2, 3), vocab_start=7, vocab_total=40)
    packed = request.pack(built)
    assert len(packed) == request.NUM_REQUEST_ARGUMENTS
    again = request.unpack(packed)
    assert again.config == built.config and again.backend == "native" and again.vocab_start == 7
    assert again.old_logps is built.old_logps and again.tp_group is None


def test_no_option_survives_only_as_a_string():
    """The tensor-parallel shard travels as typed fields of the request, not encoded in the backend's name."""
    from sgrpo_kernels.ops import vocab_parallel

    assert not hasattr(vocab_parallel, "sharded_backend") and not hasattr(vocab_parallel, "split_backend")
    kinds = {name: schema for name, schema, _ in request.REQUEST_FIELDS}
    assert kinds["backend"] == "str" and kinds["tp_group"] == "str?" and kinds["vocab_start"] == "int"
