"""Speed and memory of the sentence-level GRPO loss from logits, every provider at the same inputs.

    python -m benchmarks.bench_loss --preset quick     # CPU, about a minute
    python -m benchmarks.bench_loss --preset cpu       # CPU, the README's table (B=4, T=1024, V=32000 fp32)
    python -m benchmarks.bench_loss --preset gpu       # CUDA, V=151936, N in {4096, 16384, 65536}, bf16
    python -m benchmarks.bench_loss --preset options   # CPU, what each loss option costs (benchmarks/options.py)

Writes ``bench_loss.csv`` (one row per provider, shape, mode and metric), ``bench_loss.png`` and
``bench_loss.md`` into ``--out``. Times are medians; the floor is ``3·N·V·bytes / copy bandwidth``
(read the logits twice, write the gradient once), with the bandwidth measured in the same run.
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
from benchmarks.runner import Shape, Suite, main  # noqa: E402
from sgrpo_kernels import reference  # noqa: E402
from sgrpo_kernels.config import LossConfig  # noqa: E402

BETA = 0.04
PRESETS = {
    "quick": dict(device="cpu", shapes=[Shape(1, 512, 32000, "float32"), Shape(4, 1024, 32000, "float32")],
                  providers=["reference", "torch", "torch-inplace", "native", "native-inplace"], repeats=2,
                  memory=("full",)),
    "cpu": dict(device="cpu", shapes=[Shape(batch, 1024, 32000, dtype) for dtype in ("float32", "bfloat16")
                                      for batch in (1, 4, 8)],
                providers=["reference", "reference-compiled", "torch", "torch-inplace", "native", "native-inplace"],
                repeats=3, memory=("forward", "full")),
    "gpu": dict(device="cuda", shapes=[Shape(4, 1024, 151936, "bfloat16"), Shape(8, 2048, 151936, "bfloat16"),
                                       Shape(16, 4096, 151936, "bfloat16")],
                providers=["reference", "reference-compiled", "triton", "triton-inplace", "liger", "liger-inplace"],
                repeats=20, memory=("forward", "full")),
    "options": dict(device="cpu", shapes=[Shape(4, 1024, 32000, "float32")], providers=options.providers("torch"),
                    baseline="torch", suffix="_options", repeats=3, memory=("full",)),
    "gpu-options": dict(device="cuda", shapes=[Shape(8, 2048, 151936, "bfloat16")],
                        providers=options.providers("triton"), baseline="triton", suffix="_options", repeats=10,
                        memory=("full",)),
}


def sentence_batch(shape: Shape, device: torch.device, generator: torch.Generator) -> dict:
    """Token ids, sentences of 8..32 tokens with ~10% right padding, and per-sentence advantages."""
    batch, length = shape.batch, shape.length
    completion_ids = torch.randint(0, shape.vocab, (batch, length), generator=generator)
    sentence_lengths = torch.randint(8, 33, (batch, length), generator=generator)
    positions = torch.arange(length).expand(batch, length).contiguous()
    segment_ids = torch.searchsorted(sentence_lengths.cumsum(1), positions, right=True)
    lengths = torch.randint(int(length * 0.8), length + 1, (batch,), generator=generator)
    segment_ids[positions >= lengths[:, None]] = -1
    advantages = torch.randn(batch, int(segment_ids.max()) + 1, generator=generator)
    return dict(completion_ids=completion_ids.to(device), segment_ids=segment_ids.to(device),
                advantages=advantages.to(device))


def off_policy(logps: torch.Tensor, generator: torch.Generator) -> dict:
    """Old, reference and rollout-engine log-probs a little away from the current ones (some sentences clip),
    and rollout importance weights ``[B, T]`` near 1 (for the option variants)."""
    noise = lambda: 0.05 * torch.randn(logps.shape, generator=generator).to(logps.device)  # noqa: E731
    old = logps + noise()
    return dict(old_logps=old, ref_logps=logps + noise(), sampling_logps=old + noise(),
                is_weights=torch.exp(noise()))


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    """``logits`` is a contiguous ``[B, T, V]`` leaf, as an LM head applied to the completion positions gives
    it (``logits_to_keep``); Liger's ``[B, T + 1, V]`` copy is made by ``padded_logits`` when needed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = sentence_batch(shape, device, generator)
    inputs["logits"] = torch.randn(shape.batch, shape.length, shape.vocab, dtype=shape.torch_dtype, device=device)
    with torch.no_grad():
        logps = sk.token_logprobs(inputs["logits"], inputs["completion_ids"],
                                  backend="torch" if device.type == "cpu" else "triton")
    return inputs | off_policy(logps, generator)


@functools.lru_cache(maxsize=None)
def provider(name: str):
    """``f(inputs) -> loss`` for each provider (cached: a compiled provider compiles once)."""
    if name.startswith("reference"):
        config = LossConfig(beta=BETA)

        def eager(logits, completion_ids, segment_ids, advantages, old_logps, ref_logps):
            return reference.sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, old_logps,
                                                ref_logps, config)
        function = torch.compile(eager) if name == "reference-compiled" else eager
        return lambda inputs: function(*(inputs[key] for key in ARGUMENTS))
    if name.split("-")[0].split(":")[0] in ("torch", "triton", "native"):
        backend, variant = options.split(name.removesuffix("-inplace"))
        inplace = name.endswith("-inplace")
        return lambda inputs: sk.sentence_grpo_loss(*(inputs[key] for key in ARGUMENTS), beta=BETA, backend=backend,
                                                    inplace=inplace, **options.keywords(variant, inputs))
    if name.startswith("liger"):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        inplace = name.endswith("-inplace")

        def liger(inputs):   # token level: the same traffic, one advantage per row
            mask = (inputs["segment_ids"] >= 0).float()
            loss, _ = triton_grpo_loss(padded_logits(inputs), inputs["old_logps"], inputs["ref_logps"],
                                       inputs["completion_ids"], inputs["advantages"].mean(1), mask, temperature=1.0,
                                       beta=BETA, eps_low=0.2, eps_high=0.2, inplace=inplace, loss_type="grpo",
                                       reduce=True)
            return loss
        return liger
    raise ValueError(f"unknown provider {name!r}")


ARGUMENTS = ("logits", "completion_ids", "segment_ids", "advantages", "old_logps", "ref_logps")


def padded_logits(inputs: dict) -> torch.Tensor:
    """Liger scores ``[B, T + 1, V]`` logits (it drops the last position): a copy made once per shape."""
    if "padded_logits" not in inputs:
        logits = inputs["logits"].detach()
        inputs["padded_logits"] = torch.cat([logits, torch.randn_like(logits[:, :1])], dim=1)
    return inputs["padded_logits"]


def leaves(name: str, inputs: dict) -> list[torch.Tensor]:
    return [padded_logits(inputs) if name.startswith("liger") else inputs["logits"]]


def provider_available(name: str, device: torch.device) -> str | None:
    """None if the provider can run here, else why not."""
    if name.startswith("liger"):
        try:
            import liger_kernel.transformers.grpo_loss  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
    if name.startswith("native"):
        from sgrpo_kernels.backends import availability
        return availability(device)["native"]
    if name.startswith("triton") and device.type != "cuda":
        return "Triton kernels need CUDA (the CPU interpreter is not a speed measurement)"
    return None


def floor_ms(shape: Shape, ceilings: dict) -> float:
    """Read the logits twice, write their gradient once, at the measured copy bandwidth."""
    return 3 * shape.tokens * shape.vocab * shape.element_bytes / (ceilings["copy_gbps"] * 1e9) * 1e3


SUITE = Suite(name="loss", module="benchmarks.bench_loss", title="sentence-level GRPO loss from logits",
              floor_text="floor = 3·N·V·bytes / copy bandwidth", make_inputs=make_inputs, provider=provider,
              leaves=leaves, unavailable=provider_available, floor_ms=floor_ms,
              warm_before_memory=lambda name: name.endswith("compiled"))

if __name__ == "__main__":
    main(SUITE, PRESETS, __doc__)
