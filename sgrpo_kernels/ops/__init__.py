"""Kernels by backend (``triton/``, ``torch/``), the passes they implement (``passes.py``), the sentence layout
(``layout.py``) and the driver that runs them on logits or on chunks of ``hidden @ weight.T`` (``driver.py``,
``fused_linear.py``), registered as ``torch.library`` custom ops (``custom_ops.py``; the namespace and the gradient
scaling both layers use: ``library.py``)."""
