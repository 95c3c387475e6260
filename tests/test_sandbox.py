"""The code sandbox against hostile responses: each must end as fail/timeout with the host untouched."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from fusechat.config import CodeVerifierConfig
from fusechat.score.sandbox import check_code, check_code_many, extract_code, processes_of, run_program, source_of_tests

LIMITS = CodeVerifierConfig(timeout_s=2, memory_mb=512, max_processes=8, workers=2)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid and mount isolation need root")


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    assert processes_of() == [], "a sandboxed process outlived its check"


def test_extract_code_takes_the_last_python_block():
    text = "First:\n```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```\nDone."
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("z = 4") == "z = 4"
    assert source_of_tests(["assert f(1) == 2", "assert f(2) == 3"]) == "assert f(1) == 2\nassert f(2) == 3"


def test_correct_code_passes_and_wrong_code_fails():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert check_code(good, tests, LIMITS) == "pass"
    assert check_code(bad, tests, LIMITS) == "fail"
    assert check_code("def add(a, b) return", "assert add(1, 2) == 3", LIMITS) == "fail"  # syntax error
    assert check_code_many([(good, tests), (bad, tests), (good, "assert add(2, 2) == 4")], LIMITS) == [
        "pass",
        "fail",
        "pass",
    ]


def test_exiting_before_the_tests_is_not_a_pass():
    assert run_program("import sys\nsys.exit(0)\nassert False", LIMITS) == "fail"
    assert run_program("import os\nos._exit(0)\nassert False", LIMITS) == "fail"


def test_infinite_loop_times_out():
    assert run_program("while True:\n    pass", LIMITS) == "timeout"
    assert run_program("import time\ntime.sleep(60)", LIMITS) == "timeout"  # wall clock, no CPU used


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert run_program(bomb, LIMITS) in ("timeout", "fail")
    escaping = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\n"
    assert run_program(escaping, LIMITS) == "pass"  # the parent finishes; its detached child must still die


def test_ten_gigabytes_fail():
    assert run_program("x = bytearray(10 * 1024 ** 3)\nx[-1] = 1", LIMITS) == "fail"


@as_root
def test_cannot_write_outside_its_directory(in_tmp):
    name = f"fusechat-hostile-{uuid.uuid4().hex[:8]}"
    targets = [in_tmp / name, Path("/tmp") / name, Path("/var/tmp") / name, Path("/dev/shm") / name]
    for target in targets:
        code = f"open({str(target)!r}, 'w').write('owned')\nassert open({str(target)!r}).read() == 'owned'"
        verdict = run_program(code, LIMITS)
        if target.parent == in_tmp:
            assert verdict == "fail"
        assert not target.exists(), f"the sandbox wrote {target}"
    assert (
        run_program("open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'", LIMITS) == "pass"
    )


@as_root
def test_cannot_read_the_parents_environment(monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_SECRET", "hunter2-token")
    code = (
        "import os\n"
        "seen = os.environ.get('FUSECHAT_TEST_SECRET', '')\n"
        "for pid in (os.getppid(), 1):\n"
        "    try:\n"
        "        seen += open(f'/proc/{pid}/environ').read()\n"
        "    except OSError:\n"
        "        pass\n"
        "assert 'hunter2-token' in seen\n"
    )
    assert run_program(code, LIMITS) == "fail"
    assert run_program("import os\nassert 'FUSECHAT_TEST_SECRET' not in os.environ", LIMITS) == "pass"


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
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


@as_root
def test_raw_socket_finds_no_network():
    """Past the Python-level block (the C module directly): the empty network namespace stops it."""
    server = _listener()
    port = server.getsockname()[1]
    try:
        code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
        assert run_program(code, LIMITS) == "fail"
        assert _no_connection_arrived(server)
    finally:
        server.close()
