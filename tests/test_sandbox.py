"""The sandbox contains what untrusted programs do; the tests that need bubblewrap skip without it
(.ci/run installs it, so CI runs them)."""

import os
import resource
import shutil
import socket
import subprocess
import time
import uuid
import warnings

import pytest

from sgrpo_kernels.rewards import sandbox
from sgrpo_kernels.rewards.sandbox import SandboxUnavailableError, run_python

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def host_is_unaffected(limits_before):
    assert subprocess.run(["true"]).returncode == 0                    # the host can still start processes
    assert [resource.getrlimit(limit) for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)] == limits_before


@pytest.fixture
def limits_before():
    return [resource.getrlimit(limit) for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)]


@pytest.fixture
def without_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_warned_without_bwrap", False)


@pytest.fixture
def unusable_bwrap(monkeypatch, tmp_path):
    """A bwrap that fails the way it does where unprivileged user namespaces are disabled."""
    fake_bwrap = tmp_path / "bwrap"
    fake_bwrap.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake_bwrap.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake_bwrap))
    monkeypatch.setattr(sandbox, "_warned_without_bwrap", False)


def writes_marker(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\nprint('ran')\n"


@needs_bwrap
def test_runs_a_program_with_input():
    result = run_python("import sys\nprint(input()[::-1])\nprint('err', file=sys.stderr)", stdin="hello")
    assert (result.returncode, result.stdout, result.stderr.strip(), result.timed_out) == (0, "olleh\n", "err", False)


@needs_bwrap
def test_infinite_loop_is_stopped_within_the_timeout(limits_before):
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1)
    assert result.timed_out and result.returncode != 0
    assert time.monotonic() - start < 3
    host_is_unaffected(limits_before)


@needs_bwrap
def test_memory_bomb_is_contained(limits_before):
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(2**26))\n", memory_mb=256, timeout_s=10)
    assert result.returncode != 0 and "MemoryError" in result.stderr and not result.timed_out
    host_is_unaffected(limits_before)


@needs_bwrap
def test_fork_bomb_is_contained(limits_before):
    start = time.monotonic()
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                        timeout_s=2)
    assert result.timed_out and time.monotonic() - start < 15
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", "sgrpo-sandbox-"], capture_output=True, text=True).stdout.split()
    assert leftovers == []                                             # nothing it forked survives
    host_is_unaffected(limits_before)


@needs_bwrap
def test_writing_outside_the_working_directory_fails():
    name = f"sgrpo-escape-{uuid.uuid4().hex}.txt"
    # the standard library's folder: on the host's (read-only inside) root even when the checkout is under /tmp
    host_file = os.path.join(os.path.dirname(os.path.realpath(os.__file__)), name)
    host_tmp_file = os.path.join("/tmp", name)
    code = (f"open('inside.txt', 'w').write('ok')\nopen({host_tmp_file!r}, 'w').write('private')\n"
            f"print('wrote')\nopen({host_file!r}, 'w').write('escaped')\n")
    try:
        result = run_python(code)
        assert result.stdout == "wrote\n"                  # its own directory and a private /tmp are writable
        assert result.returncode != 0 and "Read-only file system" in result.stderr
        assert not os.path.exists(host_file) and not os.path.exists(host_tmp_file)
    finally:
        for path in (host_file, host_tmp_file):
            if os.path.exists(path):
                os.remove(path)


@needs_bwrap
def test_network_connection_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert result.returncode != 0 and ("refused" in result.stderr or "unreachable" in result.stderr)
        with pytest.raises(TimeoutError):
            server.accept()                                            # nobody reached the host


@needs_bwrap
def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_python("import os\nprint(sorted(k for k in os.environ if k not in ('PWD', 'LC_CTYPE')))\n")
    assert result.stdout.strip() == "[]"


@needs_bwrap
def test_unsafe_flag_changes_nothing_with_bubblewrap(tmp_path):
    marker = tmp_path / "marker.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no warning: the sandbox is there
        result = run_python(writes_marker(marker), unsafe_allow_without_sandbox=True)
    assert result.returncode != 0 and result.stdout == "" and not marker.exists()   # its /tmp is private


def test_without_bubblewrap_it_raises_before_running_anything(without_bwrap, tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap") as raised:
        run_python(writes_marker(marker))
    assert "dnf install bubblewrap" in str(raised.value)
    assert "unsafe_allow_without_sandbox=True" in str(raised.value)
    assert not marker.exists()


def test_unusable_bubblewrap_raises_before_running_anything(unusable_bwrap, tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.raises(SandboxUnavailableError, match="No permissions to create new namespace") as raised:
        run_python(writes_marker(marker))
    assert "user namespaces" in str(raised.value) and "unsafe_allow_without_sandbox=True" in str(raised.value)
    assert not marker.exists()


def test_unusable_bubblewrap_with_the_unsafe_flag_runs_without_it(unusable_bwrap, tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.warns(RuntimeWarning, match="UNSAFE"):
        result = run_python(writes_marker(marker), unsafe_allow_without_sandbox=True)
    assert (result.returncode, result.stdout) == (0, "ran\n") and marker.exists()


def test_without_bubblewrap_the_unsafe_flag_keeps_the_limits_and_warns(without_bwrap, limits_before, tmp_path):
    marker = tmp_path / "marker.txt"
    with pytest.warns(RuntimeWarning, match="bubblewrap.*UNSAFE"):
        looping = run_python("while True:\n    pass\n", timeout_s=1, unsafe_allow_without_sandbox=True)
    assert looping.timed_out
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # warned once, not again
        bomb = run_python("x = bytearray(2**33)\n", memory_mb=256, unsafe_allow_without_sandbox=True)
        escaped = run_python(writes_marker(marker), unsafe_allow_without_sandbox=True)
    assert "MemoryError" in bomb.stderr
    assert escaped.stdout == "ran\n" and marker.exists()              # what the flag gives up: host files
    result = run_python("import os\nprint(os.getcwd(), sorted(os.environ))\n", unsafe_allow_without_sandbox=True)
    assert "sgrpo-sandbox-" in result.stdout and os.getcwd() not in result.stdout.split()[0]
    host_is_unaffected(limits_before)


def test_bad_limits():
    with pytest.raises(ValueError):
        run_python("print(1)", timeout_s=0)
