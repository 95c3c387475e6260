"""The code verifier: what a response's program is, the static pass, the verdicts, the refusal without isolation,
and the hostile-code list (`test_sandbox_hostile.py`) run again as an ordinary uid and as root without
CAP_SYS_ADMIN."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from fusechat.code_tests import program_of
from fusechat.config import CodeVerifierConfig
from fusechat.errors import UserError
from fusechat.score.sandbox import (
    DENY_NAMESPACES_ENV,
    check_code,
    check_code_many,
    isolation,
    processes_of,
    run_program,
    source_of_tests,
)
from fusechat.score.static_check import static_verdict, undefined_names

LIMITS = CodeVerifierConfig(timeout_s=2, memory_mb=512, max_processes=8, workers=2)
ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "test_sandbox_hostile.py"
needs_isolation = pytest.mark.skipif(isolation(LIMITS) == "none", reason="no isolation on this machine")


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    assert processes_of() == [], "a sandboxed process outlived its check"


# --------------------------------------------------------------------------------------------- programs
def test_a_program_is_all_python_blocks_that_parse():
    text = (
        "Solution:\n```python\ndef f(x):\n    return x + 1\n```\n"
        "Shell:\n```bash\npip install nothing\n```\n"
        "Session:\n```python\n>>> f(1)\n2\n```\n"
        "Usage:\n```python\nprint(f(2))\n```"
    )
    assert program_of(text) == "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    assert program_of("```\ny = 3\n```") == "y = 3\n"
    assert program_of("z = 4") == "z = 4\n"
    assert program_of("Just words, no code.") is None
    assert program_of("1. Code:\n   ```python\n   x = 1\n   ```") == "x = 1\n"
    assert source_of_tests(["assert f(1) == 2", "assert f(2) == 3"]) == "assert f(1) == 2\nassert f(2) == 3"


def test_static_pass_fails_syntax_and_undefined_names_only():
    assert static_verdict("def f(:\n    pass") == "syntax_error"
    assert static_verdict("return 1") == "syntax_error"  # parses, does not compile
    assert static_verdict("def f(nums: List[int]):\n    return helper(nums)") == "undefined_name"
    assert undefined_names("def f(nums: List[int]):\n    return helper(nums)") == ["List", "helper"]
    assert static_verdict("import os, sys\nimport os\nx = 1\nx = 2\ndef g():\n    return len([])") is None
    assert static_verdict("from math import *\nprint(floor(1.5))") is None  # unsure, not failing


# --------------------------------------------------------------------------------------------- verdicts
@needs_isolation
def test_verdicts_name_the_step_that_failed():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    usage_last = good + "\nUse it like this:\n```python\nprint(add(2, 2))\n```"
    assert check_code(good, tests, LIMITS) == "pass"
    assert check_code(usage_last, tests, LIMITS) == "pass"  # a final usage example does not hide the solution
    assert check_code("```python\ndef add(a, b):\n    return a - b\n```", tests, LIMITS) == "fail"
    assert check_code("def add(a, b) return", tests, LIMITS) == "syntax_error"
    assert check_code("```python\ndef add(a, b):\n    return total(a, b)\n```", tests, LIMITS) == "undefined_name"
    assert check_code("```python\npass\n```", tests, LIMITS) == "fail"  # does nothing: the tests find no add
    demo = good + "\n```python\nif __name__ == '__main__':\n    print(add(input(), 1))\n```"
    assert check_code(demo, tests, LIMITS) == "pass"  # a `__main__` demo reading stdin is not run


@needs_isolation
def test_empty_or_missing_tests_never_pass():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    for tests in (None, "", "   \n", [], "# nothing here", "x = 1\nprint(add(1, 2))"):
        assert check_code(good, tests, LIMITS) == "no_tests", tests
    assert check_code(good, "assert add(1, 2 == 3", LIMITS) == "bad_tests"
    guarded = "if __name__ == '__main__':\n    assert add(1, 2) == 4"
    assert check_code(good, guarded, LIMITS) == "fail"  # tests under a `__main__` guard do run
    unittest_style = "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(1, 1)"
    assert check_code(good, unittest_style, LIMITS) == "pass"
    assert check_code_many(
        [(good, "assert add(1, 2) == 3"), (good, "assert add(1, 2) == 4"), (good, None)], LIMITS
    ) == ["pass", "fail", "no_tests"]


# --------------------------------------------------------------------------------------------- no isolation
def test_without_isolation_checks_are_refused_with_one_line(monkeypatch):
    monkeypatch.setenv(DENY_NAMESPACES_ENV, "1")  # the kernel refuses every namespace, as in a default container
    assert isolation(LIMITS) == "none"
    with pytest.raises(UserError) as refused:
        check_code_many([("```python\nx = 1\n```", "assert x == 1")], LIMITS)
    message = str(refused.value)
    assert message.startswith("score.code.allow_no_isolation: the code sandbox cannot isolate code")
    assert "set score.code.allow_no_isolation: true" in message and "\n" not in message
    assert "Operation not permitted" in message  # the probe's reason
    accepted = LIMITS.model_copy(update={"allow_no_isolation": True})
    assert check_code_many([("```python\nx = 1\n```", "assert x == 1")], accepted) == ["pass"]
    assert run_program("while True:\n    pass", accepted) == "timeout"  # resource limits still hold


# --------------------------------------------------------------------------------------------- other identities
def _other_python() -> str | None:
    """An interpreter of this Python version that another uid may run (a venv under /root is out of reach)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (sys._base_executable, shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")):
        if not candidate:
            continue
        path = Path(candidate).resolve()
        dirs_open = all(d.stat().st_mode & 0o001 for d in path.parents)
        if dirs_open and path.stat().st_mode & 0o005 == 0o005:
            return str(path)
    return None


def _run_hostile_file(request, prefix: list[str], uid: int, expect: str) -> subprocess.CompletedProcess:
    python = _other_python()
    if python is None or shutil.which("setpriv") is None:
        pytest.skip("needs setpriv and a Python interpreter that other users may run")
    base = Path(tempfile.mkdtemp(prefix="fusechat-other-uid-"))  # pytest's own tmp dirs are closed to others
    os.chown(base, uid, uid)
    shared = Path(tempfile.mkdtemp(prefix=".shared-", dir=ROOT))  # anyone may write there: the sandbox may not
    os.chmod(shared, 0o1777)
    request.addfinalizer(lambda: [shutil.rmtree(p, ignore_errors=True) for p in (base, shared)])
    paths = [str(ROOT / "src"), sysconfig.get_paths()["purelib"]]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(base),
        "FUSECHAT_EXPECT_ISOLATION": expect,
        "FUSECHAT_TEST_SHARED_DIR": str(shared),
    }
    cmd = [*prefix, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base / 't'}", str(HOSTILE)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root; as an ordinary user the suite itself is it")
def test_hostile_code_as_an_ordinary_user(request):
    uid = 2_100_000_000 + secrets.randbelow(1_000_000)  # outside the throw-away range: an ordinary account
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    done = _run_hostile_file(request, prefix, uid, expect="userns")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout and "failed" not in done.stdout
    assert processes_of(uid) == [], "a check left a process of the ordinary user running"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_hostile_code_as_root_without_cap_sys_admin(request):
    """Docker's and Kubernetes' default for root: no CAP_SYS_ADMIN. Isolation then comes from a user namespace."""
    prefix = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
    done = _run_hostile_file(request, prefix, 0, expect="userns")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout and "failed" not in done.stdout
