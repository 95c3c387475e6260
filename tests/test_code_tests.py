"""Tests made from the code datasets' text (pure: nothing runs here; test_code_route.py runs them)."""

from __future__ import annotations

import pytest

from fusechat.code_tests import (
    CodeTests,
    entry_point,
    has_checks,
    leetcode_examples,
    leetcode_tests,
    parse_literal,
    self_oss_tests,
    split_top_level,
    unescape_markdown,
)


# --------------------------------------------------------------------------------------------- LeetCode text
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[2,7,11,15]", [2, 7, 11, 15]),
        ('"abc "', "abc "),
        ("'a'", "a"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[1,null,2,true]", [1, None, 2, True]),
        ("[[1,2],[3]]", [[1, 2], [3]]),
        ('["true","null"]', ["true", "null"]),  # words inside strings stay text
        ("2.00000", 2.0),
        ("-5", -5),
    ],
)
def test_leetcode_literals(text, value):
    assert parse_literal(text) == value


@pytest.mark.parametrize("text", ["nums", "x + 1", "[1, 2", "{'a': 1}", "Solution()"])
def test_what_is_not_a_literal_raises(text):
    with pytest.raises(ValueError):
        parse_literal(text)


def test_markdown_escapes_and_top_level_commas():
    assert unescape_markdown(r'nums = \[2,7\], s = "a\_b\*"') == 'nums = [2,7], s = "a_b*"'
    assert split_top_level('a = [1,2], b = "x, y", c = [[1],[2,3]]') == ["a = [1,2]", ' b = "x, y"', " c = [[1],[2,3]]"]


def test_examples_in_greengerong_markdown():
    content = (
        "Given `nums`...\n\n**Example 1:**\n\n**Input:** nums = \\[2,7,11,15\\], target = 9\n**Output:** \\[0,1\\]\n"
        "**Explanation:** Because nums\\[0\\] + nums\\[1\\] == 9.\n\n**Example 2:**\n\n"
        "**Input:** nums = \\[3,3\\], target = 6\n**Output:** \\[0,1\\]\n\n**Constraints:**\n\n*   `2 <= n`"
    )
    assert leetcode_examples(content) == [
        ([("nums", [2, 7, 11, 15]), ("target", 9)], [0, 1]),
        ([("nums", [3, 3]), ("target", 6)], [0, 1]),
    ]
    padded = '**Input:** s = "hello ", t = "x "\n**Output:** "holle "'
    assert leetcode_examples(padded) == [([("s", "hello"), ("t", "x")], "holle")]  # the dump's one-space padding
    same_line = "**Input:** n = 3 **Explanation:** three.\n**Output:** 6 **Explanation:** 1 + 2 + 3."
    assert leetcode_examples(same_line) == [([("n", 3)], 6)]
    unpadded = '**Input:** s = "a b "\n**Output:** "a b"'  # not every string padded: a real trailing space
    assert leetcode_examples(unpadded) == [([("s", "a b ")], "a b")]


def test_examples_that_cannot_become_tests():
    assert leetcode_examples("Write a SQL query.") == "no_tests"
    design = '**Input**\n\\["Counter", "add"\\]\n\\[\\[\\], \\[1\\]\\]\n**Output**\n\\[null, null\\]'
    assert leetcode_examples(design) == "unparseable_tests"
    assert leetcode_examples("**Input:** head = ListNode(1)\n**Output:** 1") == "unparseable_tests"
    assert leetcode_examples("**Input:** n = 3\n**Explanation:** none") == "unparseable_tests"


def test_entry_point_is_the_function_the_examples_call():
    helpers = "def is_valid(s):\n    return True\n\ndef count_valid(words):\n    return sum(map(is_valid, words))"
    assert entry_point(helpers, ["words"]) == ("count_valid", ["words"])
    named = "def solve(a, b):\n    return a\n\ndef add(x, y):\n    return x + y"
    assert entry_point(named, ["x", "y"]) == ("add", ["x", "y"])
    method = "class Solution:\n    def twoSum(self, nums, target):\n        return []"
    assert entry_point(method, ["nums", "target"]) == ("twoSum", ["nums", "target"])
    assert entry_point("def f(a):\n    return a", ["a", "b"]) is None


def test_leetcode_tests_call_the_solutions_function():
    content = "**Input:** nums = \\[1,2\\]\n**Output:** 3\n\nYou may return the answer in any order."
    made = leetcode_tests(content, "\n    ```python\ndef total(nums):\n    return sum(nums)\n```\n    \n    Sum.\n    ")
    assert isinstance(made, CodeTests)
    assert "_fusechat_entry('total')" in made.tests and "[(([1, 2],), 3)]" in made.tests
    assert "_fusechat_same(got, want, True)" in made.tests  # "any order" in the problem text
    assert made.hint == "Write the solution in Python as a function `total(nums)`." and made.mentions == ("`total(",)
    assert made.solution == "def total(nums):\n    return sum(nums)\n" and has_checks(made.tests)
    assert leetcode_tests(content, "no code here, only words") == "no_solution"
    assert leetcode_tests(content, "```python\ndef other(a, b):\n    pass\n```") == "no_solution"


# --------------------------------------------------------------------------------------------- self-oss text
def test_self_oss_tests_in_every_layout():
    code = "def inc(x):\n    return x + 1"
    tests = "assert inc(1) == 2"
    tagged = f"[Reasoning]\nAdd one.\n\n[Implementation]\n```python\n{code}\n```\n\n[Explanation]\nEasy.\n\n"
    tagged += f"[Tests]\nCheck it:\n\n```python\n{tests}\n```\n\nDone."
    heading = f"Add one.\n\n```python\n{code}\n```\n\n### Tests\n\n```python\n{tests}\n```"
    sanitized = f"Add one.\n\n```python\n{code}\n```\n\nTo test it:\n\n```python\n{tests}\n```"
    for response in (tagged, heading, sanitized):
        made = self_oss_tests(response)
        assert isinstance(made, CodeTests), response
        assert made.tests == tests + "\n" and made.solution == code + "\n"
        assert made.mentions == ("`inc",) and made.hint == "Your code will be tested by calling `inc`."


def test_self_oss_responses_without_usable_tests():
    code = "```python\ndef inc(x):\n    assert x >= 0\n    return x + 1\n```"
    assert self_oss_tests(f"Add one.\n\n{code}\n\nThat is all.") == "no_tests"  # tests removed upstream
    assert self_oss_tests(f"{code}\n\n[Tests]\nTry `inc(1)` yourself.") == "no_tests"
    assert self_oss_tests(f"{code}\n\n[Tests]\n```python\nprint(inc(1))\n```") == "no_tests"  # checks nothing
    assert self_oss_tests("[Tests]\n```python\nassert inc(1) == 2\n```") == "no_solution"
    assert self_oss_tests(f"{code}\n\n[Tests]\n```python\nassert 1 + 1 == 2\n```") == "no_solution"
