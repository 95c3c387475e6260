"""Runnable Python from text: a response's program, and the tests of the recipe's code datasets.

Pure functions, no execution (the sandbox runs what they return):

- `program_of(text)`: a response's program is what its Python blocks make together, so a final usage example
  cannot hide the solution. Blocks that do not parse on their own (a shell line, a `>>>` session) are left out,
  as StarCoder2's execution filter did.
- `self_oss_tests(response)`: bigcode/self-oss-instruct-sc2-exec-filter-50k answers end in a tests section
  (`[Tests]`, or a `## Tests` heading; in the sanitized layout without tags, a last block of top-level asserts).
  Its Python blocks are the tests, the blocks before it the dataset's own solution.
- `leetcode_tests(content, solution)`: greengerong/leetcode has no test column; the `**Input:** ... **Output:** ...`
  examples of the problem text (`nums = \\[2,7,11,15\\], target = 9`, JSON-style `true`/`null`, LeetCode's
  markdown escapes) become asserts calling the function that the dataset's own `python` solution defines.

A prompt without tests, with examples that do not parse, or without a usable solution gets a drop reason
instead (`DROP_REASONS`); the prompts stage counts them.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

DROP_REASONS = ("no_tests", "unparseable_tests", "no_solution", "solution_fails")
PYTHON_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
ANY_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
# `[Tests]` (SelfCodeAlign's tag), `## Tests` / `### Test cases` headings, or a bold `**Tests**` line.
TESTS_MARKER = re.compile(
    r"^[ \t]*(?:\[tests?\]|#{1,6}[ \t]*tests?\b[^\n]*|\*\*tests?(?: cases?)?:?\*\*:?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class CodeTests:
    """A prompt's tests (Python source) and the dataset's own solution (Python source, run against the tests at
    ingest). The tests call names the prompt does not always state: `hint` states them, and a prompt that holds
    every string of `mentions` (e.g. "`clamp") states them already."""

    tests: str
    solution: str
    hint: str
    mentions: tuple[str, ...]


# --------------------------------------------------------------------------------------------- programs
def python_blocks(text: str) -> list[str]:
    """The fenced Python blocks of a markdown text; else its unlabelled fenced blocks; else the whole text."""
    blocks = PYTHON_BLOCK.findall(text)
    if not blocks:
        blocks = [body for lang, body in ANY_BLOCK.findall(text) if not lang]
    if not blocks and "```" not in text:
        blocks = [text]
    return [textwrap.dedent(b) for b in blocks]


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def program_of(text: str) -> str | None:
    """The program a text's Python blocks make together (those that parse, in order); None when none parses."""
    kept = [b.strip("\n") for b in python_blocks(text) if b.strip() and parses(b)]
    return "\n\n".join(kept) + "\n" if kept else None


def has_checks(tests: str) -> bool:
    """Whether test code checks anything: an `assert`, a `raise`, or a call of `assert...` (unittest)."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert | ast.Raise):
            return True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", "")
            if name.startswith("assert"):
                return True
    return False


def defined_names(source: str) -> list[str]:
    """Top-level functions and classes a program defines, in order."""
    tree = ast.parse(source)
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]


def used_names(source: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


# --------------------------------------------------------------------------------------------- self-oss
def self_oss_tests(response: str) -> CodeTests | str:
    """Tests from a self-oss-instruct-sc2 response, with the response's own solution; or a drop reason."""
    markers = list(TESTS_MARKER.finditer(response))
    if markers:
        before, after = response[: markers[-1].start()], response[markers[-1].end() :]
        tests = program_of(after) if "```" in after else None
    else:
        # The sanitized layout has no tags: its tests are a last block of top-level asserts after the solution.
        blocks = list(PYTHON_BLOCK.finditer(response))
        last = textwrap.dedent(blocks[-1].group(1)) if blocks else ""
        if len(blocks) < 2 or not parses(last) or not any(isinstance(n, ast.Assert) for n in ast.parse(last).body):
            return "no_tests"
        before, tests = response[: blocks[-1].start()], last
    if not tests or not has_checks(tests):
        return "no_tests"
    solution = program_of(before) if "```" in before else None
    if solution is None:
        return "no_solution"
    names = tuple(n for n in defined_names(solution) if n in used_names(tests))
    if not names:
        return "no_solution"  # the tests call nothing the solution defines
    hint = "Your code will be tested by calling " + ", ".join(f"`{n}`" for n in names) + "."
    return CodeTests(tests=tests, solution=solution, hint=hint, mentions=tuple(f"`{n}" for n in names))


# --------------------------------------------------------------------------------------------- LeetCode
MARKDOWN_ESCAPE = re.compile(r"\\([\\\[\]_*`#~>+\-|{}().!])")
INPUT_LINE = re.compile(r"^[ \t]*\**[ \t]*Input[ \t]*:?[ \t]*\**[ \t]*:?[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
OUTPUT_LINE = re.compile(r"^[ \t]*\**[ \t]*Output[ \t]*:?[ \t]*\**[ \t]*:?[ \t]*(.*)$", re.IGNORECASE)
TRAILING_BOLD = re.compile(r"\s+\*\*")  # `**Output:** 3 **Explanation:** ...` on one line
NAMED_ARG = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*$", re.DOTALL)
JSON_WORDS = {"true": "True", "false": "False", "null": "None"}
LITERAL = int | float | str | bool | list | tuple | None


def unescape_markdown(text: str) -> str:
    """LeetCode's markdown escapes (`\\[2,7\\]`, `\\_`, `\\*`) back to plain characters."""
    return MARKDOWN_ESCAPE.sub(r"\1", text)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets and string literals."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def parse_literal(text: str) -> LITERAL:
    """A LeetCode value (`[1,null,2]`, `"ab"`, `true`, `2.00000`) as Python; ValueError if it is not one."""
    out, quote, i = [], "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        elif ch.isalpha():
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if word not in JSON_WORDS:
                raise ValueError(f"not a literal: {word!r}")
            out.append(JSON_WORDS[word])
            i = j - 1
        else:
            out.append(ch)
        i += 1
    try:
        value = ast.literal_eval("".join(out).strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError, TypeError):
        raise ValueError(f"not a literal: {text.strip()[:60]!r}") from None
    if not _plain(value):
        raise ValueError(f"not a plain value: {text.strip()[:60]!r}")
    return value


def _plain(value) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, int | float | str | bool)


def leetcode_examples(content: str) -> list[tuple[list[tuple[str | None, LITERAL]], LITERAL]] | str:
    """The (arguments, expected output) of each example of a problem text; or `no_tests` / `unparseable_tests`.
    A problem whose examples do not all parse (class-design problems list calls on two lines) is unparseable."""
    text = unescape_markdown(content)
    inputs = list(INPUT_LINE.finditer(text))
    if not inputs:
        return "no_tests"
    examples = []
    for m in inputs:
        rest = [line for line in text[m.end() :].splitlines() if line.strip()]
        out = OUTPUT_LINE.match(rest[0]) if rest else None
        given, want = (TRAILING_BOLD.split(g)[0] for g in (m.group(1), out.group(1) if out else ""))
        if not given.strip() or not want.strip():
            return "unparseable_tests"
        try:
            args = []
            for part in split_top_level(given):
                named = NAMED_ARG.match(part)
                args.append((named.group(1), parse_literal(named.group(2))) if named else (None, parse_literal(part)))
            expected = parse_literal(want)
        except ValueError:
            return "unparseable_tests"
        examples.append(_strip_padding(args, expected))
    return examples


def _strip_padding(args, expected):
    """Some LeetCode dumps pad every string literal with one trailing space (`"babad "`); when every string of
    an example ends in a space, take one off each."""
    strings: list[str] = []

    def collect(v):
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, list | tuple):
            for x in v:
                collect(x)

    for _, v in args:
        collect(v)
    collect(expected)
    if not strings or not all(s.endswith(" ") for s in strings):
        return args, expected

    def strip(v):
        if isinstance(v, str):
            return v[:-1]
        if isinstance(v, list | tuple):
            return type(v)(strip(x) for x in v)
        return v

    return [(n, strip(v)) for n, v in args], strip(expected)


def entry_point(solution: str, arg_names: list[str | None]) -> tuple[str, list[str]] | None:
    """The function of the solution that the examples call: a top-level function (or a method of `Solution`)
    whose parameters are the examples' argument names; else one taking that many arguments that no other
    function calls (the last such)."""
    tree = ast.parse(solution)
    functions: list[tuple[str, list[str], ast.AST]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions.append((node.name, [a.arg for a in node.args.args], node))
        elif isinstance(node, ast.ClassDef) and node.name == "Solution":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    functions.append((item.name, [a.arg for a in item.args.args][1:], item))
    if all(arg_names) and arg_names:
        exact = [(name, params) for name, params, _ in functions if params == arg_names]
        if exact:
            return exact[-1]
    fitting = [(name, params, node) for name, params, node in functions if len(params) == len(arg_names)]
    called = {
        n.func.id
        for _, _, node in functions
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    roots = [(name, params) for name, params, _ in fitting if name not in called]
    if roots:
        return roots[-1]
    return (fitting[-1][0], fitting[-1][1]) if fitting else None


LEETCODE_HARNESS = """\
# Tests from the examples of the problem text, calling {name}.
def _fusechat_entry(name):
    import re

    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
    for candidate in dict.fromkeys((name, snake, camel)):
        found = globals().get(candidate)
        if callable(found) and not isinstance(found, type):
            return found
        solution = globals().get("Solution")
        if isinstance(solution, type) and callable(getattr(solution, candidate, None)):
            return getattr(solution(), candidate)
    raise NameError(f"no function {{name}} defined")


def _fusechat_same(got, want, any_order):
    import math

    if isinstance(want, float) or isinstance(got, float):
        return (
            isinstance(got, int | float)
            and isinstance(want, int | float)
            and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5)
        )
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return False
        if all(_fusechat_same(g, w, any_order) for g, w in zip(got, want)):
            return True
        if any_order:
            return all(_fusechat_same(g, w, any_order) for g, w in zip(sorted(got, key=repr), sorted(want, key=repr)))
        return False
    return got == want


def _fusechat_examples():
    import copy

    entry = _fusechat_entry({name!r})
    for args, want in {cases}:
        given = copy.deepcopy(args)
        got = entry(*given)
        if got is None and want is not None and given:
            got = given[0]  # "do not return anything, modify it in place": the first argument is the answer
        assert _fusechat_same(got, want, {any_order}), f"{name}{{tuple(args)}} gave {{got!r}}, expected {{want!r}}"


_fusechat_examples()
"""


def leetcode_tests(content: str, solution_text: str) -> CodeTests | str:
    """Tests from a LeetCode problem's examples, calling the function of the dataset's own solution (markdown
    with a ```python block); or a drop reason."""
    examples = leetcode_examples(content)
    if isinstance(examples, str):
        return examples
    solution = program_of(solution_text or "")
    if solution is None:
        return "no_solution"
    names = {tuple(n for n, _ in args) for args, _ in examples}
    if len(names) != 1:
        return "unparseable_tests"  # examples disagree on the arguments
    entry = entry_point(solution, list(next(iter(names))))
    if entry is None:
        return "no_solution"
    name, params = entry
    cases = [(tuple(v for _, v in args), want) for args, want in examples]
    any_order = bool(re.search(r"\bany order\b", content, re.IGNORECASE))
    tests = LEETCODE_HARNESS.format(name=name, cases=repr(cases), any_order=any_order)
    hint = f"Write the solution in Python as a function `{name}({', '.join(params)})`."
    return CodeTests(tests=tests, solution=solution, hint=hint, mentions=(f"`{name}(",))
