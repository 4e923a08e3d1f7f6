"""Whether the C++ extension was built, and loading it (which registers ``torch.ops.sgrpo_native``)."""

from __future__ import annotations

import functools
import importlib

HOW_TO_BUILD = ("build it with `pip install --no-build-isolation -e .` (or `make test`), which needs a C++ "
                "compiler; SGRPO_BUILD_NATIVE=1 makes a failed build an error")


@functools.lru_cache(maxsize=None)
def _import():
    try:
        return importlib.import_module("sgrpo_kernels._native"), None
    except ImportError as error:
        return None, str(error)


def unavailable_reason() -> str | None:
    """``None`` when the extension imports, else why not and how to build it."""
    module, error = _import()
    if module is not None:
        return None
    return f"the C++ extension sgrpo_kernels._native is not built ({error}); {HOW_TO_BUILD}"


def load():
    """The extension module; raises ``RuntimeError`` saying how to build it when it is missing."""
    module, _ = _import()
    if module is None:
        raise RuntimeError(unavailable_reason())
    return module


def instruction_set() -> str | None:
    """What the build targeted (``avx2``, ``avx512``, ``neon``, ``scalar``), or ``None`` if not built."""
    module, _ = _import()
    return None if module is None else module.instruction_set()
