"""Sentence-level GRPO on random data: sentence rewards -> group advantages -> loss -> gradient.

Run with `make demo-loss` (or `python examples/demo_loss.py`). Prints the loss, its gradient norm and the metrics
(clip fraction first).
"""

import argparse

import torch

import sgrpo_kernels as sk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="number of prompts")
    parser.add_argument("--group-size", type=int, default=4, help="sampled answers per prompt (G)")
    parser.add_argument("--length", type=int, default=96, help="completion tokens per answer (T)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (V)")
    parser.add_argument("--backend", default="auto", help="auto, reference, triton, torch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    batch, length, vocab = args.prompts * args.group_size, args.length, args.vocab
    # Sentences of 4..16 tokens, answers of different lengths, right padding marked -1.
    sentence_lengths = torch.randint(4, 17, (batch, length))
    boundaries = torch.cumsum(sentence_lengths, dim=1)
    positions = torch.arange(length)
    segment_ids = torch.stack([torch.searchsorted(row, positions, right=True) for row in boundaries])
    answer_lengths = torch.randint(length // 2, length + 1, (batch,))
    segment_ids[positions[None, :] >= answer_lengths[:, None]] = -1
    num_sentences = segment_ids.amax(1) + 1
    max_sentences = int(num_sentences.max())

    # One composite reward per sentence (here random in [0, 1]), normalised within each group of G answers.
    rewards = torch.rand(batch, max_sentences)
    advantages = sk.group_sentence_advantages(rewards, num_sentences, args.group_size)

    logits = torch.randn(batch, length, vocab, requires_grad=True)
    completion_ids = torch.randint(0, vocab, (batch, length))
    with torch.no_grad():   # a slightly stale sampling policy, so that some sentences clip
        old_logps = sk.token_logprobs(logits, completion_ids) + 0.05 * torch.randn(batch, length)

    loss, metrics = sk.sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, old_logps,
                                          backend=args.backend, return_metrics=True)
    loss.backward()
    print(f"batch {batch} answers x {length} tokens, vocab {vocab}, "
          f"{int(metrics['num_sentences'])} sentences, {int(metrics['num_tokens'])} scored tokens")
    print(f"loss           {loss.item():+.6f}")
    print(f"clip fraction  {metrics['clip_fraction'].item():.3f}")
    print(f"ratio mean     {metrics['ratio_mean'].item():.4f}")
    print(f"entropy mean   {metrics['entropy_mean'].item():.4f}")
    print(f"|grad logits|  {logits.grad.norm().item():.6f}")


if __name__ == "__main__":
    main()
