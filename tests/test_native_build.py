"""setup.py's switches for the C++ extension: skipped on request, a warning (not a failed install) without a
compiler or when the build fails, an error when SGRPO_BUILD_NATIVE=1. Nothing here compiles: the builds go to a
temporary folder and fail or stop before the compiler would run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(tmp_path, **environment):
    """``setup.py build_ext`` into ``tmp_path`` (never into the package) with ``environment`` added."""
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
               str(tmp_path / "temp")]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **environment}, capture_output=True, text=True,
                          timeout=300)


def built_files(tmp_path):
    return list((tmp_path / "lib").rglob("_native*")) if (tmp_path / "lib").exists() else []


def test_switched_off_builds_nothing(tmp_path):
    result = build(tmp_path, SGRPO_BUILD_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert built_files(tmp_path) == []


def test_without_a_compiler_the_install_goes_on_with_a_warning(tmp_path):
    result = build(tmp_path, CXX="no-such-compiler-here")
    assert result.returncode == 0, result.stderr
    assert "building without the native backend (no C++ compiler" in result.stderr
    assert built_files(tmp_path) == []


def test_required_build_without_a_compiler_is_an_error(tmp_path):
    result = build(tmp_path, CXX="no-such-compiler-here", SGRPO_BUILD_NATIVE="1")
    assert result.returncode != 0
    assert "SGRPO_BUILD_NATIVE=1 but the native extension cannot be built: no C++ compiler" in result.stderr


@pytest.mark.parametrize("required", [False, True])
def test_a_failing_compiler(tmp_path, required):
    """A compiler that fails (``false``): a warning and no extension, or with SGRPO_BUILD_NATIVE=1 an error."""
    environment = dict(CXX="false", MAX_JOBS="1")
    if required:
        environment["SGRPO_BUILD_NATIVE"] = "1"
    result = build(tmp_path, **environment)
    assert built_files(tmp_path) == []
    if required:
        assert result.returncode != 0
    else:
        assert result.returncode == 0, result.stderr
        assert "the native extension failed to build" in result.stderr


def test_bad_switch_values_are_refused(tmp_path):
    result = build(tmp_path, SGRPO_BUILD_NATIVE="yes")
    assert result.returncode != 0 and "SGRPO_BUILD_NATIVE must be 0, 1 or unset" in result.stderr
    result = build(tmp_path, SGRPO_NATIVE_ARCH="sse9")
    assert result.returncode != 0 and "SGRPO_NATIVE_ARCH must be auto" in result.stderr
