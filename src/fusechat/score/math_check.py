"""The math verifier: extract a response's final answer and compare it with the reference using math-verify.

Extraction (ours, so that "final" means the last answer given): the last `\\boxed{...}`, else the last "the answer
is ...", else the last number. Equivalence (math-verify): fractions, decimals, LaTeX, sets, expressions.

math-verify bounds its own time with signal.alarm, which works only in a main thread. Checks therefore run in a
pool of worker processes, each check under our own alarm in the worker's main thread (math-verify's timeouts
off); a worker that stops answering altogether (stuck in C code, where no signal is handled) is killed with its
pool, and the checks it held are counted as timeouts.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

ANSWER_IS = re.compile(r"answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
STALL_GRACE_S = 10.0  # beyond the per-check alarm, before a silent pool is declared stuck


class CheckTimeout(BaseException):
    """Raised by the alarm. A BaseException so that math-verify's own `except Exception` cannot swallow it."""


# --------------------------------------------------------------------------------------------- pure core
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed:
        return boxed
    said = ANSWER_IS.findall(text)
    if said:
        answer = said[-1].strip().strip("$").strip()
        if answer:
            return answer
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def as_latex(answer: str) -> str:
    answer = answer.strip()
    return answer if answer.startswith("$") else f"${answer}$"


def check_answer(response: str, reference: str) -> str:
    """`correct`, `wrong` or `no_answer` (no time bound: see `check_many`)."""
    from math_verify import parse, verify

    answer = extract_answer(response)
    if answer is None:
        return "no_answer"
    if answer.replace(" ", "") == str(reference).replace(" ", ""):
        return "correct"
    gold = parse(as_latex(str(reference)), parsing_timeout=None)
    pred = parse(as_latex(answer), parsing_timeout=None)
    if not pred:
        return "no_answer"
    return "correct" if verify(gold, pred, timeout_seconds=None) else "wrong"


# --------------------------------------------------------------------------------------------- bounded checks
def _alarm(signum, frame):
    raise CheckTimeout


def _worker_init() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with timeouts off
    signal.signal(signal.SIGALRM, _alarm)
    import math_verify  # noqa: F401 - pay the import once per worker


def _checked(response: str, reference: str, timeout_s: float) -> str:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return check_answer(response, reference)
    except CheckTimeout:
        return "timeout"
    except Exception:  # noqa: BLE001 - an answer math-verify cannot handle is not a correct one
        return "wrong"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class MathChecker:
    """A pool of verifier processes, started once and reused across chunks."""

    def __init__(self, timeout_s: float, workers: int):
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init)
        return self._pool

    def check_many(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """(response, reference answer) pairs -> verdicts: correct / wrong / no_answer / timeout."""
        results: list[str | None] = [None] * len(items)
        pool = self._get_pool()
        futures = {pool.submit(_checked, r, ref, self.timeout_s): i for i, (r, ref) in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=self.timeout_s + STALL_GRACE_S, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    results[futures[f]] = f.result()
                except Exception:  # noqa: BLE001 - a worker died under this check (e.g. killed for memory)
                    results[futures[f]] = "timeout"
            if not done:  # nothing finished for a whole check's budget: the pool is stuck; restart it
                stuck = {f for f in pending if f.running()} or pending
                queued = sorted(futures[f] for f in pending - stuck)
                self.close(kill=True)
                for f in stuck:
                    results[futures[f]] = "timeout"
                for i, verdict in zip(queued, self.check_many([items[i] for i in queued]), strict=True):
                    results[i] = verdict
                break
        return [r or "timeout" for r in results]

    def close(self, kill: bool = False) -> None:
        if self._pool is None:
            return
        if kill:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None
