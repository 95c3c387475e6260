"""Hostile code against the sandbox: each program must end as fail/timeout (or pass, where it finishes) with the host
untouched and nothing left running.

These tests run as whoever runs the suite, in the isolation mode the machine offers (as root: the `root` mode).
`test_sandbox.py` runs this same file again as an ordinary uid (the `userns` mode) and as root without
CAP_SYS_ADMIN (a throw-away uid in a user namespace), so the list passes in every mode. Serial on purpose: the
stray-process check after each test must see only that test's checks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fusechat.config import CodeVerifierConfig
from fusechat.score.sandbox import isolation, processes_of, run_program

LIMITS = CodeVerifierConfig(timeout_s=2, memory_mb=512, max_processes=8, workers=2)
QUICK = LIMITS.model_copy(update={"timeout_s": 1.0})  # for programs that run until stopped

pytestmark = pytest.mark.skipif(
    isolation(LIMITS) == "none", reason="no isolation on this machine: test_sandbox.py checks the refusal instead"
)


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    assert processes_of() == [], "a sandboxed process outlived its check"


def test_runs_in_the_expected_mode():
    expected = os.environ.get("FUSECHAT_EXPECT_ISOLATION")
    assert isolation(LIMITS) == (expected or ("root" if os.geteuid() == 0 else "userns"))


def test_exiting_before_the_tests_is_not_a_pass():
    assert run_program("import sys\nsys.exit(0)\nassert False", LIMITS) == "fail"
    assert run_program("import os\nos._exit(0)\nassert False", LIMITS) == "fail"


def test_infinite_loop_times_out():
    assert run_program("while True:\n    pass", QUICK) == "timeout"
    started = time.monotonic()
    assert run_program("import time\ntime.sleep(60)", QUICK) == "timeout"  # wall clock, no CPU used
    assert time.monotonic() - started < 8
    ignores_term = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    assert run_program(ignores_term, QUICK) == "timeout"


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert run_program(bomb, QUICK) in ("timeout", "fail")


def test_leftover_daemons_die_with_the_check():
    escaping = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\n"
    assert run_program(escaping, LIMITS) == "pass"  # the parent finishes; its detached child must still die
    daemon = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 3)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
    )
    assert run_program(daemon, LIMITS) == "pass"
    # the autouse fixture asserts that nothing of either check is still running


def test_memory_bombs_fail():
    assert run_program("x = bytearray(10 * 1024 ** 3)\nx[-1] = 1", LIMITS) == "fail"
    assert run_program("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", LIMITS) == "fail"


def test_huge_output_is_cut():
    started = time.monotonic()
    flood = "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)"
    assert run_program(flood, QUICK) in ("fail", "timeout")
    assert run_program("print('z' * (300 * 1024 * 1024))", CodeVerifierConfig(timeout_s=5, memory_mb=1024)) == "fail"
    assert time.monotonic() - started < 20


@pytest.fixture()
def shared_dir():
    """A directory anyone may write to, outside /tmp, like a cluster's shared scratch space."""
    given = os.environ.get("FUSECHAT_TEST_SHARED_DIR")
    if given:
        yield Path(given)
        return
    path = Path(tempfile.mkdtemp(prefix=".shared-", dir=Path(__file__).resolve().parents[1]))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cannot_write_outside_its_directory(in_tmp, shared_dir):
    name = f"fusechat-hostile-{uuid.uuid4().hex[:8]}"
    targets = [in_tmp / name, shared_dir / name, Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name]
    home = Path(os.environ.get("HOME", "/nonexistent"))
    if home.is_dir() and os.access(home, os.W_OK):
        targets.append(home / name)
    for target in targets:
        code = f"open({str(target)!r}, 'w').write('owned')\nassert open({str(target)!r}).read() == 'owned'"
        verdict = run_program(code, LIMITS)
        if target.parent in (in_tmp, home, shared_dir):
            assert verdict == "fail"
        assert not target.exists(), f"the sandbox wrote {target}"
    (in_tmp / "victim.txt").write_text("mine")
    overwrite = f"open({str(in_tmp / 'victim.txt')!r}, 'w').write('owned')"
    assert run_program(overwrite, LIMITS) == "fail"
    assert (in_tmp / "victim.txt").read_text() == "mine"
    inside = "open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'"
    assert run_program(inside, LIMITS) == "pass"


def test_cannot_read_the_parents_environment(monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_SECRET", "hunter2-token")
    code = (
        "import os\n"
        "seen = os.environ.get('FUSECHAT_TEST_SECRET', '')\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, 'self'):\n"
        "    try:\n"
        "        seen += open(f'/proc/{pid}/environ').read()\n"
        "    except OSError:\n"
        "        pass\n"
        "assert 'hunter2-token' in seen\n"
    )
    assert run_program(code, LIMITS) == "fail"
    assert run_program("import os\nassert 'FUSECHAT_TEST_SECRET' not in os.environ", LIMITS) == "pass"


def test_cannot_kill_the_parent_or_its_siblings():
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in (os.getppid(), {os.getpid()}, {sibling.pid}):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "for group in (os.getpgid(0), " + str(os.getpgid(0)) + "):\n"
            "    try:\n"
            "        os.killpg(group, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "os.kill(-1, signal.SIGKILL)\n"
        )
        assert run_program(code, LIMITS) in ("fail", "pass")  # pass: kill(-1) spared it; fail: it died too
        time.sleep(0.2)
        assert sibling.poll() is None, "the sandbox killed a process of the parent's user"
    finally:
        sibling.kill()
        sibling.wait()


def _listener(family=socket.AF_INET, address=("127.0.0.1", 0)):
    server = socket.socket(family)
    server.bind(address)
    server.listen(5)
    server.settimeout(0.5)
    return server


def _no_connection_arrived(server) -> bool:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


def test_cannot_open_a_socket():
    server = _listener()
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'x')"
        assert run_program(code, LIMITS) == "fail"
        assert _no_connection_arrived(server)
    finally:
        server.close()


def test_raw_socket_finds_no_network(tmp_path):
    """Past the Python-level block (the C module directly): the empty network namespace stops it, and the
    parent's unix sockets are out of sight."""
    server = _listener()
    port = server.getsockname()[1]
    path = tmp_path / "parent.sock"
    unix = _listener(socket.AF_UNIX, str(path))
    os.chmod(path, 0o777)
    try:
        code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
        assert run_program(code, LIMITS) == "fail"
        assert _no_connection_arrived(server)
        code = f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.settimeout(1)\ns.connect({str(path)!r})"
        assert run_program(code, LIMITS) == "fail"
        assert _no_connection_arrived(unix)
    finally:
        server.close()
        unix.close()
