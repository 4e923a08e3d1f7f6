"""The ``sgrpo`` console script (pyproject.toml): the command line is parsed and checked by the torch-free front
end :mod:`sgrpo_kernels.cli.front`; only once every check has passed is the command run, by
:func:`sgrpo_kernels.cli.run` (whose commands import torch). ``sgrpo bench`` runs the benchmark scripts in their own
processes and imports no torch here.
"""

from __future__ import annotations

from . import front


def main(argv=None) -> None:
    """Parse and check the command line, then run the command (importing torch only now)."""
    with front.usage_errors_on_stderr():
        args = front.parse_arguments(argv)
        if args.command == "bench":
            front.run_bench(args)
            return
        from . import run

        run(args)


if __name__ == "__main__":
    main()
