"""Sentence-level GRPO with the vocabulary sharded over a tensor-parallel group (Megatron's layout).

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                 # CPU (gloo), checks against 1 process
    torchrun --nproc-per-node 4 examples/tensor_parallel.py --vocab 128000 --no-check    # memory per rank
    torchrun --nproc-per-node 8 examples/tensor_parallel.py --device cuda   # GPUs (nccl)

Each rank holds only its contiguous slice of the vocabulary: the logits ``[B, T, V / tp]`` (or the LM head rows
``[V / tp, H]`` with ``--fused``). The loss is the same on every rank, each rank's gradient is that of its shard,
and the ranks exchange 4 floats per token. Prints each rank's shard, the loss, and its peak resident memory
(CPU) or peak allocated memory (CUDA) above what the process held before the inputs were made.
"""

from __future__ import annotations

import argparse
import os
import resource

import torch
import torch.distributed as dist

import sgrpo_kernels as sk


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="answers per rank")
    parser.add_argument("--length", type=int, default=512, help="tokens per answer")
    parser.add_argument("--vocab", type=int, default=32000, help="the whole vocabulary V")
    parser.add_argument("--hidden", type=int, default=256, help="H, for --fused")
    parser.add_argument("--fused", action="store_true", help="shard the LM head instead of the logits")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with one process holding the whole vocabulary (needs the full logits)")
    return parser.parse_args()


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10      # KiB on Linux


def main():
    args = parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    shard = args.vocab // world + (1 if rank < args.vocab % world else 0)
    start = sum(args.vocab // world + (1 if r < args.vocab % world else 0) for r in range(rank))
    generator = torch.Generator().manual_seed(0)
    batch, length = args.batch, args.length
    completion_ids = torch.randint(0, args.vocab, (batch, length), generator=generator)
    segment_ids = (torch.arange(length) // 32).expand(batch, length).contiguous()
    advantages = torch.randn(batch, (length + 31) // 32, generator=generator)
    inputs = [tensor.to(device) for tensor in (completion_ids, segment_ids, advantages)]
    baseline = peak_mib(device)

    if args.fused:
        hidden = torch.randn(batch, length, args.hidden, generator=generator).to(device)
        head = torch.Generator().manual_seed(1)          # the same head on every rank, each keeps its rows
        weight = (torch.randn(args.vocab, args.hidden, generator=head) / args.hidden ** 0.5)
        local = weight[start:start + shard].to(device).requires_grad_()
        with torch.no_grad():        # the sampling policy's log-probs, from the sharded head too
            old_logps = sk.fused_linear_token_logprobs(hidden, local, inputs[0], tp_group=dist.group.WORLD)
        old_logps += 0.1 * torch.randn(batch, length, generator=generator).to(device)
        hidden.requires_grad_()
        loss = sk.fused_linear_sentence_grpo_loss(hidden, local, *inputs, old_logps, tp_group=dist.group.WORLD)
        loss.backward()
        if args.check:
            full = weight.to(device).requires_grad_()
            expected = sk.fused_linear_sentence_grpo_loss(hidden.detach(), full, *inputs, old_logps)
            expected.backward()
            assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
            assert torch.allclose(local.grad, full.grad[start:start + shard], rtol=1e-4, atol=1e-7)
    else:
        if args.check:      # every rank makes the full logits to compare with; the run itself uses its slice
            full = torch.randn(batch, length, args.vocab, generator=torch.Generator().manual_seed(2)).to(device)
            logits = full[..., start:start + shard].clone().requires_grad_()
        else:               # only this rank's slice ever exists
            rows = torch.Generator().manual_seed(2 + rank)
            logits = torch.randn(batch, length, shard, generator=rows).to(device).requires_grad_()
        with torch.no_grad():        # the sampling policy's log-probs, from the shards too
            old_logps = sk.token_logprobs(logits, inputs[0], tp_group=dist.group.WORLD)
        old_logps += 0.1 * torch.randn(batch, length, generator=generator).to(device)
        loss = sk.sentence_grpo_loss(logits, *inputs, old_logps, tp_group=dist.group.WORLD)
        loss.backward()
        if args.check:
            whole = full.requires_grad_()
            expected = sk.sentence_grpo_loss(whole, *inputs, old_logps)
            expected.backward()
            assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
            assert torch.allclose(logits.grad, whole.grad[..., start:start + shard], rtol=1e-4, atol=1e-9)
    print(f"rank {rank}/{world}: vocabulary [{start}, {start + shard}) loss {loss.item():.6f} "
          f"peak memory above the start {peak_mib(device) - baseline:.0f} MiB"
          + (" (equal to one process with the whole vocabulary)" if args.check else ""), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
