import pytest

from fusechat.config import ScoreConfig
from fusechat.score.exact import check_exact
from fusechat.score.stage import Scorers, score_rows


@pytest.mark.parametrize(
    "response, reference, verdict",
    [
        ("41", "41", "exact:correct"),
        ("answer: 41", "41", "exact:correct"),
        ("= 1 4 5", "1 4 5", "exact:correct"),
        ("The answer is  1  4 5 ", "1 4 5", "exact:correct"),
        ("141", "41", "exact:wrong"),
        ("41 apples", "41", "exact:wrong"),
        ("ABC", "abc", "exact:wrong"),
        ("x", None, "exact:no_reference"),
    ],
)
def test_check_exact(response, reference, verdict):
    assert check_exact(response, reference) == verdict


def test_exact_route_sets_correct():
    rows = [
        {
            "prompt_id": "p",
            "source": "s",
            "sample_index": i,
            "text": t,
            "domain": "add",
            "messages": [],
            "reference": {"answer": "41"},
        }
        for i, t in enumerate(["= 41", "42"])
    ]
    from fusechat.score.stage import LiveScorers

    score = ScoreConfig(default_route=["exact"])
    out, timings = score_rows(rows, score, Scorers(exact=LiveScorers._exact))
    assert [(r["verdict"], r["correct"]) for r in out] == [("exact:correct", True), ("exact:wrong", False)]
    assert timings["exact"]["responses"] == 2
