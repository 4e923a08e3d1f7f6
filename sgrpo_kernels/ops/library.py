"""The package's ``torch.library`` namespace, and the one op that both the custom ops and the driver use.

The loss ops (``custom_ops.py``) and the driver's eager in-place path (``driver.EagerGradient``) finish their
gradients in the forward pass; their backward only multiplies them by ``grad_output``, in place and without a
host sync (:func:`scale_gradients_`). That op lives here, below both layers, so that the driver needs nothing
from the custom ops that call it (``docs/design.md``, "Layers and layout").
"""

from __future__ import annotations

import importlib.util

import torch

NAMESPACE = "sgrpo_kernels"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _scaled_on_device(gradient: torch.Tensor) -> bool:
    """Whether the Triton kernel scales ``gradient`` (it reads the scale on the device)."""
    return gradient.is_cuda and gradient.is_contiguous() and importlib.util.find_spec("triton") is not None


def _scale_gradients(gradients: list[torch.Tensor], scale: torch.Tensor) -> None:
    # Skipped when ``scale`` is exactly 1 (the usual ``loss.backward()``), which saves a read and a write of
    # each gradient. On CUDA a Triton kernel reads the scale on the device and leaves the gradient untouched when
    # it is 1; a CPU scale is read on the host (no device sync); elsewhere the gradients are always multiplied.
    host_scale_is_one = scale.device.type == "cpu" and scale.item() == 1.0    # read once, not per gradient
    for gradient in gradients:
        if _scaled_on_device(gradient):     # triton is optional: imported only where it runs
            from .triton.scale import scale_unless_one_
            scale_unless_one_(gradient, scale)
        elif not host_scale_is_one:
            gradient.mul_(scale.to(gradient.dtype))


LIBRARY.define("scale_gradients_(Tensor(a!)[] gradients, Tensor scale) -> ()")
LIBRARY.impl("scale_gradients_", _scale_gradients, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::scale_gradients_", lambda gradients, scale: None, lib=LIBRARY)


def scale_gradients_(gradients: list[torch.Tensor], scale: torch.Tensor) -> None:
    """Multiply each gradient in place by the 0-dim ``scale`` (the ``grad_output`` of a loss)."""
    getattr(torch.ops, NAMESPACE).scale_gradients_(gradients, scale)
