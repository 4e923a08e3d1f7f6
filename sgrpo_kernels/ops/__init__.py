"""Kernel families (one module each): Triton kernels, their launchers and autograd Functions."""
