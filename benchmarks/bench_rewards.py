"""What model-based step rewards cost: the generative verifier's three modes and the process reward model, against
one GRPO loss step at the same batch.

    python -m benchmarks.bench_rewards --preset quick     # CPU, 1 thread, about 5 minutes
    python -m benchmarks.bench_rewards --preset gpu       # CUDA, the same shapes and a wider model

``G`` answers of ``T`` tokens split into ``S`` equal steps, scored by a fixed tiny Qwen2 built from a config with a
fixed seed (the package's character tokenizer; a 17-token judge suffix, about what the default judge template is
in a BPE vocabulary). Per scorer and shape: time (median; on the CPU the process's CPU time, which with one thread
is the wall time on an idle core whatever else runs on the machine; CUDA events on a GPU), forward calls and tokens
processed (the decoder's ``input_ids``, padding included, counted by a forward hook), the ratio to
``mode="cache"``, and the share of one GRPO step: scorer time / (scorer time + the policy's forward, fused sentence
loss and backward on the same ``G`` answers, generation not included). ``mode="batched"`` runs every step's whole
prompt (``S/2`` times the tokens of the others): at 2048 tokens the quick preset only plans its forwards and tokens.

On the CPU the quick preset makes glibc's malloc keep freed memory (``keep_freed_memory``; ``--default-malloc``
leaves it alone): by default glibc returns every freed block over 32 MB to the kernel, so each forward of a big
batch spends seconds of kernel time zeroing fresh pages, a cost of the allocator that batch-1 forwards never pay.
Writes ``bench_rewards.{csv,png,md}`` into ``--out`` and prints the paths.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sgrpo_kernels as sk  # noqa: E402
from benchmarks import harness  # noqa: E402
from sgrpo_kernels.integrations.hf import completion_hidden_states  # noqa: E402
from sgrpo_kernels.rewards import GenerativeVerifier, ProcessRewardModel  # noqa: E402
from sgrpo_kernels.trainer.tiny import CHARACTERS, char_tokenizer  # noqa: E402

JUDGE = "\nCorrect? Yes/No:"                  # 17 characters, one token each
MODES = ("one_pass", "cache", "batched")
PRESETS = {
    "quick": dict(device="cpu", threads=1, hidden=256, layers=4, heads=4, answers=16, batch_size=16,
                  shapes=[(256, 8), (256, 32), (2048, 8), (2048, 32)], repeats=1, skip={2048: ("batched",)},
                  keep_freed_memory=True),
    "gpu": dict(device="cuda", threads=0, hidden=1024, layers=8, heads=16, answers=16, batch_size=16,
                shapes=[(256, 8), (256, 32), (2048, 8), (2048, 32)], repeats=5),
}


def tiny_lm(tokenizer, preset: dict, device: torch.device):
    """The fixed scorer (and policy) model: a Qwen2 from a config, seed 0, fp32, sdpa attention, context 4096."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hidden, heads = preset["hidden"], preset["heads"]
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=preset["layers"], num_attention_heads=heads,
                         num_key_value_heads=heads // 2, max_position_embeddings=4096, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(device).eval()


def answers(count: int, length: int, steps: int, seed: int = 0) -> list[list[str]]:
    """``count`` answers of ``length`` characters (= tokens) in ``steps`` sentences of equal length."""
    generator = torch.Generator().manual_seed(seed)
    alphabet = [character for character in CHARACTERS if character not in "?\n"]
    result = []
    for _ in range(count):
        codes = torch.randint(len(alphabet), (length,), generator=generator).tolist()
        text = "".join(alphabet[code] for code in codes)
        bounds = [round(step * length / steps) for step in range(steps + 1)]
        result.append([text[bounds[step]:bounds[step + 1]] for step in range(steps)])
    return result


class ForwardCounter:
    """Forward calls of a model's decoder and the ``input_ids`` elements they took."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        model.base_model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.calls += 1
        self.tokens += kwargs.get("input_ids", args[0] if args else None).numel()

    def reset(self) -> None:
        self.calls = self.tokens = 0


def scorers(model, tokenizer, batch_size: int) -> dict:
    built = {mode: GenerativeVerifier(model, tokenizer, mode=mode, batch_size=batch_size, judge_template=JUDGE,
                                      yes="Yes", no="No") for mode in MODES}
    built["prm"] = ProcessRewardModel(model, tokenizer, step_tag="?", good_token="+", bad_token="-",
                                      batch_size=batch_size)
    return built


def grpo_step(model, tokenizer, questions, sentences, device):
    """``run()``: one policy forward, fused sentence loss and backward on the answers (prompt + completion)."""
    prompt = tokenizer.encode(questions[0])
    completions = [tokenizer.encode("".join(answer)) for answer in sentences]
    length = max(map(len, completions))
    input_ids = torch.tensor([prompt + completion + [tokenizer.pad_token_id] * (length - len(completion))
                              for completion in completions], device=device)
    segment_ids = torch.tensor([[step for step, text in enumerate(answer) for _ in text] for answer in sentences],
                               device=device)
    advantages = torch.randn(len(sentences), len(sentences[0]), generator=torch.Generator().manual_seed(1))

    def run(_):
        hidden, weight, bias = completion_hidden_states(model, input_ids, completion_length=length)
        loss = sk.fused_linear_sentence_grpo_loss(hidden, weight, input_ids[:, len(prompt):], segment_ids,
                                                  advantages.to(device), bias=bias)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def batched_plan(verifier, questions, sentences) -> tuple[int, int]:
    """``(forward calls, tokens)`` that ``mode="batched"`` would run: one prompt per step, ``batch_size`` per
    forward, each padded to the longest of its forward."""
    lengths = [len(context) + sum(map(len, steps[:step + 1])) + len(judge)
               for context, steps, judge in (verifier._pieces(question, answer)
                                             for question, answer in zip(questions, sentences))
               for step in range(len(steps))]
    chunks = [lengths[start:start + verifier.batch_size] for start in range(0, len(lengths), verifier.batch_size)]
    return len(chunks), sum(len(chunk) * max(chunk) for chunk in chunks)


def _score(scorer, questions, sentences, _state) -> None:
    scorer(questions, sentences)


def time_ms(run, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``run(None)``: CUDA events on a GPU, the process's CPU time on the CPU."""
    if device.type == "cuda":
        return harness.median_time_ms(run, device=device, repeats=repeats, warmup=0)
    samples = []
    for _ in range(repeats):
        begin = time.process_time()
        run(None)
        samples.append((time.process_time() - begin) * 1e3)
    return statistics.median(samples)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc serve every block from its heap and keep freed memory for reuse (``mallopt``:
    ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` 2 GB), as jemalloc or tcmalloc would; False where the C library has
    no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-4, 0) and mallopt(-1, 2**31 - 1))                     # M_MMAP_MAX, M_TRIM_THRESHOLD


def measure(preset: dict, device: torch.device) -> list[harness.Row]:
    """Rows of the GRPO loss step and of every scorer at every shape (``preset["skip"]``: scorers not timed at a
    length, their forward calls and tokens planned instead)."""
    tokenizer = char_tokenizer()
    model = tiny_lm(tokenizer, preset, device)
    counter = ForwardCounter(model)
    built = scorers(model, tokenizer, preset["batch_size"])
    count, repeats, rows = preset["answers"], preset["repeats"], []
    for length, steps in preset["shapes"]:
        questions, sentences = ["Compute 1 + 2."] * count, answers(count, length, steps)
        shape = dict(bench="rewards", device=device.type, dtype="float32", batch=count, length=length,
                     vocab=len(tokenizer), hidden=preset["hidden"], mode=f"S={steps}")
        model.train()
        step_ms = time_ms(grpo_step(model, tokenizer, questions, sentences, device), device, repeats)
        model.eval()
        rows.append(harness.Row(provider="grpo_loss_step", tokens=count * length, metric="time_ms", value=step_ms,
                                **shape))
        times = {}
        for name, scorer in built.items():
            if name in preset.get("skip", {}).get(length, ()):
                calls, tokens = batched_plan(scorer, questions, sentences)
                rows.append(harness.Row(provider=name, tokens=tokens, metric="time_ms", value=None,
                                        note="not timed", extra=dict(forward_calls=calls), **shape))
                continue
            scorer(questions[:1], sentences[:1])                       # warm-up
            counter.reset()
            times[name] = time_ms(functools.partial(_score, scorer, questions, sentences), device, repeats)
            calls, tokens = counter.calls // repeats, counter.tokens // repeats
            extra = dict(forward_calls=calls, share_of_step=times[name] / (times[name] + step_ms))
            rows.append(harness.Row(provider=name, tokens=tokens, metric="time_ms", value=times[name],
                                    note=f"{calls} forwards", extra=extra, **shape))
            print(f"T={length} S={steps} {name}: {times[name]:.0f} ms, {calls} forwards, {tokens} tokens", flush=True)
        for row in rows[-len(built):]:
            row.ratio_to_reference = None if row.value is None else row.value / times["cache"]
    return rows


def markdown(rows: list[harness.Row], preset: dict, device_name: str, malloc: str) -> str:
    lines = [f"G={preset['answers']} answers, batch_size={preset['batch_size']}, a Qwen2 of {preset['layers']} "
             f"layers × {preset['hidden']} (seed 0, fp32, sdpa), {device_name}"
             + (f", {preset['threads']} thread, times in process CPU time" if preset["threads"] else "")
             + f"; malloc: {malloc}.", "",
             "| T tokens | S steps | scorer | time (ms) | × cache | forward calls | tokens processed "
             "| share of a GRPO step |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row.provider == "grpo_loss_step":
            lines.append(f"| {row.length} | {row.mode[2:]} | policy forward + loss + backward | {row.value:.0f} | "
                         f"– | – | {row.tokens} | – |")
            continue
        if row.value is None:
            lines.append(f"| {row.length} | {row.mode[2:]} | {row.provider} | not timed | – | "
                         f"{row.extra['forward_calls']} (planned) | {row.tokens} (planned) | – |")
            continue
        lines.append(f"| {row.length} | {row.mode[2:]} | {row.provider} | {row.value:.0f} | "
                     f"{row.ratio_to_reference:.2f} | {row.extra['forward_calls']} | {row.tokens} | "
                     f"{row.extra['share_of_step']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[harness.Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((row.length, row.mode) for row in rows))
    providers = list(dict.fromkeys(row.provider for row in rows))
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        values = [next((row.value for row in rows if (row.length, row.mode) == shape and row.provider == provider
                        and row.value is not None), math.nan) for shape in shapes]
        axis.bar([position + index * width for position in range(len(shapes))], values, width, label=provider)
    axis.set_xticks([position + 0.4 - width / 2 for position in range(len(shapes))],
                    [f"T={length} {mode}" for length, mode in shapes])
    axis.set_yscale("log")
    axis.set_ylabel("time (ms, median)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (it returns freed blocks over 32 MB to the kernel)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(preset["device"])
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    kept = preset.get("keep_freed_memory", False) and not args.default_malloc and keep_freed_memory()
    malloc = "keeps freed memory (mallopt)" if kept else "default"
    print(f"malloc: {malloc}", flush=True)
    rows = measure(preset, device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f"bench_rewards.{extension}") for extension in ("csv", "png", "md")]
    harness.write_csv(rows, paths[0])
    plot(rows, paths[1], f"step scorers, G={preset['answers']}, {device_name}")
    table = markdown(rows, preset, device_name, malloc)
    with open(paths[2], "w") as handle:
        handle.write(table)
    print(table)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
