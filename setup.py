"""Build entry point. Metadata lives in pyproject.toml; this file adds the optional C++ extension (csrc/).

The extension ``sgrpo_kernels._native`` (the ``backend="native"`` passes for CPU tensors) is built with
``torch.utils.cpp_extension`` and ninja when PyTorch and a C++ compiler are present at build time, which needs
``pip install --no-build-isolation`` (an isolated build has no torch; it would have to download one). Switches:

    SGRPO_BUILD_NATIVE=0        skip the extension (pure Python install)
    SGRPO_BUILD_NATIVE=1        a failed or impossible build is an error (default: warn and install without it)
    SGRPO_NATIVE_ARCH=auto      vector instructions: auto (the widest of AVX-512 and AVX2 this machine has, NEON
                                on ARM, else scalar), avx2, avx512 or scalar (a portable build)
    MAX_JOBS=N                  parallel compile jobs (ninja), as for PyTorch's own extensions
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import warnings

from setuptools import setup

SOURCES = ["csrc/ops.cpp", "csrc/sentence_passes.cpp", "csrc/group_advantages.cpp", "csrc/bindings.cpp"]
ARCH_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "scalar": [],
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch() -> str:
    choice = os.environ.get("SGRPO_NATIVE_ARCH", "auto")
    if choice not in ("auto", *ARCH_FLAGS):
        raise SystemExit(f"SGRPO_NATIVE_ARCH must be auto, {', '.join(ARCH_FLAGS)}; got {choice!r}")
    if choice != "auto":
        return choice
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64") and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "avx512"
    if machine in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"          # ARM builds get NEON from at::vec without flags


def _native_extension(required: bool):
    """``(ext_modules, cmdclass)`` for the extension, or ``([], {})`` with a warning when it cannot be built."""
    def give_up(why: str):
        if required:
            raise SystemExit(f"SGRPO_BUILD_NATIVE=1 but the native extension cannot be built: {why}")
        warnings.warn(f"sgrpo_kernels: building without the native backend ({why}); backend='native' will say "
                      "how to build it", stacklevel=1)
        return [], {}

    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return give_up("torch is not importable at build time (pip builds in isolation: use "
                       "pip install --no-build-isolation)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        return give_up(f"no C++ compiler ({compiler!r} not found)")
    arch = _arch()
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-Wno-unknown-pragmas", *ARCH_FLAGS[arch]]
    link_flags = []
    if sys.platform.startswith("linux"):     # at::parallel_for is OpenMP in PyTorch's Linux builds: without the flag
        flags.append("-fopenmp")            # its header compiles to a serial loop
        link_flags.append("-fopenmp")
    extension = CppExtension("sgrpo_kernels._native", SOURCES, extra_compile_args={"cxx": flags},
                             extra_link_args=link_flags)

    class BuildNative(BuildExtension):
        """A failed build warns and installs without the extension unless SGRPO_BUILD_NATIVE=1."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 (any compiler failure)
                if required:
                    raise
                warnings.warn(f"sgrpo_kernels: the native extension failed to build ({error}); installing without "
                              "it", stacklevel=1)

    return [extension], {"build_ext": BuildNative.with_options(use_ninja=shutil.which("ninja") is not None)}


def main() -> None:
    switch = os.environ.get("SGRPO_BUILD_NATIVE", "auto")
    if switch not in ("0", "1", "auto"):
        sys.exit(f"SGRPO_BUILD_NATIVE must be 0, 1 or unset; got {switch!r}")
    ext_modules, cmdclass = ([], {}) if switch == "0" else _native_extension(required=switch == "1")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
