"""The ``sgrpo`` console script, kept at its old import path: it lives in :mod:`sgrpo_kernels.cli.console`."""

from sgrpo_kernels.cli.console import main  # noqa: F401  (re-exported)
