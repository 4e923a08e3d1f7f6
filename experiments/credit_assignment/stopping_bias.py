"""What long chains teach about stopping: the samples of a checkpoint and the credit its batch gives the stop.

    python experiments/credit_assignment/stopping_bias.py --checkpoint NAME=FOLDER [NAME=FOLDER ...] \
        --chain-length 16 --out experiments/credit_assignment/round3/L16/stopping-bias.md

For each checkpoint it samples ``--prompts`` training problems × ``--group-size`` answers (temperature 1, a fixed
seed: every checkpoint answers the same prompts), rewards every sentence with the chain task's step reward, and
reports

- what the answers look like: length, how many end with an ``Answer:`` line, how many run into the length limit,
  how many steps they write, how often the answer is right, and a few answers of each kind;
- the advantage of each kind of sentence (step, answer line, other) under the pooled baseline (the seed's) and
  under ``baseline="split_final"``;
- the gradient coefficient that the loss (``sentence_mean`` reduction, length-normalised sentence ratio, on-policy)
  puts on the token that decides to stop (the first token of the answer line) and on the one that decides to go on
  (the first token of a step that follows a step), ``c = −Â / (B' · S_i · n_s)``: its mean and the share of
  negative values. A policy learns to stop less where the stop's mean coefficient is positive (its log-prob is
  pushed down) and the go-on's is not.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch


def kinds_of(question: str, sentences: list[str]) -> list[str]:
    """``"answer"``, ``"step"`` (a parsable step within the question's steps) or ``"other"`` per sentence."""
    from sgrpo_kernels.trainer.tasks import chain

    return ["answer" if kind == "answer" else "step" if kind == "step" else "other"
            for kind, *_ in chain._walk(question, sentences)]


def sample(folder: str, length: int, prompts: int, group_size: int, seed: int):
    """The batch of one checkpoint: its answers' token ids, mask, segmentation, questions and references."""
    from sgrpo_kernels import Segmenter
    from sgrpo_kernels.trainer.common import generate
    from sgrpo_kernels.trainer.tasks import chain
    from sgrpo_kernels.trainer.tiny import load_pretrained

    model, tokenizer = load_pretrained(folder)
    problems = chain.make_dataset(prompts, seed=seed, length=length)
    questions = [problem.question for problem in problems]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, ids, mask = generate(model, tokenizer, questions, max_new_tokens=11 * length + 16, greedy=False,
                                   num_return_sequences=group_size)
    segmentation = Segmenter(tokenizer, "sentence")(ids, mask)
    return dict(ids=ids, mask=mask, segmentation=segmentation, eos=tokenizer.eos_token_id,
                questions=[question for question in questions for _ in range(group_size)],
                references=[problem.answer for problem in problems for _ in range(group_size)])


def report(name: str, batch: dict, length: int, group_size: int) -> list[str]:
    from sgrpo_kernels import group_sentence_advantages
    from sgrpo_kernels.trainer.tasks import chain

    segmentation, ids, mask = batch["segmentation"], batch["ids"], batch["mask"]
    answers = len(segmentation.texts)
    rewards = chain.reward(chain.ChainConfig(length=length))(batch["questions"], segmentation.texts,
                                                            batch["references"])
    kinds = [kinds_of(question, sentences) for question, sentences in zip(batch["questions"], segmentation.texts)]
    lengths = mask.sum(1)
    at_limit = ~(ids == batch["eos"]).any(1)
    ends_with_answer = [bool(row) and row[-1] == "answer" for row in kinds]
    right = [chain.is_correct("".join(sentences), reference)
             for sentences, reference in zip(segmentation.texts, batch["references"])]
    lines = [f"## {name}", "",
             f"{answers} answers: mean length {lengths.float().mean():.1f} tokens (limit {ids.shape[1]}), "
             f"{int(at_limit.sum())} at the length limit, {sum(ends_with_answer)} ending with an `Answer:` line, "
             f"{statistics.mean(row.count('step') for row in kinds):.1f} steps written on average "
             f"(the question asks {length}), {sum(right)} right answers.", "",
             "| baseline | answer lines: mean advantage (share < 0) | steps | other sentences | stop token: mean "
             "coefficient (share > 0) | go-on token: mean coefficient (share > 0) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for baseline in ("pooled", "split_final"):
        advantages = group_sentence_advantages(rewards, segmentation.num_sentences, group_size, baseline=baseline)
        by_kind = {kind: [] for kind in ("answer", "step", "other")}
        stop, go_on = [], []
        for row in range(answers):
            count = int(segmentation.num_sentences[row])
            for index, kind in enumerate(kinds[row]):
                advantage = float(advantages[row, index])
                by_kind[kind].append(advantage)
                tokens = int((segmentation.segment_ids[row] == index).sum())
                coefficient = -advantage / (answers * count * tokens)
                if kind == "answer":
                    stop.append(coefficient)
                elif kind == "step" and index > 0 and kinds[row][index - 1] == "step":
                    go_on.append(coefficient)

        def cell(values, sign=-1):
            if not values:
                return "–"
            share = sum(value * sign > 0 for value in values) / len(values)
            return f"{statistics.mean(values):+.3g} ({share:.2f})"
        lines.append(f"| {baseline} | {cell(by_kind['answer'])} | {cell(by_kind['step'])} | {cell(by_kind['other'])}"
                     f" | {cell(stop, 1)} | {cell(go_on, 1)} |")
    lines += ["", "Answers (longest, shortest, a right one where there is one):", ""]
    order = sorted(range(answers), key=lambda row: int(lengths[row]))
    shown = [order[-1], order[0]] + [row for row in range(answers) if right[row]][:1]
    for row in shown:
        text = "".join(segmentation.texts[row]).replace("\n", " ")
        lines.append(f"- `{batch['questions'][row]}` (answer {batch['references'][row]}): `{text}`")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--chain-length", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="problems and sampling (the same for every checkpoint)")
    parser.add_argument("--out", required=True, help="the Markdown report")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sections = [f"# The stop under sentence credit at L = {args.chain_length}", "",
                f"Written by `stopping_bias.py`: {args.prompts} training problems × {args.group_size} answers per "
                "checkpoint, the same problems and sampling seed for each. Advantages: group-normalised sentence "
                "rewards (output weighting, std); coefficients: `−Â / (B' · S_i · n_s)`, the gradient the loss puts "
                "on a token's log-prob (positive: pushed down).", ""]
    for pair in args.checkpoint:
        name, _, folder = pair.partition("=")
        if not name or not os.path.isdir(folder):
            raise SystemExit(f"--checkpoint takes NAME=FOLDER with a model folder, got {pair!r}")
        batch = sample(folder, args.chain_length, args.prompts, args.group_size, args.seed)
        sections += report(name, batch, args.chain_length, args.group_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
