"""Run untrusted Python in a throw-away sandbox: bubblewrap namespaces plus resource limits.

Under ``bwrap`` the program sees a read-only root, a private ``/tmp``, its own empty working directory,
no network, its own PID namespace (everything it started dies with it), and an empty environment. On top of
that, rlimits bound its CPU time, address space, processes and file size. When the caller is root the program
runs as ``nobody`` so that the process limit holds.

The sandbox fails closed: when ``bwrap`` is missing, or cannot create its namespaces (unprivileged user
namespaces disabled), :func:`run_python` raises :class:`SandboxUnavailableError` before running anything.
Only a caller that passes ``unsafe_allow_without_sandbox=True`` gets rlimits-only execution then (with a
warning, once): the limits, the empty working directory and the empty environment remain, but the program
can read and write whatever the calling user can, open network connections and signal the user's processes.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

MAX_PROCESSES = 64
MAX_FILE_MB = 16
MAX_OUTPUT_CHARS = 1_000_000
NOBODY = 65534
PROBE_TIMEOUT_S = 30
_OPT_IN = "unsafe_allow_without_sandbox=True"
_warned_without_bwrap = False


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing or unusable, and the caller did not opt into running untrusted code without it."""


@dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def _limits(timeout_s: float, memory_mb: int):
    """The child's setup between fork and exec: rlimits, then (as root) drop to nobody."""
    def apply():
        cpu_seconds = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_MB * 2**20, MAX_FILE_MB * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    return apply


def _interpreter_mounts() -> list[str]:
    """Read-only binds for an interpreter that lives under /tmp, which the sandbox replaces by its own."""
    mounts = []
    for path in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        if path == "/tmp" or path.startswith("/tmp/"):
            mounts += ["--ro-bind", path, path]
    return mounts


def _python(*arguments: str) -> list[str]:
    # the real interpreter, not a virtualenv's link to it: -I ignores the virtualenv's packages anyway
    return [os.path.realpath(sys.executable), "-I", *arguments]


def _command(bwrap: str | None, workdir: str, program: list[str]) -> list[str]:
    """``program`` inside bubblewrap's namespaces, or bare when ``bwrap`` is None."""
    if bwrap is None:
        return program
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            *_interpreter_mounts(), "--bind", workdir, workdir, "--chdir", workdir, "--unshare-all",
            "--die-with-parent", "--clearenv", "--uid", str(NOBODY), "--gid", str(NOBODY), *program]


@functools.cache
def _bwrap_failure(bwrap: str) -> str | None:
    """Why ``bwrap`` cannot build the sandbox on this machine (its error message), or None when it can.

    Probed once per executable by starting an empty Python program in the same namespaces as real runs.
    """
    with tempfile.TemporaryDirectory(prefix="sgrpo-sandbox-probe-") as workdir:
        os.chmod(workdir, 0o777)
        try:
            probe = subprocess.run(_command(bwrap, workdir, _python("-c", "")), stdin=subprocess.DEVNULL,
                                   capture_output=True, cwd=workdir, env={}, text=True, errors="replace",
                                   timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"it did not start an empty program within {PROBE_TIMEOUT_S} s"
    if probe.returncode == 0:
        return None
    return probe.stderr.strip().rstrip(".") or f"it exited with status {probe.returncode}"


def _unavailable_reason(bwrap: str | None) -> str | None:
    """Why untrusted code cannot run under ``bwrap`` (None: not installed), with what would fix it; None when
    it can."""
    if bwrap is None:
        return ("bubblewrap (bwrap) is not installed. Install it: `apt-get install bubblewrap` (Debian, Ubuntu), "
                "`dnf install bubblewrap` (Fedora, RHEL) or your distribution's bubblewrap package.")
    failure = _bwrap_failure(bwrap)
    if failure is None:
        return None
    return (f"bubblewrap ({bwrap}) cannot create its sandbox here: {failure}. It needs unprivileged user "
            "namespaces: allow them (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04+ "
            "kernel.apparmor_restrict_unprivileged_userns=0) or run in a container that permits them.")


def require_sandbox(*, unsafe_allow_without_sandbox: bool = False) -> str | None:
    """The ``bwrap`` executable that isolates untrusted code; call it at setup to fail early.

    Raises :class:`SandboxUnavailableError` (saying how to install or enable bubblewrap) when bwrap is
    missing or cannot create its namespaces. With ``unsafe_allow_without_sandbox=True`` it returns None
    instead and warns once: the code then runs with resource limits only, without filesystem, network and
    process isolation. When bwrap works the flag changes nothing.
    """
    global _warned_without_bwrap
    bwrap = shutil.which("bwrap")
    reason = _unavailable_reason(bwrap)
    if reason is None:
        return bwrap
    if not unsafe_allow_without_sandbox:
        raise SandboxUnavailableError(f"{reason} Untrusted code only runs in the sandbox; to run it anyway with "
                                      f"resource limits only (unsafe), pass {_OPT_IN}.")
    if not _warned_without_bwrap:
        warnings.warn(f"{reason} UNSAFE ({_OPT_IN}): untrusted code runs with resource limits only, "
                      "without filesystem, network and process isolation", RuntimeWarning, stacklevel=3)
        _warned_without_bwrap = True
    return None


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5, memory_mb: int = 512,
               unsafe_allow_without_sandbox: bool = False) -> SandboxResult:
    """Run ``code`` with ``stdin`` in the sandbox; stop it after ``timeout_s`` seconds of wall time.

    Returns the exit status (negative: killed by that signal), the captured output (truncated to a
    million characters each) and whether the time ran out. Raises :class:`SandboxUnavailableError`
    before running anything when bubblewrap is missing or unusable, unless ``unsafe_allow_without_sandbox``
    is True: then the code runs with resource limits only and can reach the user's files and the network.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    bwrap = require_sandbox(unsafe_allow_without_sandbox=unsafe_allow_without_sandbox)
    with tempfile.TemporaryDirectory(prefix="sgrpo-sandbox-") as workdir:
        os.chmod(workdir, 0o777)                 # writable by the unprivileged user the program runs as
        script = os.path.join(workdir, "main.py")
        with open(script, "w") as handle:
            handle.write(code)
        os.chmod(script, 0o644)
        process = subprocess.Popen(_command(bwrap, workdir, _python(script)), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env={},
                                   start_new_session=True, preexec_fn=_limits(timeout_s, memory_mb), text=True,
                                   errors="replace")
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            timed_out = True
        finally:
            _kill_group(process)                 # anything the program left behind
    return SandboxResult(process.returncode, stdout[:MAX_OUTPUT_CHARS], stderr[:MAX_OUTPUT_CHARS], timed_out)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
