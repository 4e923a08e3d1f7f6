"""Offline tools of the source checkout, not shipped in the package: the Triton build check (``kernel_builds.py``:
every kernel launch of the package built by the real Triton compiler for sm_80, sm_90 and gfx942, no GPU needed)
and what it reads off the binaries (``compiled_code.py``)."""
