"""Run untrusted Python in a throw-away sandbox: bubblewrap namespaces plus resource limits.

Under ``bwrap`` the program sees a read-only root, a private ``/tmp``, its own empty working directory,
no network, its own PID namespace (everything it started dies with it), and an empty environment. The
rlimits (CPU time, address space, processes, file size) apply with or without ``bwrap``; without it a
warning is issued once and only the limits, the empty directory and the empty environment remain.
When the caller is root the program runs as ``nobody`` so that the process limit holds.
"""

from __future__ import annotations

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
_warned_without_bwrap = False


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


def _command(workdir: str, script: str) -> list[str]:
    global _warned_without_bwrap
    # the real interpreter, not a virtualenv's link to it: -I ignores the virtualenv's packages anyway
    python = [os.path.realpath(sys.executable), "-I", script]
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if not _warned_without_bwrap:
            warnings.warn("bubblewrap (bwrap) is not installed: untrusted code runs with resource limits only, "
                          "without filesystem, network and process isolation", RuntimeWarning, stacklevel=3)
            _warned_without_bwrap = True
        return python
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            *_interpreter_mounts(), "--bind", workdir, workdir, "--chdir", workdir, "--unshare-all",
            "--die-with-parent", "--clearenv", "--uid", str(NOBODY), "--gid", str(NOBODY), *python]


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5, memory_mb: int = 512) -> SandboxResult:
    """Run ``code`` with ``stdin``; stop it after ``timeout_s`` seconds of wall time.

    Returns the exit status (negative: killed by that signal), the captured output (truncated to a
    million characters each) and whether the time ran out.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    with tempfile.TemporaryDirectory(prefix="sgrpo-sandbox-") as workdir:
        os.chmod(workdir, 0o777)                 # writable by the unprivileged user the program runs as
        script = os.path.join(workdir, "main.py")
        with open(script, "w") as handle:
            handle.write(code)
        os.chmod(script, 0o644)
        process = subprocess.Popen(_command(workdir, script), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=workdir, env={}, start_new_session=True,
                                   preexec_fn=_limits(timeout_s, memory_mb), text=True, errors="replace")
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
