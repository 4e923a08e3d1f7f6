"""Kernels by backend (``triton/``, ``torch/``, ``native/``), the passes they implement (``passes.py``), the
arithmetic they share (``sentence_math.py``), the sentence layout (``layout.py``), the driver that runs them on
logits or on chunks of ``hidden @ weight.T`` (``driver.py``, ``fused_linear.py``), the custom ops that wrap it
(``custom_ops.py``) and the backend registry (``backends.py``).

What the layer above uses is exported here and nothing else: a request (``request.py``), the entry points that run
one (``entry.py``) and the backend resolver.
"""

from .backends import AUTO, availability, backend_names, check_backend_name, resolve_backend
from .driver import LossOutputs
from .entry import (
    group_advantages,
    logprobs_on_hidden,
    logprobs_on_logits,
    loss_on_hidden,
    loss_on_logits,
    loss_on_logps,
)
from .request import LossRequest
from .vocab_parallel import vocab_shard

__all__ = ["AUTO", "LossOutputs", "LossRequest", "availability", "backend_names", "check_backend_name",
           "group_advantages", "logprobs_on_hidden", "logprobs_on_logits", "loss_on_hidden", "loss_on_logits",
           "loss_on_logps", "resolve_backend", "vocab_shard"]
