"""The code verifier: run a response's code with the prompt's tests in a sandbox, one process per check.

Model output is hostile input. Each check runs `sandbox_boot.py` in a fresh interpreter (`python -I`, scrubbed
environment, stdin closed, its own session) that confines itself before running the code: CPU-time, address
space, process-count and file-size limits; and, when fusechat runs as root, empty network and private mount
namespaces and a throw-away uid (see `sandbox_boot.py`). The parent enforces the wall clock, then kills the
whole process group and, as root, every process of the throw-away uid (a fork bomb that called setsid() included),
and removes the work directory.

Verdicts: `pass` (the file ran to its end: code, then tests), `fail` (an exception, a failed assert, an exit
before the end, a crash, a resource limit), `timeout` (wall clock or CPU limit), `error` (the sandbox itself
could not start: not the response's fault).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fusechat.config import CodeVerifierConfig

BOOT = Path(__file__).with_name("sandbox_boot.py")
STARTUP_GRACE_S = 2.0  # interpreter start-up and confinement, on top of the check's own wall-clock budget
FILE_MB = 64  # largest file (stdout included) a check may write
OUTPUT_TAIL = 4096
# Throw-away uids: far above any real account, one drawn per check, so RLIMIT_NPROC counts only that check.
UID_RANGE = (3_000_000, 2_000_000_000)
SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


# --------------------------------------------------------------------------------------------- pure core
def extract_code(text: str) -> str:
    """The last ```python block; else the last unlabelled ``` block; else the whole text."""
    blocks = PYTHON_BLOCK.findall(text) or CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def source_of_tests(tests: Any) -> str:
    """A prompt's reference tests as Python source: a string of asserts, or a list of them."""
    if isinstance(tests, str):
        return tests
    if isinstance(tests, list | tuple):
        return "\n".join(str(t) for t in tests)
    raise ValueError(f"tests must be a string or a list of strings, got {type(tests).__name__}")


def program(response: str, tests: Any) -> str:
    return f"{extract_code(response)}\n\n# ---- tests ----\n{source_of_tests(tests)}\n"


# --------------------------------------------------------------------------------------------- running
def isolation() -> str:
    """What confines a check on this machine: `root` (namespaces + throw-away uid) or `limits` (rlimits only)."""
    return "root" if os.geteuid() == 0 else "limits"


def run_program(source: str, limits: CodeVerifierConfig) -> str:
    """Run Python `source` in the sandbox; return pass/fail/timeout/error."""
    python = limits.python or sys.executable
    as_root = os.geteuid() == 0
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0] if as_root else None
    nonce = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix="fusechat-sandbox-"))
    try:
        (work / "main.py").write_text(source, encoding="utf-8")
        if as_root:
            os.chown(work, uid, uid)
            os.chown(work / "main.py", uid, uid)
        env = {**SCRUBBED_ENV, "HOME": "/tmp" if as_root else str(work), "TMPDIR": "/tmp" if as_root else str(work)}
        settings = {
            "nonce": nonce,
            "uid": uid,
            "cpu_s": max(1, int(limits.timeout_s + 0.999)),
            "memory_mb": limits.memory_mb,
            "max_processes": limits.max_processes,
            "file_mb": FILE_MB,
            "keep_visible": _interpreter_dirs(python),
        }
        with tempfile.TemporaryFile() as out:  # unnamed: the check cannot reach it by path
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [python, "-I", str(BOOT)],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                    env=env,
                    start_new_session=True,
                )
            except OSError:
                return "error"
            try:
                proc.stdin.write((json.dumps(settings) + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass
            try:
                rc = proc.wait(timeout=limits.timeout_s + STARTUP_GRACE_S)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_everything(proc, uid)
            elapsed = time.monotonic() - started
            out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_TAIL))
            tail = out.read().decode("utf-8", "replace")
        return _verdict(rc, tail, nonce, elapsed, limits.timeout_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verdict(rc: int | None, tail: str, nonce: str, elapsed: float, timeout_s: float) -> str:
    if rc is None or rc in (-signal.SIGXCPU, -signal.SIGKILL) and elapsed >= timeout_s * 0.5:
        return "timeout"
    if rc == 3 and "fusechat-sandbox: setup failed" in tail:
        return "error"
    if rc == 0 and tail.rstrip().endswith(nonce):
        return "pass"
    return "fail"


def _interpreter_dirs(python: str) -> list[str]:
    """Directories the sandboxed interpreter reads: its prefix and base prefix (stdlib, site-packages)."""
    if python == sys.executable:
        return [sys.base_prefix, sys.prefix, str(Path(sys.executable).resolve().parent)]
    try:
        found = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.base_prefix); print(sys.prefix)"],
            capture_output=True,
            text=True,
            timeout=30,
            env=SCRUBBED_ENV,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        found = []
    return [*found, str(Path(python).resolve().parent)]


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        # kill(-1) from inside the uid reaches every process it owns, wherever it moved (setsid, double fork)
        for _ in range(5):
            subprocess.run(
                ["/bin/sh", "-c", "kill -9 -1 2>/dev/null"],
                user=uid,
                group=uid,
                extra_groups=[],
                env=SCRUBBED_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if not processes_of(uid):
                break
            time.sleep(0.05)


def processes_of(uid: int | None = None) -> list[int]:
    """Live (not zombie) processes owned by `uid`, or by any throw-away sandbox uid when `uid` is None."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        owner = int(fields.get("Uid", "0").split()[0])
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if owner == uid if uid is not None else UID_RANGE[0] <= owner < UID_RANGE[1]:
            found.append(int(entry.name))
    return found


def check_code(response: str, tests: Any, limits: CodeVerifierConfig) -> str:
    return run_program(program(response, tests), limits)


def check_code_many(items: Sequence[tuple[str, Any]], limits: CodeVerifierConfig) -> list[str]:
    """(response, tests) pairs -> verdicts, `limits.workers` checks at a time."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(limits.workers, len(items))) as pool:
        return list(pool.map(lambda it: check_code(it[0], it[1], limits), items))
