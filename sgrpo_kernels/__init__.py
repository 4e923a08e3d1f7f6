"""Fused kernels for sentence-level GRPO: per-sentence ratios, clipping, KL and group advantages.

The public API is the names below (``docs/design.md`` describes them); everything else is internal. Each is imported
on first use, so that importing the package, or its torch-free modules (``choices`` and the command line's front
end ``cli.front``), imports no torch: ``sgrpo --help`` and a mistake on its command line answer at once.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

_PUBLIC = {"Segmentation": "segmentation", "Segmenter": "segmentation", "SentenceGRPOLoss": "loss",
           "fused_linear_sentence_grpo_loss": "loss", "fused_linear_token_logprobs": "loss",
           "group_sentence_advantages": "advantages", "sentence_grpo_loss": "loss", "token_logprobs": "loss"}

try:
    __version__ = version("sgrpo-kernels")     # one version: pyproject.toml's
except PackageNotFoundError:                    # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """A public name (imported now, then kept), or a submodule, as an eager import of them would have made it."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":       # the submodule exists but needs something missing
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
