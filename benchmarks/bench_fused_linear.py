"""Speed and memory of the loss from hidden states and the LM head (the fused linear path), every provider.

    python -m benchmarks.bench_fused_linear --preset quick   # CPU, about a minute
    python -m benchmarks.bench_fused_linear --preset cpu     # CPU, the README's table (B=4, T=1024, H=512, V=32000)
    python -m benchmarks.bench_fused_linear --preset gpu     # CUDA, H=4096, V=151936, N in {4096, 16384}, bf16
    python -m benchmarks.bench_fused_linear --preset options # CPU, what each loss option costs

Providers: ``reference`` (materialise ``hidden @ weight.T``, then reference.py), ``torch`` / ``triton`` (this
package's fused linear path), ``liger`` (Liger-Kernel's ``LigerFusedLinearGRPOLoss``, token level, compiled as
it ships), ``trl-chunked`` (TRL 1.16's own path: its chunked log-prob kernel ``ChunkedLogProbFunction`` on the
LM head, with the vocabulary tile TRL uses, then its default loss in PyTorch: ``loss_type="dapo"`` at the token
level, the KL bias-corrected), ``matmuls`` (the path's three products chunk by chunk and nothing else: what
the matmul library reaches at these shapes, below which no fused path can go). The floor is
``6·N·H·V flops / matmul rate`` (logits, gradient of hidden, gradient of the weight) with the rate of a square
matmul measured in the same run. Writes ``bench_fused_linear.{csv,png,md}`` into ``--out``.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgrpo_kernels as sk  # noqa: E402
from benchmarks import options  # noqa: E402
from benchmarks.bench_loss import BETA, off_policy, sentence_batch  # noqa: E402
from benchmarks.runner import Shape, Suite, main  # noqa: E402
from sgrpo_kernels import reference  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402
from sgrpo_kernels.ops.fused_linear import _LinearHead, default_chunk_size  # noqa: E402

PRESETS = {
    "quick": dict(device="cpu", shapes=[Shape(4, 1024, 32000, "float32", 512)],
                  providers=["reference", "torch", "native", "trl-chunked", "matmuls"], repeats=1, memory=("full",)),
    "cpu": dict(device="cpu", shapes=[Shape(4, 512, 32000, "float32", 512), Shape(4, 1024, 32000, "float32", 512),
                                      Shape(4, 2048, 32000, "float32", 512)],
                providers=["reference", "torch", "native", "liger", "trl-chunked", "matmuls"], repeats=3,
                memory=("full",)),
    "gpu": dict(device="cuda", shapes=[Shape(2, 2048, 151936, "bfloat16", 4096),
                                       Shape(8, 2048, 151936, "bfloat16", 4096)],
                providers=["reference", "triton", "liger", "trl-chunked"], repeats=10, memory=("forward", "full")),
    "options": dict(device="cpu", shapes=[Shape(4, 1024, 32000, "float32", 512)],
                    providers=options.providers("torch"), baseline="torch", suffix="_options", repeats=2,
                    memory=("full",)),
    "gpu-options": dict(device="cuda", shapes=[Shape(8, 2048, 151936, "bfloat16", 4096)],
                        providers=options.providers("triton"), baseline="triton", suffix="_options", repeats=10,
                        memory=("full",)),
}
ARGUMENTS = ("completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    """Hidden states ``[B, T, H]`` and an LM head ``[V, H]`` scaled so that logits have unit variance."""
    generator = torch.Generator().manual_seed(seed)
    inputs = sentence_batch(shape, device, generator)
    inputs["hidden"] = torch.randn(shape.batch, shape.length, shape.hidden, dtype=shape.torch_dtype, device=device)
    inputs["weight"] = torch.randn(shape.vocab, shape.hidden, dtype=shape.torch_dtype, device=device)
    inputs["weight"] /= shape.hidden ** 0.5
    with torch.no_grad():
        logps = sk.fused_linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["completion_ids"],
                                               backend="torch" if device.type == "cpu" else "triton")
    return inputs | off_policy(logps, generator)


@functools.lru_cache(maxsize=None)
def provider(name: str):
    """``f(inputs) -> loss`` for each provider (cached: Liger's compiled chunk function compiles once)."""
    if name == "reference":
        config = LossConfig(beta=BETA)
        return lambda inputs: reference.sentence_grpo_loss(inputs["hidden"] @ inputs["weight"].T,
                                                           *(inputs[key] for key in ARGUMENTS), config)
    if name.split(":")[0] in ("torch", "triton", "native"):
        backend, variant = options.split(name)
        return lambda inputs: sk.fused_linear_sentence_grpo_loss(inputs["hidden"], inputs["weight"],
                                                                 *(inputs[key] for key in ARGUMENTS), beta=BETA,
                                                                 backend=backend, **options.keywords(variant, inputs))
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        module = LigerFusedLinearGRPOLoss(beta=BETA, loss_type="grpo", importance_sampling_level="token")

        def liger(inputs):   # token level: the same matmuls, one advantage per row
            mask = (inputs["segment_ids"] >= 0).float()
            loss, _ = module(inputs["hidden"], inputs["weight"], inputs["completion_ids"], mask,
                             inputs["advantages"].mean(1), ref_per_token_logps=inputs["ref_logps"],
                             old_per_token_logps=inputs["old_logps"])
            return loss
        return liger
    if name == "trl-chunked":
        return trl_chunked_dapo
    if name == "matmuls":
        return lambda inputs: _ProductsOnly.apply(inputs["hidden"], inputs["weight"])
    raise ValueError(f"unknown provider {name!r}")


class _ProductsOnly(torch.autograd.Function):
    """The fused linear path's three products at its own chunk shapes and nothing else (no softmax, no loss):
    the floor this machine's matmul library actually reaches at these shapes. The chunk's logits stand in for
    their gradient."""

    @staticmethod
    def forward(ctx, hidden, weight):
        chunk = default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
        head = _LinearHead(hidden, weight, None, (True, True, False))
        for tokens in torch.arange(hidden.shape[0] * hidden.shape[1], device=hidden.device).split(chunk):
            rows, logits = head.logits(tokens)
            head.accumulate(tokens, rows, logits)
        grad_hidden, grad_weight, _ = head.gradients()
        ctx.save_for_backward(grad_hidden.view_as(hidden), grad_weight)
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output


TRL_VOCAB_TILE = 32768      # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def trl_chunked_dapo(inputs: dict) -> torch.Tensor:
    """TRL 1.16's fused-LM-head path: ``ChunkedLogProbFunction`` for the log-probs, then the arithmetic of its
    ``_compute_loss`` for its defaults (``loss_type="dapo"``, token level, ``use_bias_correction_kl=True``,
    one advantage per answer), normalised by the batch's scored tokens."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight = inputs["hidden"], inputs["weight"]
    batch, length, width = hidden.shape
    mask = inputs["segment_ids"] >= 0
    logp = ChunkedLogProbFunction.apply(hidden[mask], weight, None, inputs["completion_ids"][mask], 1.0,
                                        TRL_VOCAB_TILE, None, 1.0, ())[0]
    advantage = inputs["advantages"].mean(1, keepdim=True).expand(batch, length)[mask]
    ratio = torch.exp(logp - inputs["old_logps"][mask])
    per_token = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
    ref_minus_logp = inputs["ref_logps"][mask] - logp
    per_token = per_token + BETA * (torch.exp(ref_minus_logp) - ref_minus_logp - 1) * ratio
    return per_token.sum() / mask.sum().clamp(min=1)


def leaves(name: str, inputs: dict) -> list[torch.Tensor]:
    return [inputs["hidden"], inputs["weight"]]


def provider_available(name: str, device: torch.device) -> str | None:
    if name == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    if name == "trl-chunked":
        try:
            import trl.kernels.chunked_logprob  # noqa: F401
        except ImportError:
            return "trl >= 1.16 not installed"
    if name.split(":")[0] == "native":
        from sgrpo_kernels.backends import availability
        return availability(device)["native"]
    if name.split(":")[0] == "triton" and device.type != "cuda":
        return "Triton kernels need CUDA (the CPU interpreter is not a speed measurement)"
    return None


def floor_ms(shape: Shape, ceilings: dict) -> float:
    """Three matmuls of N·H·V multiply-adds (logits, grad of hidden, grad of weight) at the measured rate."""
    return 6 * shape.tokens * shape.hidden * shape.vocab / (ceilings["matmul_tflops"] * 1e12) * 1e3


SUITE = Suite(name="fused_linear", module="benchmarks.bench_fused_linear",
              title="sentence-level GRPO loss from hidden states and the LM head",
              floor_text="floor = 6·N·H·V flops / matmul rate", make_inputs=make_inputs, provider=provider,
              leaves=leaves, unavailable=provider_available, floor_ms=floor_ms,
              warm_before_memory=lambda name: name == "liger", needs_matmul_rate=True)

if __name__ == "__main__":
    main(SUITE, PRESETS, __doc__)
