"""The ``sgrpo`` console script (pyproject.toml): the command line is parsed and checked by the torch-free front
end :mod:`sgrpo_kernels_cli`; only once every check has passed is the command run, by :mod:`sgrpo_kernels.cli`
(which imports torch). ``sgrpo bench`` runs the benchmark scripts in their own processes and imports no torch here.
"""

from __future__ import annotations

import sgrpo_kernels_cli as front


def main(argv=None) -> None:
    """Parse and check the command line, then run the command (importing torch only now)."""
    with front.usage_errors_on_stderr():
        args = front.parse_arguments(argv)
        if args.command == "bench":
            front.run_bench(args)
            return
        from sgrpo_kernels import cli

        cli.run(args)


if __name__ == "__main__":
    main()
