"""Test setup: Triton kernels run on the CPU through the interpreter unless a CUDA device is used."""

import os

# Must be set before triton is imported anywhere; `make test` sets it too.
os.environ.setdefault("TRITON_INTERPRET", "1")
