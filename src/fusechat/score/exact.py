"""Exact-answer verifier for short-answer tasks (the demo's skills; any dataset whose reference is one string).

The response is correct when, after removing one leading answer marker ("answer:", "=", "the answer is") and
normalising whitespace, it equals the reference. Nothing else is tolerated: "41 apples" is wrong.
"""

from __future__ import annotations

import re

ANSWER_MARKER = re.compile(r"^\s*(?:the answer is|answer\s*[:=]|=)\s*", re.IGNORECASE)


def normalize(text: str) -> str:
    return " ".join(ANSWER_MARKER.sub("", text.strip(), count=1).split())


def check_exact(response: str, reference: object) -> str:
    """Verdict `exact:correct`, `exact:wrong` or `exact:no_reference`."""
    if reference is None or str(reference).strip() == "":
        return "exact:no_reference"
    return "exact:correct" if normalize(response) == normalize(str(reference)) else "exact:wrong"
