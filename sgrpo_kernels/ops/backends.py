"""The backend registry and the one resolver every public entry point uses, once per call.

A backend is a name, a module under ``ops/`` that implements ``ops.passes.Passes`` (imported only when used),
and a rule that says whether it can run on a device here. ``"reference"`` is the plain PyTorch statement of
``reference.py`` (no module: the public entry points call ``reference.py`` directly and differentiate through it).
Adding a backend means one module under ``ops/`` and one :func:`register_backend` call below.

:func:`resolve_backend` applies the ``"auto"`` rule and checks that the backend can run on the device; below the
public functions a request carries the resolved name, and :func:`backend_passes` only looks its module up.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """``unavailable(device)`` returns ``None`` when the backend can run on tensors on ``device``, else why not."""

    name: str
    summary: str
    module: str | None
    unavailable: Callable[[torch.device], str | None]

    def passes(self):
        """The backend's ``ops`` module (an ``ops.passes.Passes``); ``None`` for ``"reference"``."""
        return None if self.module is None else importlib.import_module(self.module)


_REGISTRY: dict[str, Backend] = {}
# "auto" takes the first backend of this list that can run on the device.
AUTO_PREFERENCE: list[str] = []


def register_backend(backend: Backend, *, auto_rank: int | None = None) -> None:
    """Add ``backend``; ``auto_rank`` is its place in ``AUTO_PREFERENCE`` (``None``: never chosen by "auto")."""
    _REGISTRY[backend.name] = backend
    if auto_rank is not None:
        AUTO_PREFERENCE.insert(auto_rank, backend.name)


def backend_names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts, ``"auto"`` first."""
    return (AUTO, *_REGISTRY)


def availability(device: torch.device | str) -> dict[str, str | None]:
    """For each registered backend, ``None`` if it can run on ``device`` here, else the reason it cannot."""
    device = torch.device(device)
    return {name: backend.unavailable(device) for name, backend in _REGISTRY.items()}


def resolve_backend(name: str, device: torch.device | str) -> Backend:
    """The backend (see :func:`resolved_name`) that runs for tensors on ``device``."""
    return _REGISTRY[resolved_name(name, str(device))]


@torch.compiler.assume_constant_result   # a pure function of its constant arguments: torch.compile calls it once
def resolved_name(name: str, device: str) -> str:
    """The name of the backend that runs for tensors on ``device`` when the caller asked for ``name``.

    ``"auto"``: the first of ``AUTO_PREFERENCE`` that can run there (CUDA tensors: Triton; CPU tensors: Triton
    under ``TRITON_INTERPRET=1``, else the chunked PyTorch backend). An unknown name, or one that cannot run on
    ``device``, raises ``ValueError`` listing what is available here and why the rest is not.
    """
    device = torch.device(device)
    if name == AUTO:
        for candidate in AUTO_PREFERENCE:
            if _REGISTRY[candidate].unavailable(device) is None:
                return candidate
        raise ValueError(f"no backend can run on {device}:\n{_describe(device)}")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backend_names()))}, got {name!r}; "
                         f"on {device}:\n{_describe(device)}")
    reason = _REGISTRY[name].unavailable(device)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run on {device}: {reason}. On {device}:\n{_describe(device)}")
    return name


def backend_passes(name: str):
    """The passes module of the resolved backend ``name`` (a lookup: no rule, no availability check)."""
    return _REGISTRY[name].passes()


def check_backend_name(name) -> None:
    """Raise ``ValueError`` for a name that no device would accept (checked where a module is built)."""
    if not isinstance(name, str) or name not in backend_names():
        raise ValueError(f"backend must be one of {', '.join(map(repr, backend_names()))}, got {name!r}")


def _describe(device: torch.device) -> str:
    lines = []
    for name, reason in availability(device).items():
        lines.append(f"  {name}: {'available' if reason is None else 'unavailable, ' + reason}")
    return "\n".join(lines)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (Linux only)"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return None
    if device.type == "cpu":
        return "CPU tensors need TRITON_INTERPRET=1 (the interpreter: for tests, slow); use backend='torch'"
    return f"no Triton target for {device.type} tensors"


def _any_device(device: torch.device) -> str | None:
    return None     # plain PyTorch runs wherever PyTorch does


def _native_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the C++ extension runs on CPU tensors, not {device.type}"
    from .native.extension import unavailable_reason
    return unavailable_reason()


register_backend(Backend("reference", "reference.py in plain PyTorch: the specification, differentiable in every "
                         "input, materialises [N, V] temporaries", None, _any_device))
register_backend(Backend("triton", "fused Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)",
                         "sgrpo_kernels.ops.triton", _triton_unavailable), auto_rank=0)
register_backend(Backend("torch", "the same passes in chunked PyTorch, no [N, V] fp32 temporaries",
                         "sgrpo_kernels.ops.torch", _any_device), auto_rank=1)
register_backend(Backend("native", "passes A and C in C++ (csrc/, vectorised, parallel over rows) for CPU tensors",
                         "sgrpo_kernels.ops.native", _native_unavailable), auto_rank=0)
