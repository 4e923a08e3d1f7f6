"""``torch.compile(fullgraph=True)`` of a training step through every public loss and log-prob function: the
custom ops (``ops/custom_ops.py``) keep the graph whole and give what eager mode gives, gradients included."""

import os
import shutil

import pytest
import torch
from cases import native_unavailable

import sgrpo_kernels as sk
from sgrpo_kernels.ops import custom_ops

B, T, V, H = 2, 6, 40, 8
ENTRY_POINTS = ["sentence_grpo_loss", "sentence_grpo_loss_inplace", "fused_linear_sentence_grpo_loss",
                "token_logprobs", "fused_linear_token_logprobs", "module"]


@pytest.fixture(autouse=True)
def trace_backward():
    # Dynamo traces loss.backward() into the graph only with this switch (PyTorch's, off by default).
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def tiny_step(entry_point: str, backend: str):
    """A model (embedding, then a bias-free LM head) and a step ``loss = f(model(x)); loss.backward()``."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(V, H).double()
    head = torch.nn.Linear(H, V, bias=False).double()
    ids = torch.randint(0, V, (B, T))
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 1, 1, 1, -1, -1]])
    advantages = torch.randn(B, 3, dtype=torch.float64)
    old_logps = torch.randn(B, T, dtype=torch.float64) * 0.1 - 3.0
    ref_logps = torch.randn(B, T, dtype=torch.float64) * 0.1 - 3.0
    options = dict(backend=backend, beta=0.1, eps_low=0.1, ratio_level="mean")
    module = sk.SentenceGRPOLoss(**options)

    def loss_of(hidden):
        if entry_point == "sentence_grpo_loss":
            return sk.sentence_grpo_loss(head(hidden), ids, segment_ids, advantages, old_logps, ref_logps, **options)
        if entry_point == "sentence_grpo_loss_inplace":   # compiled: the gradient goes to a new buffer
            return sk.sentence_grpo_loss(head(hidden), ids, segment_ids, advantages, old_logps, ref_logps,
                                         inplace=True, **options)
        if entry_point == "module":
            return module(head(hidden), ids, segment_ids, advantages, old_logps, ref_logps)
        if entry_point == "fused_linear_sentence_grpo_loss":
            return sk.fused_linear_sentence_grpo_loss(hidden, head.weight, ids, segment_ids, advantages, old_logps,
                                                      ref_logps, chunk_size=5, **options)
        if entry_point == "token_logprobs":
            logp, entropy = sk.token_logprobs(head(hidden), ids, temperature=0.7, return_entropy=True,
                                              backend=backend)
            return (logp * old_logps).sum() + entropy.sum()
        return (sk.fused_linear_token_logprobs(hidden, head.weight, ids, temperature=0.7, chunk_size=5,
                                               backend=backend) * old_logps).sum()

    def step():
        loss = loss_of(embedding(ids))
        loss.backward()
        return loss.detach()

    parameters = (embedding.weight, head.weight)
    return step, parameters


def run(step, parameters):
    for parameter in parameters:
        parameter.grad = None
    loss = step()
    return loss, [parameter.grad.clone() for parameter in parameters]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_fullgraph_step_equals_eager_torch_backend(entry_point):
    step, parameters = tiny_step(entry_point, "torch")
    eager_loss, eager_grads = run(step, parameters)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = run(compiled, parameters)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-15)
    assert all(grad.abs().sum() > 0 for grad in eager_grads)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor builds C++ for the CPU and needs a C++ compiler (none here)")
def test_fullgraph_step_with_inductor_and_an_optimizer():
    """Inductor generates code for the rest of the graph; the optimizer step runs after (PyTorch's own
    ``Optimizer.step`` breaks a full graph on purpose), and two steps match eager training."""
    step, parameters = tiny_step("sentence_grpo_loss", "torch")
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for function in (step, compiled):
        initial = [parameter.detach().clone() for parameter in parameters]
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        losses = []
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            losses.append(function())
            optimizer.step()
        results.append((torch.stack(losses), [parameter.detach().clone() for parameter in parameters]))
        with torch.no_grad():
            for parameter, value in zip(parameters, initial):
                parameter.copy_(value)
    (eager_losses, eager_parameters), (compiled_losses, compiled_parameters) = results
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-12, atol=0)
    assert not torch.equal(eager_losses[0], eager_losses[1])     # the first step changed the model
    for compiled_parameter, eager_parameter in zip(compiled_parameters, eager_parameters):
        torch.testing.assert_close(compiled_parameter, eager_parameter, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("entry_point", ["sentence_grpo_loss", "fused_linear_sentence_grpo_loss", "token_logprobs"])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_fullgraph_step_equals_eager_kernel_backends(entry_point, backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="the Triton backend needs triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    elif native_unavailable() is not None:
        pytest.skip(native_unavailable())
    step, parameters = tiny_step(entry_point, backend)
    eager_loss, eager_grads = run(step, parameters)
    compiled_loss, compiled_grads = run(torch.compile(step, fullgraph=True, backend="aot_eager"), parameters)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-15)


def test_every_public_function_is_one_custom_op_in_the_graph():
    """The graph dynamo captures holds our ops as single nodes (no graph break, nothing traced inside)."""
    step, _ = tiny_step("fused_linear_sentence_grpo_loss", "torch")
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    torch.compile(step, fullgraph=True, backend=record)()
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert any("sgrpo_kernels.fused_linear_sentence_grpo_loss" in target for target in targets), targets


def test_backward_scales_on_device_tensors_without_reading_the_scale_on_the_host():
    """A device scale (here ``meta``, where ``.item()`` is impossible) is never read on the host."""
    gradient = torch.empty(4, 3, device="meta")
    custom_ops.scale_gradients_([gradient], torch.tensor(2.0, device="meta"))
