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
from sgrpo_kernels.rewards.sandbox import run_python

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def host_is_unaffected(limits_before):
    assert subprocess.run(["true"]).returncode == 0                    # the host can still start processes
    assert [resource.getrlimit(limit) for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)] == limits_before


@pytest.fixture
def limits_before():
    return [resource.getrlimit(limit) for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)]


def test_runs_a_program_with_input():
    result = run_python("import sys\nprint(input()[::-1])\nprint('err', file=sys.stderr)", stdin="hello")
    assert (result.returncode, result.stdout, result.stderr.strip(), result.timed_out) == (0, "olleh\n", "err", False)


def test_infinite_loop_is_stopped_within_the_timeout(limits_before):
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1)
    assert result.timed_out and result.returncode != 0
    assert time.monotonic() - start < 3
    host_is_unaffected(limits_before)


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


def test_without_bubblewrap_limits_still_apply_and_it_warns(monkeypatch, limits_before):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_warned_without_bwrap", False)
    with pytest.warns(RuntimeWarning, match="bubblewrap"):
        looping = run_python("while True:\n    pass\n", timeout_s=1)
    assert looping.timed_out
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # warned once, not again
        bomb = run_python("x = bytearray(2**33)\n", memory_mb=256)
    assert "MemoryError" in bomb.stderr
    result = run_python("import os\nprint(os.getcwd(), sorted(os.environ))\n")
    assert "sgrpo-sandbox-" in result.stdout and os.getcwd() not in result.stdout.split()[0]
    host_is_unaffected(limits_before)


def test_bad_limits():
    with pytest.raises(ValueError):
        run_python("print(1)", timeout_s=0)
