"""The command line's front end, kept at its old import path: it lives in :mod:`sgrpo_kernels.cli.front` (the
``sgrpo`` command is one package, :mod:`sgrpo_kernels.cli`)."""

from sgrpo_kernels.cli.front import (  # noqa: F401  (re-exported)
    CHAIN_DEFAULTS,
    TASKS,
    UsageError,
    build_parser,
    chain_data_name,
    check_arguments,
    data_plan,
    parse_arguments,
    parse_step_scorer,
    usage_errors_on_stderr,
)
