"""The prompts stage's hook for code datasets (`prompts.sources[].code_tests`): each record gets runnable tests
(`fusechat.code_tests`), which then run against the dataset's own solution in the sandbox, a batch at a time. A
record without tests, with examples that do not parse, without a usable solution, or whose solution fails its
tests carries a drop reason instead; `record_to_row` turns either into a prompts row or a counted drop.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from fusechat.code_tests import CodeTests, leetcode_tests, self_oss_tests
from fusechat.config import CodeVerifierConfig, PromptSource
from fusechat.errors import UserError

OUTCOME_KEY = "__fusechat_code_tests__"  # set on a record by `with_code_tests`, read by `record_to_row`
VERSION = 1  # bump when the tests made from a record change: cached prompts versions are then rebuilt


def tests_for(record: dict[str, Any], source: PromptSource, prompt_text: str) -> CodeTests | str:
    """A record's tests (unverified), or why it has none. `prompt_text` is the prompt the record maps to."""
    from fusechat.prompts import get_path

    spec = source.code_tests
    solution = get_path(record, spec.solution)
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"column {spec.solution!r} (code_tests.solution) is not text")
    if spec.format == "self-oss":
        return self_oss_tests(solution or "")
    return leetcode_tests(prompt_text, solution or "")


def with_code_tests(
    records: Iterator[tuple[str, dict[str, Any]]],
    source: PromptSource,
    limits: CodeVerifierConfig,
    where: str,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of a source, each with its tests (or drop reason) under OUTCOME_KEY when the source has
    `code_tests`; unchanged otherwise. Reads ahead one batch to run the dataset's solutions in parallel."""
    if source.code_tests is None:
        yield from records
        return
    from fusechat.prompts import record_to_messages
    from fusechat.score.sandbox import check_code_many, require_isolation

    if source.code_tests.verify:
        require_isolation(limits)
    size = max(32, 4 * limits.workers)
    while batch := list(islice(records, size)):
        outcomes: list[CodeTests | str] = []
        for location, record in batch:
            try:
                messages = record_to_messages(record, source.fields)
                outcomes.append(tests_for(record, source, messages[-1]["content"] if messages else ""))
            except KeyError as e:
                raise UserError(f"{location}: missing field {e.args[0]!r} (mapped by {where})") from None
            except ValueError as e:
                raise UserError(f"{location}: {e}") from None
        if source.code_tests.verify:
            todo = [i for i, o in enumerate(outcomes) if isinstance(o, CodeTests)]
            verdicts = check_code_many(
                [(f"```python\n{outcomes[i].solution}```", outcomes[i].tests) for i in todo], limits, static=False
            )
            for i, verdict in zip(todo, verdicts, strict=True):
                if verdict != "pass":
                    outcomes[i] = "solution_fails"
        for (location, record), outcome in zip(batch, outcomes, strict=True):
            yield location, {**record, OUTCOME_KEY: outcome}


def identity(limits: CodeVerifierConfig) -> dict[str, Any]:
    """What the verification at ingest depends on, for the prompts stage's fingerprint."""
    return {"version": VERSION, **limits.model_dump(mode="json", exclude={"workers"})}
