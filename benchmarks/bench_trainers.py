"""Whole training steps: stock TRL ``GRPOTrainer`` against ``SentenceGRPOTrainer`` at three levels, same completions.

    python -m benchmarks.bench_trainers --preset quick   # CPU: H=128, V in {32k, 152k}, T in {128, 512}; make bench
    python -m benchmarks.bench_trainers --preset gpu     # CUDA: H=1024, V in {32k, 152k}, T in {1k, 4k}, bf16 autocast

Trainers: ``trl`` (stock ``GRPOTrainer``), ``trl-liger`` (the same with ``use_liger_kernel=True``: Liger's Triton
layer kernels; skipped where Liger is missing or there is no GPU), and ``SentenceGRPOTrainer`` at ``level="token"``,
``"output"`` and ``"sentence"``. Every trainer trains the same Qwen2 (built from a config, seed 0, 4 layers, tied
embeddings) with the same ``GRPOConfig`` (TRL's defaults: ``loss_type="dapo"``, token-level importance sampling,
``beta=0``, gradient checkpointing, fused AdamW; one group of ``B`` answers per optimizer step) through TRL's own
``train()`` loop, for ``warmup + steps`` optimizer steps.

Generation is excluded, not timed: TRL's ``rollout_func`` hook returns one fixed batch of completion ids at every
step, the same for every trainer (drawn once from a seeded generator: words uniform over the vocabulary, a sentence
end every 16-48 tokens, EOS last), and the model's ``generate`` is replaced by a function that raises. The rewards
are fixed too: each answer's is a hash of its text (``reward_funcs``), each sentence's a hash of the sentence's
(``sentence_reward``). What reaches the loss is checked: every point records the checksum of the completion batches
that ``_prepare_inputs`` handed to ``compute_loss``, which must equal that of the fixed batch, at every trainer.

Per optimizer step (median over ``steps``, after ``warmup``), from timers around TRL's and the Trainer's own methods
(CUDA synchronised at each boundary):

- ``step_s``: wall time between the ends of consecutive optimizer steps (``on_step_end``);
- ``loss_backward_s``: ``training_step`` minus its ``_prepare_inputs``: the policy forward, the loss (with the
  drop-in's metrics pass over the LM head), the backward; split into ``forward_loss_s`` (``compute_loss``) and
  ``backward_s`` (the remainder);
- ``rest_s``: ``step_s`` minus ``loss_backward_s``: ``_prepare_inputs`` (``rollout_s``: the fixed completions
  decoded, rewards, advantages, the drop-in's segmentation), gradient clipping, AdamW, ``zero_grad``, scheduler,
  logging, data loading.

Memory: ``peak_mib``, the peak of the whole process (CPU: the resident set's high-water mark of a fresh process per
trainer and shape, libraries included) or device (CUDA: ``max_memory_allocated`` during ``train()``, the weights
included; a process per shape, Liger's points in one of their own since its kernels patch transformers' Qwen2
classes), and ``train_added_mib``, the peak during ``train()`` above what was held when ``train()`` began:
gradients, optimizer state and activations, not the weights nor the libraries. Ratios are to ``trl`` of the same run;
the issue's targets are printed as PASS/FAIL lines. Writes ``bench_trainers.{csv,png,md,json}`` into ``--out``, at the
start and after every process (a run stopped by a timeout keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_long, harness  # noqa: E402

TRAINERS = ("trl", "token", "output", "sentence", "trl-liger")
BASELINE = "trl"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, STOP = 0, 1, 2, 4          # STOP: the sentence end "." (the first ordinary word)
GENERATION = ("excluded: TRL's rollout_func returns one fixed batch of completion ids (seeded, the same for every "
              "trainer) and model.generate raises")
TIMED = ("loss + backward: training_step minus its _prepare_inputs (policy forward, loss, backward); rest: the "
         "optimizer step's wall time minus that (rewards, advantages, segmentation, clipping, AdamW, logging)")
METRICS = ("step_s", "loss_backward_s", "rest_s", "forward_loss_s", "backward_s", "rollout_s", "peak_mib",
           "train_added_mib")
# threads: CPU threads (0: torch's default); hidden, layers, heads: the model; batch: answers per optimizer step (one
# group); prompt: prompt tokens; sentence: mean sentence length; shapes: (V, T) pairs; isolate: see jobs()
PRESETS = {
    "quick": dict(device="cpu", threads=0, hidden=128, layers=4, heads=4, batch=4, prompt=32, sentence=32, warmup=1,
                  steps=2, shapes=[(32000, 128), (32000, 512), (151936, 512)], isolate="point"),
    "gpu": dict(device="cuda", threads=0, hidden=1024, layers=4, heads=16, batch=8, prompt=64, sentence=32, warmup=1,
                steps=2, shapes=[(32000, 1024), (32000, 4096), (151936, 1024), (151936, 4096)], isolate="shape"),
}


@dataclass(frozen=True)
class Point:
    """One trainer at one shape: ``batch`` answers of ``length`` tokens after a ``prompt``-token prompt, vocabulary
    ``vocab``; the model and schedule come from the preset."""

    trainer: str
    vocab: int
    length: int
    batch: int
    prompt: int
    sentence: int
    hidden: int
    layers: int
    heads: int
    warmup: int
    steps: int
    device: str
    threads: int

    @property
    def shape(self) -> tuple:
        return (self.batch, self.length, self.vocab, self.hidden)


# -- the fixed inputs: tokenizer, model, completions, rewards --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def word_tokenizer(vocab: int):
    """A fast tokenizer of exactly ``vocab`` ids: ``<pad> <bos> <eos> <unk>``, the sentence end ``"."`` (id 4) and
    words ``" w0"``, ``" w1"``, ... (no download; decodes to text such as ``" w7 w19. w3"``); built once per process
    and vocabulary (seconds at 152k)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["."] + [f" w{index}" for index in range(vocab - len(SPECIAL_TOKENS) - 1)]
    backend = Tokenizer(models.WordLevel(vocab={token: index for index, token in enumerate(SPECIAL_TOKENS + words)},
                                         unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def qwen2(point: Point):
    """The trained model: a Qwen2 from a config, fp32 weights, tied embeddings, SDPA attention, initialised on its
    device from seed 0 (the same weights for every trainer on that device)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=point.vocab, hidden_size=point.hidden, intermediate_size=4 * point.hidden,
                         num_hidden_layers=point.layers, num_attention_heads=point.heads,
                         num_key_value_heads=point.heads // 2, max_position_embeddings=point.prompt + point.length,
                         tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         attn_implementation="sdpa")
    with torch.device(point.device):
        return Qwen2ForCausalLM(config)


def fixed_completions(point: Point) -> tuple[list[int], torch.Tensor]:
    """The prompt ids ``[P]`` and the completion ids ``[B, T]`` every trainer gets (seed: the shape): words uniform
    over the vocabulary, a sentence end ``"."`` after every 16-48 words (for ``sentence=32``), EOS as the last token."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr(point.shape).encode()))
    prompt = torch.randint(STOP + 1, point.vocab, (point.prompt,), generator=generator).tolist()
    completions = torch.randint(STOP + 1, point.vocab, (point.batch, point.length), generator=generator)
    for row in completions:
        position = 0
        while True:
            position += int(torch.randint(point.sentence // 2, point.sentence * 3 // 2 + 1, (1,), generator=generator))
            if position >= point.length - 1:
                break
            row[position] = STOP
    completions[:, -1] = EOS
    return prompt, completions


def rows_checksum(completion_ids: torch.Tensor) -> str:
    """Checksum of the rows of ``completion_ids [B, T]``, whatever their order (TRL shuffles each batch)."""
    row_sums = sorted(zlib.crc32(row.numpy().astype("int64").tobytes()) for row in completion_ids.cpu())
    return f"{zlib.crc32(repr(row_sums).encode()):08x}"


def text_score(text: str) -> float:
    """A fixed reward in [0, 1) for a text: the same text scores the same at every trainer and step."""
    return zlib.crc32(text.encode()) / 2**32


def answer_reward(completions, **_):
    """``reward_funcs`` entry: one fixed score per answer."""
    return [text_score(text) for text in completions]


def sentence_reward(questions, answers, references):
    """``sentence_reward``: one fixed score per sentence."""
    return [[text_score(text) for text in sentences] for sentences in answers]


def no_generation(*args, **kwargs):
    raise RuntimeError("bench_trainers: the completions are fixed, generation must not run")


# -- timing -----------------------------------------------------------------------------------------------------------
class PhaseClock:
    """Seconds spent in named phases, summed per optimizer step, and each step's wall time (``step``); the device is
    synchronised at every boundary so that its queued work is counted where it was issued."""

    def __init__(self, device: torch.device):
        self.device, self.steps, self.current, self.last_end = device, [], defaultdict(float), None

    @contextlib.contextmanager
    def phase(self, name: str):
        harness.synchronize(self.device)
        begin = time.perf_counter()
        try:
            yield
        finally:
            harness.synchronize(self.device)
            self.current[name] += time.perf_counter() - begin

    def step_end(self) -> None:
        """At each optimizer step's end: record the step since the previous end (none for the first step)."""
        harness.synchronize(self.device)
        now = time.perf_counter()
        if self.last_end is not None:
            self.steps.append(dict(self.current, step=now - self.last_end))
        self.current, self.last_end = defaultdict(float), now


def timed_class(base):
    """``base`` (a ``GRPOTrainer`` class) with its phases on ``self.clock``: ``micro_batch`` (``training_step``),
    ``rollout`` (``_prepare_inputs``) and ``forward_loss`` (``compute_loss``); ``_prepare_inputs`` also records the
    checksum of the completions it hands to the loss (in ``rollout``: not in the loss's time)."""

    class Timed(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            with self.clock.phase("micro_batch"):
                return super().training_step(model, inputs, num_items_in_batch)

        def _prepare_inputs(self, generation_batch):
            with self.clock.phase("rollout"):
                inputs = super()._prepare_inputs(generation_batch)
                self.loss_checksums.add(rows_checksum(inputs["completion_ids"]))
            return inputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with self.clock.phase("forward_loss"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    Timed.__name__ = f"Timed{base.__name__}"
    return Timed


def step_callback(clock: PhaseClock):
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    return StepEnd()


def step_medians(steps: list[dict]) -> dict:
    """Median seconds of each reported part over the measured steps (see the module's docstring)."""
    parts = [dict(step_s=step["step"], loss_backward_s=step["micro_batch"] - step["rollout"],
                  forward_loss_s=step["forward_loss"], rollout_s=step["rollout"]) for step in steps]
    for part in parts:
        part["rest_s"] = part["step_s"] - part["loss_backward_s"]
        part["backward_s"] = part["loss_backward_s"] - part["forward_loss_s"]
    return {key: statistics.median(part[key] for part in parts) for key in parts[0]}


# -- one point --------------------------------------------------------------------------------------------------------
def build_trainer(point: Point, output_dir: str, clock: PhaseClock):
    """The trainer of ``point`` on the fixed model, completions and rewards; its ``rollout_func`` counts its calls."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from sgrpo_kernels.integrations.trl import SentenceGRPOTrainer

    tokenizer = word_tokenizer(point.vocab)
    model = qwen2(point)
    model.generate = no_generation
    prompt, completions = fixed_completions(point)
    calls = []

    def rollout(prompts, trainer):
        if len(prompts) != point.batch:
            raise ValueError(f"bench_trainers: {len(prompts)} prompts where the fixed batch has {point.batch} answers")
        calls.append(len(prompts))
        return dict(prompt_ids=[prompt] * len(prompts), completion_ids=completions.tolist(),
                    logprobs=None)

    on_gpu = point.device == "cuda"
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=point.batch, num_generations=point.batch,
                      max_completion_length=point.length, max_steps=point.warmup + point.steps, seed=0,
                      report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not on_gpu, bf16=on_gpu,
                      use_liger_kernel=point.trainer == "trl-liger")
    rows = point.warmup + point.steps
    common = dict(args=args, processing_class=tokenizer, rollout_func=rollout, callbacks=[step_callback(clock)],
                  train_dataset=datasets.Dataset.from_list([{"prompt": "fixed", "answer": ""}] * rows))
    if point.trainer in ("trl", "trl-liger"):
        trainer = timed_class(GRPOTrainer)(model, reward_funcs=[answer_reward], **common)
    elif point.trainer == "sentence":
        trainer = timed_class(SentenceGRPOTrainer)(model, sentence_reward=sentence_reward, level="sentence", **common)
    else:
        trainer = timed_class(SentenceGRPOTrainer)(model, reward_funcs=[answer_reward], level=point.trainer, **common)
    trainer.clock, trainer.loss_checksums = clock, set()
    return trainer, completions, calls


def peak_bytes(device: torch.device) -> int:
    """The peak so far: the process's resident set (CPU), the device's allocated memory since its last reset (CUDA)."""
    return harness.cpu_peak_bytes() if device.type == "cpu" else torch.cuda.max_memory_allocated(device)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block on ``count`` CPU threads (0: as many as torch chose), then restore the former count."""
    former = torch.get_num_threads()
    torch.set_num_threads(count or former)
    try:
        yield
    finally:
        torch.set_num_threads(former)


def run_point(point: Point) -> dict:
    """Train ``point``'s trainer for ``warmup + steps`` optimizer steps: the medians of the measured steps, the
    memory, the checksums of the fixed completions and of those the loss saw, the rollout calls and the loss."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")        # rollout_func is marked experimental
    device = torch.device(point.device)
    clock = PhaseClock(device)
    with tempfile.TemporaryDirectory() as output_dir, torch_threads(point.threads):
        trainer, completions, calls = build_trainer(point, output_dir, clock)
        before = peak_bytes(device) if device.type == "cpu" else 0       # the process's peak before train()
        memory = bench_long.measured(trainer.train, device)              # resets the peak, then train()
        peak = max(before, peak_bytes(device))
    steps = clock.steps[-point.steps:]
    result = dict(point=asdict(point), **step_medians(steps), samples=steps, peak_mib=peak / harness.MIB,
                  train_added_mib=memory["extra_bytes"] / harness.MIB,
                  completions_checksum=rows_checksum(completions), loss_checksums=sorted(trainer.loss_checksums),
                  rollout_calls=len(calls), training_loss=trainer.state.log_history[-1]["train_loss"])
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def child_main(points: list[dict]) -> None:
    """A fresh process: run its points in turn (a point that raises gets its error, the next ones still run) and
    print their results as the last line."""
    results = []
    for point in points:
        try:
            results.append(run_point(Point(**point)))
        except Exception as error:                  # reported in the table, not hidden
            results.append(dict(point=point, error=f"{type(error).__name__}: {error}"))
    print(json.dumps({"results": results}))


# -- the run ----------------------------------------------------------------------------------------------------------
def unavailable(trainer: str, device: str) -> str | None:
    """Why ``trainer`` cannot run on ``device`` here, or None."""
    if not all(importlib.util.find_spec(name) for name in ("trl", "datasets")):
        return "trl and datasets not installed (pip install -e '.[trl]')"
    if trainer == "trl-liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if device != "cuda":
            return "Liger's kernels (RMSNorm, SwiGLU, RoPE) are Triton GPU kernels: no driver on the CPU"
    return None


def points(preset: dict, trainers: list[str]) -> list[Point]:
    model = {key: preset[key] for key in ("batch", "prompt", "sentence", "hidden", "layers", "heads", "warmup",
                                          "steps", "device", "threads")}
    return [Point(trainer=trainer, vocab=vocab, length=length, **model)
            for vocab, length in preset["shapes"] for trainer in trainers]


def jobs(listed: list[Point], isolate: str) -> list[list[Point]]:
    """The points grouped by the process they run in: ``"point"``, a fresh process each (the CPU's peak resident set
    is a process's); ``"shape"``, one process per shape for all but Liger's points (CUDA: the peak is reset before
    each point) and one for Liger's (``use_liger_kernel`` patches transformers' Qwen2 classes for the whole process);
    ``"none"``, all in this process (the tests)."""
    if isolate == "point":
        return [[point] for point in listed]
    if isolate == "shape":
        groups = [[point for point in listed if point.shape == shape and point.trainer != "trl-liger"]
                  for shape in dict.fromkeys(point.shape for point in listed)]
        groups.append([point for point in listed if point.trainer == "trl-liger"])
        return [group for group in groups if group]
    return [listed]


def run_job(job: list[Point], isolate: str) -> list[dict]:
    """Results of one group of points, in a fresh process unless ``isolate == "none"``; a failed process gives each
    of its points its error."""
    if isolate == "none":
        return [run_point(point) for point in job]
    try:
        outcome = harness.measure_in_fresh_process("benchmarks.bench_trainers", [asdict(point) for point in job],
                                                   timeout_s=3600)
    except subprocess.TimeoutExpired:
        outcome = {"error": "timed out after 3600 s"}
    if "error" in outcome:
        return [dict(point=asdict(point), error=outcome["error"]) for point in job]
    return outcome["results"]


def point_rows(result: dict, preset_name: str) -> list[harness.Row]:
    """One CSV row per metric of a result (value None and the reason for a skipped or failed point)."""
    point = Point(**result["point"])
    dtype = "bf16-autocast" if point.device == "cuda" else "float32"
    common = dict(bench="trainers", provider=point.trainer, device=point.device, dtype=dtype, batch=point.batch,
                  length=point.length, vocab=point.vocab, hidden=point.hidden, tokens=point.batch * point.length,
                  mode=f"train_step:{preset_name}")
    return [harness.Row(**common, metric=metric, value=result.get(metric), note=_note(result))
            for metric in METRICS]


def _note(result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return f"failed: {result['error']}"[:120] if "error" in result else ""


def same_completions(results: list[dict]) -> dict[str, bool]:
    """Per shape: did every trainer that ran draw the same fixed completions, and hand them (and only them) to its
    loss?"""
    fixed, handed = defaultdict(set), defaultdict(list)
    for result in results:
        if "completions_checksum" in result:
            key = shape_label(Point(**result["point"]))
            fixed[key].add(result["completions_checksum"])
            handed[key].append(result["loss_checksums"] == [result["completions_checksum"]])
    return {key: len(fixed[key]) == 1 and all(handed[key]) for key in fixed}


def shape_label(point: Point) -> str:
    return f"B={point.batch} T={point.length} V={point.vocab} H={point.hidden}"


def _value(rows: list[harness.Row], provider: str, shape: tuple, metric: str):
    return next((row.value for row in rows if row.provider == provider and row.metric == metric
                 and _shape(row) == shape), None)


def targets(rows: list[harness.Row]) -> list[str]:
    """The issue's targets, one PASS/FAIL line each (``not judged`` where a point is missing): at ``token`` and
    ``output`` the loss + backward time at most ``trl``'s, at V = 151 936 the memory added by ``train()`` at least 3×
    below ``trl``'s; ``sentence`` at most 10 % above ``output`` in step time and in loss + backward."""
    lines = []
    for shape in dict.fromkeys(map(_shape, rows)):
        label = "B={} T={} V={} H={}".format(*shape)
        checks = [(f"{level} loss + backward ≤ 1.00× trl", level, BASELINE, "loss_backward_s", 1.0)
                  for level in ("token", "output")]
        if shape[2] == 151936:
            checks += [(f"{level} memory added by train() ≤ 1/3 of trl's", level, BASELINE, "train_added_mib", 1 / 3)
                       for level in ("token", "output")]
        checks += [("sentence step ≤ 1.10× output", "sentence", "output", "step_s", 1.1),
                   ("sentence loss + backward ≤ 1.10× output", "sentence", "output", "loss_backward_s", 1.1)]
        for text, ours, theirs, metric, limit in checks:
            mine, base = _value(rows, ours, shape, metric), _value(rows, theirs, shape, metric)
            if mine is None or not base:
                lines.append(f"not judged: {label}: {text} ({ours} or {theirs} did not run)")
                continue
            verdict = "PASS" if mine / base <= limit else "FAIL"
            lines.append(f"{verdict}: {label}: {text}: {mine / base:.2f}×")
    return lines


def markdown(rows: list[harness.Row], header: str) -> str:
    """Trainers × shapes: step, loss + backward, rest (seconds), the ratio of loss + backward to ``trl``, the
    process's peak and the memory added by ``train()`` with its ratio to ``trl``."""
    lines = [header, "", "| shape | trainer | step (s) | loss + backward (s) | rest (s) | × trl, loss + backward | "
             "peak (MiB) | added by train() (MiB) | × trl, added |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    by_point = defaultdict(dict)
    for row in rows:
        by_point[_shape(row), row.provider][row.metric] = row
    for (shape, trainer), metric in by_point.items():
        label = "B={} T={} V={} H={}".format(*shape)
        if metric["step_s"].value is None:
            lines.append(f"| {label} | {trainer} | {metric['step_s'].note} | | | | | | |")
            continue
        cells = [f"{metric['step_s'].value:.3g}", f"{metric['loss_backward_s'].value:.3g}",
                 f"{metric['rest_s'].value:.3g}", _ratio(metric["loss_backward_s"]), f"{metric['peak_mib'].value:.0f}",
                 f"{metric['train_added_mib'].value:.0f}", _ratio(metric["train_added_mib"])]
        lines.append(f"| {label} | {trainer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shape(row: harness.Row) -> tuple:
    return (row.batch, row.length, row.vocab, row.hidden)


def _ratio(row: harness.Row) -> str:
    return "–" if row.ratio_to_reference is None else f"{row.ratio_to_reference:.2f}"


def plot(rows: list[harness.Row], path: str, title: str) -> None:
    """Per shape and trainer: a bar of loss + backward with the rest stacked on it, and one of the memory added by
    ``train()``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(map(_shape, rows)))
    trainers = list(dict.fromkeys(row.provider for row in rows if row.value is not None))
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(trainers))
    for index, trainer in enumerate(trainers):
        positions = [place + index * width for place in range(len(shapes))]
        values = {metric: [_value(rows, trainer, shape, metric) or 0.0 for shape in shapes]
                  for metric in ("loss_backward_s", "rest_s", "train_added_mib")}
        bars = time_axis.bar(positions, values["loss_backward_s"], width, label=trainer)
        time_axis.bar(positions, values["rest_s"], width, bottom=values["loss_backward_s"], alpha=0.35,
                      color=bars.patches[0].get_facecolor() if bars.patches else None)
        memory_axis.bar(positions, values["train_added_mib"], width, label=trainer)
    ticks = [place + 0.4 - width / 2 for place in range(len(shapes))]
    for axis, ylabel in ((time_axis, "s per optimizer step (solid: loss + backward, pale: rest)"),
                         (memory_axis, "peak added by train() (MiB)")):
        axis.set_xticks(ticks, ["T={1}\nV={2}".format(*shape) for shape in shapes], fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    if trainers:
        time_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(results: list[dict], preset_name: str, preset: dict, out_dir: str) -> tuple[list[str], str, list]:
    """Rows with ratios to ``trl``, the target lines and the four files; returns (paths, table, target lines)."""
    rows = [row for result in results for row in point_rows(result, preset_name)]
    harness.fill_reference_ratios(rows, BASELINE)
    judged, checks = targets(rows), same_completions(results)
    device = "CUDA " + torch.cuda.get_device_name() if preset["device"] == "cuda" else "CPU"
    header = (f"{preset_name} preset, {device}; a Qwen2 (layers {preset['layers']}, hidden {preset['hidden']}), "
              f"{preset['batch']} answers of T tokens per optimizer step, median of {preset['steps']} steps after "
              f"{preset['warmup']}. Generation {GENERATION}. {TIMED}.")
    table = markdown(rows, header)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"bench_trainers.{extension}") for extension in ("csv", "png", "md", "json")]
    harness.write_csv(rows, paths[0])
    plot(rows, paths[1], f"trainers, {preset_name} preset, {device}; generation excluded (fixed completions)")
    with open(paths[2], "w") as handle:
        handle.write(table + "\n" + "\n".join(f"- {line}" for line in judged) + "\n")
    with open(paths[3], "w") as handle:
        json.dump(dict(bench="trainers", preset=preset_name, settings=preset, device=device, generation=GENERATION,
                       timed=TIMED, same_completions=checks, targets=judged, points=results,
                       rows=[asdict(row) for row in rows]), handle, indent=1)
    return paths, table, judged


def run(preset_name: str, preset: dict, trainers: list[str], out_dir: str) -> list[dict]:
    """Every trainer at every shape of the preset, in the processes ``preset["isolate"]`` asks for; the files are
    written at the start and after each process. Returns the results in the preset's order (skipped points:
    ``skipped``; failed ones: ``error``)."""
    every = points(preset, trainers)
    reasons = {point: unavailable(point.trainer, point.device) for point in every}
    done = {point: dict(point=asdict(point), skipped=why_not) for point, why_not in reasons.items() if why_not}
    results = [done[point] for point in every if point in done]
    paths, table, judged = write_outputs(results, preset_name, preset, out_dir)
    for job in jobs([point for point in every if point not in done], preset["isolate"]):
        for result in run_job(job, preset["isolate"]):
            done[Point(**result["point"])] = result
            print(describe(result), flush=True)
        results = [done[point] for point in every if point in done]
        paths, table, judged = write_outputs(results, preset_name, preset, out_dir)
    print(table)
    for shape, ok in same_completions(results).items():
        print(f"same completions at every trainer, {shape}: " + ("yes" if ok else "NO (FAILED)"))
    print("\n".join(judged))
    print("wrote " + " ".join(paths), flush=True)
    return results


def describe(result: dict) -> str:
    point = Point(**result["point"])
    if "error" in result:
        return f"{point.trainer} {shape_label(point)}: FAILED: {result['error']}"
    return (f"{point.trainer} {shape_label(point)}: step {result['step_s']:.3g} s, loss + backward "
            f"{result['loss_backward_s']:.3g} s, added by train() {result['train_added_mib']:.0f} MiB")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return []
    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device")
    return run(args.preset, preset, args.trainers, args.out)


if __name__ == "__main__":
    main()
