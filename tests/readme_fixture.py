"""The objects the README's snippets take from the reader's own code (the names in each block's
``<!-- placeholders: ... -->`` comment), built from one tiny model: ``tests/test_readme.py`` runs every snippet with
them. Run as a script, it reads a snippet and its placeholder names as JSON on stdin and executes the snippet."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch

PROMPTS, G, T = 2, 4, 24                  # 8 answers of up to 24 tokens


def build(names: list[str]) -> dict:
    """The named placeholders; the model is the package's tiny Qwen2 with its character tokenizer, the batch
    ``PROMPTS`` arithmetic questions with ``G`` answers each, sampled from it."""
    import sgrpo_kernels as sk
    from sgrpo_kernels import Segmenter
    from sgrpo_kernels.trainer.common import generate
    from sgrpo_kernels.trainer.tasks import arith
    from sgrpo_kernels.trainer.tiny import char_tokenizer, tiny_model

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=32, layers=1, heads=2)
    problems = arith.make_dataset(PROMPTS, seed=5)
    prompt_ids, prompt_mask, completion_ids, completion_mask = generate(
        model, tokenizer, [problem.question for problem in problems], max_new_tokens=T, greedy=False,
        num_return_sequences=G)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    sentences = Segmenter(tokenizer, "sentence")(completion_ids, completion_mask)
    rewards = torch.rand(len(input_ids), max(1, int(sentences.num_sentences.max())))
    with torch.no_grad():
        logits = model(input_ids).logits[:, prompt_ids.shape[1] - 1:-1]
        old_logps = sk.token_logprobs(logits, completion_ids)
    values = dict(
        model=model, tokenizer=tokenizer, verifier_model=model, verifier_tokenizer=tokenizer, prm_model=model,
        prm_tokenizer=tokenizer,
        ref_model=copy.deepcopy(model).eval(), input_ids=input_ids,
        attention_mask=torch.cat([prompt_mask, completion_mask], 1), prompt_len=prompt_ids.shape[1],
        T=completion_ids.shape[1], completion_ids=completion_ids, completion_mask=completion_mask,
        segment_ids=sentences.segment_ids, num_sentences=sentences.num_sentences, rewards=rewards,
        advantages=sk.group_sentence_advantages(rewards, sentences.num_sentences, group_size=G),
        old_logps=old_logps, ref_logps=old_logps + 0.01 * torch.randn_like(old_logps), G=G,
        questions=[problem.question for problem in problems for _ in range(G)],
        reference_answers=[problem.answer for problem in problems for _ in range(G)])
    lazy = dict(dataset=_dataset, training_options=_training_options, tp_group=_tp_group,
                logits_shard=lambda: logits.detach().clone().requires_grad_(),
                logits=lambda: logits.detach().clone().requires_grad_(),
                hidden=lambda: torch.randn(*completion_ids.shape, 32, requires_grad=True),
                weight_shard=lambda: model.get_output_embeddings().weight.detach().clone().requires_grad_())
    missing = [name for name in names if name not in values and name not in lazy]
    if missing:
        raise KeyError(f"the README names placeholders that tests/readme_fixture.py does not build: {missing}")
    return {name: values[name] if name in values else lazy[name]() for name in names}


def _dataset():
    import datasets

    from sgrpo_kernels.trainer.tasks import arith

    return datasets.Dataset.from_list([{"prompt": problem.question + "\n", "answer": problem.answer}
                                       for problem in arith.make_dataset(4, seed=4)])


def _training_options() -> dict:
    """One short CPU step of TRL's trainer."""
    return dict(max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1)


def _tp_group():
    """A tensor-parallel group of one process (the snippet's collectives then run over one rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    return dist.new_group([0])


if __name__ == "__main__":
    request = json.load(sys.stdin)
    namespace = {"__name__": "__readme__", **build(request["names"])}
    os.chdir(request["cwd"])
    exec(compile(request["code"], "README.md block", "exec"), namespace)
    trainer = namespace.get("trainer")
    logged = sorted({key for record in getattr(getattr(trainer, "state", None), "log_history", []) for key in record})
    print(json.dumps({"ran": True, "logged": logged}))
