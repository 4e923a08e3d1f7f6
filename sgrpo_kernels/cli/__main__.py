"""``python -m sgrpo_kernels.cli``: the ``sgrpo`` command in this process."""

from . import main

main()
