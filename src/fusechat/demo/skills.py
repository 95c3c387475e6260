"""The demo world's skills: short chat tasks with one exact answer each, in several wordings.

A prompt is generated from a seeded `random.Random`; the same seed gives the same prompts on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
    wording = rng.choice(["sort: {d}", "sort the digits {d}", "order {d}"])
    return wording.format(d=" ".join(digits)), " ".join(sorted(digits))


def _count(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcd") for _ in range(rng.randint(3, 8)))
    wording = rng.choice(["count a: {w}", "how many a in {w}?", "a's in {w}"])
    return wording.format(w=word), str(word.count("a"))


def _max(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(5, 9))]
    wording = rng.choice(["max: {d}", "largest of {d}", "biggest digit in {d}"])
    return wording.format(d=" ".join(digits)), max(digits)


def _last(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    wording = rng.choice(["last: {w}", "last letter of {w}", "{w} ends with?"])
    return wording.format(w=word), word[-1]


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "count": _count,
    "sort": _sort,
    "last": _last,
    "max": _max,
}

# Answer styles: each source answers in its own style, so the fused data visibly mixes teachers.
STYLES = {"plain": "{}", "answer": "answer: {}", "equals": "= {}"}


def make_prompts(
    skill: str, n: int, seed: int, exclude: set[str] = frozenset(), unique: bool = True
) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of one skill, none in `exclude`. Unique while the skill's space allows; then
    repeats are allowed (a small skill space)."""
    rng = random.Random(f"{seed}:{skill}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        prompt, answer = SKILLS[skill](rng)
        tries += 1
        if prompt in exclude:
            continue
        if unique and prompt in seen and tries < 50 * n:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def wrong_answer(skill: str, answer: str, rng: random.Random) -> str:
    """A plausible incorrect answer (for training the world's reward model)."""
    if skill in ("count", "max"):
        return str(max(0, int(answer) + rng.choice([-2, -1, 1, 2])) if int(answer) > 1 else int(answer) + 1)
    if skill == "sort":
        parts = answer.split()
        for _ in range(10):
            rng.shuffle(parts)
            if " ".join(parts) != answer:
                return " ".join(parts)
        return " ".join(parts + [str(rng.randrange(10))])
    return rng.choice([c for c in LETTERS if c != answer])  # last letter
