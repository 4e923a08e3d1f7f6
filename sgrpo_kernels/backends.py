"""The backend registry, kept at its old import path: it lives in :mod:`sgrpo_kernels.ops.backends`."""

from .ops.backends import (  # noqa: F401  (re-exported)
    AUTO,
    AUTO_PREFERENCE,
    Backend,
    availability,
    backend_names,
    check_backend_name,
    register_backend,
    resolve_backend,
    resolved_name,
)
