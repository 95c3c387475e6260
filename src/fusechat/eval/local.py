"""Benchmarks scored locally (pure core): read the sets, check each answer, accuracy per set.

Math answers go to math-verify (`score.math_check`: the last `\\boxed{}` first, as Qwen2.5-Math's harness extracts
them); a GSM8K reference ("... #### 72") is reduced to the number after `####`, as that harness does. Code runs in
the score stage's sandbox: HumanEval-style tests (`def check(candidate)`) are called with the task's entry point,
MBPP-style tests are a list of asserts, both after the task's setup code (MBPP's `test_imports`). pass@1 = the
share of greedy answers that pass.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fusechat.config import EvalSet, FusechatConfig, PromptSource
from fusechat.errors import UserError


def eval_rows(sets: list[EvalSet], indices: list[int] | None = None) -> list[dict[str, Any]]:
    """Every eval prompt as {set, check, style, prompt_id, messages, reference}, read with the prompts field
    mapping; `reference` also holds the code sets' `entry_point` and `setup` columns. `indices`: the sets'
    places in `eval.sets`, for errors (default: their order here)."""
    from fusechat.prompts import get_path, iter_records, record_to_row

    rows = []
    for i, s in zip(indices or range(len(sets)), sets, strict=True):
        where = f"eval.sets[{i}]"
        source = PromptSource(name=s.name, path=s.path, domain=s.domain, fields=s.fields)
        n = 0
        for location, record in iter_records(source, where):
            try:
                row = record_to_row(record, source)
                extra = {
                    key: get_path(record, column)
                    for key, column in (("entry_point", s.entry_point), ("setup", s.test_setup))
                    if column is not None
                }
            except (KeyError, ValueError) as e:
                raise UserError(f"{location}: {e} (mapped by {where})") from None
            if isinstance(row, str):
                continue
            reference = json.loads(row["reference"]) if row["reference"] else {}
            rows.append(
                {
                    "set": s.name,
                    "check": s.check,
                    "style": s.style,
                    "prompt_id": row["prompt_id"],
                    "messages": row["messages"],
                    "reference": {**reference, **extra},
                }
            )
            n += 1
            if s.limit is not None and n >= s.limit:
                break
        if n == 0:
            raise UserError(f"{where}.path: {s.path}: no prompts")
    return rows


def math_reference(answer: Any) -> str:
    """The reference answer as math-verify compares it: GSM8K's "<solution> #### 1,234" becomes "1234"."""
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def code_tests(tests: Any, entry_point: str | None = None, setup: Any = None) -> str:
    """The test source run after the answer's code: setup, the tests, and `check(<entry point>)` when the tests
    define HumanEval's `check(candidate)`."""
    from fusechat.score.sandbox import source_of_tests

    source = source_of_tests(tests)
    if entry_point and re.search(r"^def check\(", source, re.MULTILINE):
        source = f"{source.rstrip()}\n\ncheck({entry_point})\n"
    if setup:
        source = f"{source_of_tests(setup)}\n{source}"
    return source


def close_fence(text: str) -> str:
    """Close a code block the answer left open (cut at its stop string or its token budget), so that the
    sandbox finds the code in it."""
    return f"{text}\n```" if text.count("```") % 2 else text


def check_responses(rows: list[dict[str, Any]], responses: list[str], cfg: FusechatConfig) -> list[str]:
    """A verdict per response; `...:correct` / `...:pass` count as correct."""
    from fusechat.score.exact import check_exact

    verdicts: list[str] = [""] * len(rows)
    math_items, code_items = [], []
    for i, (row, text) in enumerate(zip(rows, responses, strict=True)):
        ref = row["reference"]
        if row["check"] == "exact":
            verdicts[i] = check_exact(text, ref.get("answer"))
        elif row["check"] == "math":
            math_items.append((i, text, ref.get("answer")))
        else:
            code_items.append((i, text, ref))
    if math_items:
        from fusechat.score.math_check import MathChecker

        checker = MathChecker(cfg.score.math.timeout_s, cfg.score.math.workers)
        try:
            out = checker.check_many([(t, math_reference(a)) for _, t, a in math_items if a is not None])
        finally:
            checker.close()
        it = iter(out)
        for i, _, a in math_items:
            verdicts[i] = "math:no_reference" if a is None else f"math:{next(it)}"
    if code_items:
        from fusechat.score.sandbox import check_code_many

        runnable = [(i, t, ref) for i, t, ref in code_items if ref.get("tests")]
        out = check_code_many(
            [
                (close_fence(t), code_tests(ref["tests"], ref.get("entry_point"), ref.get("setup")))
                for _, t, ref in runnable
            ],
            cfg.score.code,
        )
        for i, _, _ in code_items:
            verdicts[i] = "code:no_tests"
        for (i, _, _), v in zip(runnable, out, strict=True):
            verdicts[i] = f"code:{v}"
    return verdicts


def is_correct(verdict: str) -> bool:
    return verdict.endswith((":correct", ":pass"))


def accuracy_by_set(rows: list[dict[str, Any]], verdicts: list[str]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for row, v in zip(rows, verdicts, strict=True):
        t = totals.setdefault(row["set"], [0, 0])
        t[0] += is_correct(v)
        t[1] += 1
    return {name: round(c / n, 4) for name, (c, n) in totals.items()}
