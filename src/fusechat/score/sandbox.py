"""The code verifier: a response's program, a static pass, then the prompt's tests, in a sandbox, one process per
check.

Model output is hostile input. Each check runs `sandbox_boot.py` in a fresh interpreter (`python -I`, scrubbed
environment, stdin closed, its own session) that confines itself before running anything. How it confines is the
strongest mode that works on the machine, found once per interpreter by a probe (`isolation`):

- `root`: fusechat runs as root with CAP_SYS_ADMIN: private mount and network namespaces, a throw-away uid.
- `userns`: unprivileged user namespaces (any user; also root without CAP_SYS_ADMIN, via a throw-away uid):
  user, mount, network, PID and IPC namespaces, a read-only view of the filesystem but for the work directory,
  no capabilities, and an init that takes every leftover process down with it.
- `none`: neither works (e.g. a container's default seccomp profile). Checks are then refused with one line
  naming `score.code.allow_no_isolation`; with that key set they run under resource limits only.

User namespaces need no extra software and behave the same on every Linux since 5.x; bubblewrap, which would do
the same, is built on the very same kernel feature, so it would add a system dependency without adding a machine
on which isolation works. Both the parent's wall clock and the boot's limits (CPU, memory, processes, file size)
bound a check; afterwards the parent kills what is left (the init's exit in `userns`; the process group and the
throw-away uid as root) and removes the work directory.

Verdicts: `pass` (static pass clean, and program then tests ran to their end), `syntax_error` / `undefined_name`
(the static pass failed), `fail` (the tests failed: an exception, a failed assert, an exit before the end, a
crash, a resource limit), `timeout` (wall clock or CPU limit), `no_tests` (no tests, or tests that check
nothing: never a pass), `bad_tests` (the reference tests do not parse), `error` (the sandbox itself could not
start: not the response's fault).
"""

from __future__ import annotations

import functools
import json
import os
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

from fusechat.code_tests import has_checks, parses, program_of
from fusechat.config import CodeVerifierConfig
from fusechat.errors import UserError

BOOT = Path(__file__).with_name("sandbox_boot.py")
STATIC_CHECK = Path(__file__).with_name("static_check.py")
STARTUP_GRACE_S = 2.0  # interpreter start-up and confinement, on top of the check's own wall-clock budget
STOP_GRACE_S = 2.0  # after SIGTERM, how long the boot may take to take its namespace down
FILE_MB = 64  # largest file (stdout included) a check may write
OUTPUT_TAIL = 4096
# Throw-away uids: far above any real account, one drawn per check, so RLIMIT_NPROC counts only that check.
UID_RANGE = (3_000_000, 2_000_000_000)
SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
_DRAWN: set[int] = set()  # throw-away uids this process used (other fusechat processes may run checks too)
DENY_NAMESPACES_ENV = "FUSECHAT_SANDBOX_DENY_NAMESPACES"  # tests: make the kernel's refusal happen on purpose
STATIC_VERDICTS = {4: "syntax_error", 5: "undefined_name"}
# Proves more than "it started": the stdlib is readable after confinement and the work directory writable.
PROBE = "import decimal, fractions, json\nopen('probe.txt', 'w').write(json.dumps(str(fractions.Fraction(1, 3))))\n"
REFUSAL = (
    "score.code.allow_no_isolation: the code sandbox cannot isolate code on this machine ({reason}); run "
    "fusechat as an ordinary user where unprivileged user namespaces are allowed, or as root with CAP_SYS_ADMIN, "
    "or set score.code.allow_no_isolation: true to run it with resource limits only"
)


# --------------------------------------------------------------------------------------------- pure core
def source_of_tests(tests: Any) -> str:
    """A prompt's reference tests as Python source: a string of asserts, or a list of them."""
    if isinstance(tests, str):
        return tests
    if isinstance(tests, list | tuple):
        return "\n".join(str(t) for t in tests)
    raise ValueError(f"tests must be a string or a list of strings, got {type(tests).__name__}")


# --------------------------------------------------------------------------------------------- isolation
def isolation(limits: CodeVerifierConfig | None = None) -> str:
    """The mode that confines checks on this machine for the configured interpreter: root, userns or none."""
    limits = limits or CodeVerifierConfig()
    return _detect(limits.python or sys.executable, bool(os.environ.get(DENY_NAMESPACES_ENV)))[0]


@functools.lru_cache(maxsize=8)
def _detect(python: str, deny: bool) -> tuple[str, str]:
    """(mode, why the others failed): the first mode whose probe passes."""
    limits = CodeVerifierConfig(python=python, timeout_s=20, memory_mb=1024)
    why = []
    for mode in ("root", "userns") if os.geteuid() == 0 else ("userns",):
        verdict, tail = _run(PROBE, None, limits, mode)
        if verdict == "pass":
            return mode, ""
        lines = [line for line in tail.splitlines() if line.strip()]
        why.append(f"{mode} mode: {lines[-1].removeprefix('fusechat-sandbox: ') if lines else verdict}")
    return "none", "; ".join(why)


def require_isolation(limits: CodeVerifierConfig) -> str:
    """The isolation mode, or the one-line refusal when there is none and the config did not accept that."""
    mode = isolation(limits)
    if mode == "none" and not limits.allow_no_isolation:
        raise UserError(REFUSAL.format(reason=_detect(limits.python or sys.executable, _denied())[1]))
    return mode


def _denied() -> bool:
    return bool(os.environ.get(DENY_NAMESPACES_ENV))


# --------------------------------------------------------------------------------------------- running
def run_program(source: str, limits: CodeVerifierConfig, *, solution: str | None = None, static: bool = True) -> str:
    """Run Python `source` in the sandbox; with `solution`: the static pass on it (unless `static` is False),
    then it, then `source` (its tests) in the same module. Returns a verdict."""
    return _run(source, solution, limits, require_isolation(limits), static=static)[0]


def _run(
    source: str, solution: str | None, limits: CodeVerifierConfig, mode: str, *, static: bool = True
) -> tuple[str, str]:
    python = limits.python or sys.executable
    as_root = os.geteuid() == 0
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0] if as_root else None
    if uid is not None:
        _DRAWN.add(uid)
    nonce = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix="fusechat-sandbox-"))
    try:
        files = {"main.py": source} if solution is None else {"solution.py": solution, "tests.py": source}
        for name, text in files.items():
            (work / name).write_text(text, encoding="utf-8")
        if as_root:
            for path in (work, *(work / name for name in files)):
                os.chown(path, uid, uid)
        inside = "/tmp" if mode in ("root", "userns") else str(work)  # the work directory, as the check sees it
        env = {**SCRUBBED_ENV, "HOME": inside, "TMPDIR": inside}
        settings = {
            "nonce": nonce,
            "mode": mode,
            "uid": uid,
            "cpu_s": max(1, int(limits.timeout_s + 0.999)),
            "memory_mb": limits.memory_mb,
            "max_processes": limits.max_processes,
            "file_mb": FILE_MB,
            "keep_visible": _interpreter_dirs(python),
            "static": str(STATIC_CHECK) if solution is not None and static else None,
            "pyflakes_dir": _pyflakes_dir() if solution is not None and static else None,
            "deny_namespaces": _denied(),
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
            except OSError as e:
                return "error", f"cannot start {python}: {e}"
            try:
                proc.stdin.write((json.dumps(settings) + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass
            try:
                rc = proc.wait(timeout=limits.timeout_s + STARTUP_GRACE_S)
            except subprocess.TimeoutExpired:
                rc = None
                if mode == "userns":
                    _stop(proc)
            finally:
                _kill_everything(proc, uid)
            elapsed = time.monotonic() - started
            out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_TAIL))
            tail = out.read().decode("utf-8", "replace")
        return _verdict(rc, tail, nonce, elapsed, limits.timeout_s), tail
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verdict(rc: int | None, tail: str, nonce: str, elapsed: float, timeout_s: float) -> str:
    died_of = -rc if rc is not None and rc < 0 else rc - 128 if rc is not None and rc > 128 else None
    if rc is None or died_of in (signal.SIGXCPU, signal.SIGKILL) and elapsed >= timeout_s * 0.5:
        return "timeout"
    if rc == 3 and "fusechat-sandbox: setup failed" in tail:
        return "error"
    if rc in STATIC_VERDICTS and f"fusechat-sandbox: static: {STATIC_VERDICTS[rc]}" in tail:
        return STATIC_VERDICTS[rc]
    if rc == 0 and tail.rstrip().endswith(nonce):
        return "pass"
    return "fail"


@functools.cache
def _pyflakes_dir() -> str:
    import pyflakes

    return str(Path(pyflakes.__file__).resolve().parent.parent)


@functools.cache
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


def _stop(proc: subprocess.Popen) -> None:
    """Past the wall clock in `userns`: ask the boot to stop (it kills the init, whose exit empties the
    namespace, and waits for that) before the process group is killed."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


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
                _DRAWN.discard(uid)  # nothing of it left to look for
                break
            time.sleep(0.05)


def processes_of(uid: int | None = None) -> list[int]:
    """Live (not zombie) processes owned by `uid`; with None, every process a check of this process left: owned
    by a throw-away uid it used, or still running the boot of this fusechat."""
    found = []
    boot = str(BOOT).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes() if uid is None else b""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        owner = int(fields.get("Uid", "0").split()[0])
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if uid is not None:
            if owner == uid:
                found.append(int(entry.name))
        elif owner in _DRAWN or boot in cmdline:
            found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------- checks
def check_code(response: str, tests: Any, limits: CodeVerifierConfig, *, static: bool = True) -> str:
    """A response's verdict against a prompt's tests (see the module docstring)."""
    test_source = source_of_tests(tests) if tests is not None else ""
    if not test_source.strip():
        return "no_tests"
    if not parses(test_source):
        return "bad_tests"
    if not has_checks(test_source):
        return "no_tests"
    code = program_of(response)
    if code is None:
        return "syntax_error"
    return run_program(test_source, limits, solution=code, static=static)


def check_code_many(items: Sequence[tuple[str, Any]], limits: CodeVerifierConfig, *, static: bool = True) -> list[str]:
    """(response, tests) pairs -> verdicts, `limits.workers` checks at a time. Refuses (UserError) when the
    machine cannot isolate code and the config did not accept that."""
    if not items:
        return []
    require_isolation(limits)
    with ThreadPoolExecutor(max_workers=min(limits.workers, len(items))) as pool:
        return list(pool.map(lambda it: check_code(it[0], it[1], limits, static=static), items))
