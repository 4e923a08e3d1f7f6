"""Test setup: without a CUDA device, Triton kernels run on the CPU through the interpreter."""

import os

import torch

# Must be set before any Triton kernel is defined; `make test` sets it too. With a CUDA device
# (the GPU suite) the kernels run for real on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
