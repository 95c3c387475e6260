"""The static pass of the code verifier, before any test runs: the program must compile, and use no name that it
never defines (pyflakes' undefined names: a typo, a missing import, a helper the response forgot).

Only undefined names fail; style findings (unused imports, redefinitions) do not, and a star import makes
pyflakes unsure rather than failing. Stdlib and pyflakes only, no fusechat imports: the sandbox loads this file
by path and runs it on the untrusted program inside its confinement (parsing hostile text is not free either).
"""

from __future__ import annotations

import ast

from pyflakes import messages
from pyflakes.checker import Checker

FAILING = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


def static_verdict(source: str, filename: str = "solution.py") -> str | None:
    """None when the program passes; else `syntax_error` or `undefined_name` (the step that failed)."""
    try:
        tree = ast.parse(source, filename)
        compile(tree, filename, "exec")  # also what the parser accepts but the compiler does not (`return` at top)
        found = Checker(tree, filename).messages
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "syntax_error"
    return "undefined_name" if any(isinstance(m, FAILING) for m in found) else None


def undefined_names(source: str) -> list[str]:
    """The names pyflakes reports as undefined (for messages and tests)."""
    found = Checker(ast.parse(source), "solution.py").messages
    return [m.message_args[0] for m in found if isinstance(m, FAILING)]
