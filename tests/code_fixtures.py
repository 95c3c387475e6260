"""Small synthetic files in the real layouts of the recipes' two code datasets (content invented, shape real).

- greengerong/leetcode (JSON lines): `id` (int), `slug`, `title`, `difficulty`, `content` (LeetCode markdown:
  `**Input:** nums = \\[2,7\\], target = 9` / `**Output:** ...`, escaped brackets), and one column per language
  (`java`, `c++`, `python`, `javascript`), each "\\n    ```lang\\n<code>\\n```\\n    \\n    <explanation>\\n    ".
- bigcode/self-oss-instruct-sc2-exec-filter-50k (Parquet): `fingerprint` (null), `sha1`, `seed`, `response`,
  `concepts` (list of strings), `prompt` (the generation prompt), `instruction`, `id` (int). Responses come in
  SelfCodeAlign's tagged layout (`[Reasoning]`, `[Implementation]`, `[Explanation]`, `[Tests]`) or sanitized
  without tags (tests: a last block of asserts), and some have no tests.

`LEETCODE` and `SELF_OSS` say what the prompts stage must make of each row: kept (with the solution's function)
or dropped with a reason. `CORRECT` / `WRONG` hold model-style answers for the kept prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _lang(lang: str, code: str, explanation: str = "The algorithm walks the input once.") -> str:
    return f"\n    ```{lang}\n{code.strip()}\n```\n    \n    {explanation}\n    "


def _problem(statement: str, examples: list[tuple[str, str]], constraints: str = "`1 <= n <= 100`") -> str:
    parts = [statement]
    for i, (given, out) in enumerate(examples, 1):
        parts.append(f"**Example {i}:**\n\n**Input:** {given}\n**Output:** {out}")
    parts.append(f"**Constraints:**\n\n*   {constraints}")
    return "\n\n".join(parts)


# slug -> (content, python solution, expected outcome: function name or drop reason)
LEETCODE_ROWS = {
    "pair-indices": (
        _problem(
            "Given an array of integers `nums` and an integer `target`, return _indices of the two numbers such "
            "that they add up to `target`_.\n\nYou can return the answer in **any order**.",
            [("nums = \\[2,7,11,15\\], target = 9", "\\[0,1\\]"), ("nums = \\[3,2,4\\], target = 6", "\\[1,2\\]")],
        ),
        "def pairIndices(nums, target):\n    seen = {}\n    for i, num in enumerate(nums):\n"
        "        if target - num in seen:\n            return [seen[target - num], i]\n"
        "        seen[num] = i\n    return []",
        "pairIndices",
    ),
    "reverse-vowels": (
        _problem(
            "Given a string `s`, reverse only all the vowels in the string and return it.",
            [('s = "hello "', '"holle "'), ('s = "leetcode "', '"leotcede "')],  # padded strings, as dumped
        ),
        "def reverse_vowels(s: str) -> str:\n    vowels = set('aeiouAEIOU')\n    chars = list(s)\n"
        "    i, j = 0, len(chars) - 1\n    while i < j:\n        if chars[i] not in vowels:\n            i += 1\n"
        "        elif chars[j] not in vowels:\n            j -= 1\n        else:\n"
        "            chars[i], chars[j] = chars[j], chars[i]\n            i += 1\n            j -= 1\n"
        "    return ''.join(chars)",
        "reverse_vowels",
    ),
    "transpose-grid": (
        _problem(
            "Given a 2D integer array `matrix`, return _the **transpose** of_ `matrix`.",
            [("matrix = \\[\\[1,2,3\\],\\[4,5,6\\]\\]", "\\[\\[1,4\\],\\[2,5\\],\\[3,6\\]\\]")],
        ),
        "def transpose(matrix):\n    return [list(row) for row in zip(*matrix)]",
        "transpose",
    ),
    "all-even": (
        _problem(
            "Return `true` if every number in `nums` is even, and `false` otherwise.",
            [("nums = \\[2,4\\]", "true"), ("nums = \\[1\\]", "false")],
        ),
        "def is_even_array(nums):\n    return all(n % 2 == 0 for n in nums)",
        "is_even_array",
    ),
    "mean-value": (
        _problem(
            "Return the mean of `nums`. Answers within `10-5` of the actual answer will be accepted.",
            [("nums = \\[1,2\\]", "1.50000"), ("nums = \\[4\\]", "4.00000")],
        ),
        "def mean(nums):\n    return sum(nums) / len(nums)",
        "mean",
    ),
    "rotate-right": (
        _problem(
            "Rotate `nums` to the right by `k` steps. **Do not** return anything, modify `nums` in-place instead.",
            [("nums = \\[1,2,3\\], k = 1", "\\[3,1,2\\]")],
        ),
        "def rotate(nums, k):\n    k %= len(nums)\n    nums[:] = nums[-k:] + nums[:-k]",
        "rotate",
    ),
    "tree-depth": (  # a tree as a level-order list: the dataset's solution takes a TreeNode, so it fails on a list
        _problem(
            "Given the `root` of a binary tree, return its maximum depth.",
            [("root = \\[3,9,20,null,null,15,7\\]", "3")],
        ),
        "class TreeNode:\n    def __init__(self, val=0, left=None, right=None):\n        self.val = val\n"
        "        self.left = left\n        self.right = right\n\n"
        "def maxDepth(root):\n    if root is None:\n        return 0\n"
        "    return 1 + max(maxDepth(root.left), maxDepth(root.right))",
        "solution_fails",
    ),
    "counter-design": (  # a class-design problem: its examples list calls on two lines
        'Design a counter.\n\n**Example 1:**\n\n**Input**\n\\["Counter ", "add "\\]\n\\[\\[\\], \\[1\\]\\]\n'
        "**Output**\n\\[null, null\\]\n\n**Constraints:**\n\n*   At most `100` calls.",
        "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def add(self, k):\n        self.n += k",
        "unparseable_tests",
    ),
    "sql-employees": (  # no Input/Output examples at all
        "Write a query that reports the second highest salary from the `Employee` table.",
        "def second_highest(rows):\n    return sorted(set(rows))[-2]",
        "no_tests",
    ),
    "wrong-solution": (
        _problem("Return the sum of `nums`.", [("nums = \\[1,2,3\\]", "6")]),
        "def total(nums):\n    return max(nums)",
        "solution_fails",
    ),
}


def write_leetcode(path: Path, rows_by_slug: dict = LEETCODE_ROWS) -> Path:
    rows = []
    for i, (slug, (content, python, _)) in enumerate(rows_by_slug.items(), 1):
        rows.append(
            {
                "id": i,
                "slug": slug,
                "title": slug.replace("-", " ").title(),
                "difficulty": ["Easy", "Medium", "Hard"][i % 3],
                "content": content,
                "java": _lang("java", "class Solution { /* ... */ }"),
                "c++": _lang("cpp", "int solve() { return 0; }"),
                "python": _lang("python", python),
                "javascript": _lang("javascript", "function solve() { return 0; }"),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tagged(reasoning: str, code: str, explanation: str, tests: str) -> str:
    return (
        f"[Reasoning]\n{reasoning}\n\n[Implementation]\nHere's how you can implement this function:\n\n"
        f"```python\n{code}\n```\n\n[Explanation]\n{explanation}\n\n[Tests]\n"
        f"You can validate this function with a few test cases:\n\n```python\n{tests}\n```\n\n"
        "These tests cover the common cases."
    )


# instruction -> (response, expected outcome: function name or drop reason)
SELF_OSS_ROWS = {
    "Write a Python function `clamp(x, low, high)` that limits `x` to the closed range [low, high].": (
        _tagged(
            "Compare against both bounds.",
            "def clamp(x, low, high):\n    assert low <= high, 'empty range'\n    return max(low, min(x, high))",
            "`min` caps the value from above, `max` from below.",
            "assert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2",
        ),
        "clamp",
    ),
    "Create a Python function that counts the words of a sentence (runs of non-space characters).": (
        "Splitting on whitespace gives the words.\n\n```python\ndef count_words(text: str) -> int:\n"
        "    return len(text.split())\n```\n\n`str.split` without arguments skips runs of spaces.\n\n"
        "To test it:\n\n```python\nassert count_words('a b  c') == 3\nassert count_words('') == 0\n```",
        "count_words",  # the sanitized layout: no tags, tests are the last block of asserts
    ),
    "Implement a Python class `Stack` with `push`, `pop` and `size`; test it thoroughly.": (
        "A list does the work.\n\n## Implementation\n\n```python\nclass Stack:\n    def __init__(self):\n"
        "        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n"
        "    def pop(self):\n        return self.items.pop()\n\n    def size(self):\n        return len(self.items)\n"
        "```\n\n## Tests\n\n```python\ns = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert s.size() == 1\n```",
        "Stack",
    ),
    "Write a Python function to reverse a string.": (  # tests removed by sanitization: nothing to run
        "Slicing with a negative step reverses.\n\n```python\ndef reverse(s: str) -> str:\n"
        "    assert isinstance(s, str)\n    return s[::-1]\n```\n\nThis runs in linear time.",
        "no_tests",
    ),
    "Write a Python function `double(x)` returning twice `x`.": (
        _tagged("Multiply by two.", "def double(x):\n    return x + 2", "Adds two.", "assert double(4) == 8"),
        "solution_fails",
    ),
    "Write a Python function `area(w, h)` for a rectangle.": (
        _tagged("Multiply.", "def area(w, h):\n    return w * h", "Width times height.", "assert 2 * 3 == 6"),
        "no_solution",  # the tests call nothing the solution defines
    ),
}


def write_self_oss(path: Path, rows_by_instruction: dict = SELF_OSS_ROWS) -> Path:
    rows = []
    for i, (instruction, (response, _)) in enumerate(rows_by_instruction.items()):
        rows.append(
            {
                "fingerprint": None,
                "sha1": f"{i:040x}",
                "seed": "def seed_function(x):\n    return x\n",
                "response": response,
                "concepts": ["list manipulation", "assertions"],
                "prompt": "### Instruction\nProvide the best response to a given instruction.\n...",
                "instruction": instruction,
                "id": 1000 + i,
            }
        )
    schema = pa.schema(
        [
            ("fingerprint", pa.null()),
            ("sha1", pa.string()),
            ("seed", pa.string()),
            ("response", pa.string()),
            ("concepts", pa.list_(pa.string())),
            ("prompt", pa.string()),
            ("instruction", pa.string()),
            ("id", pa.int64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def answer(code: str, usage: str = "") -> str:
    """A model-style answer: prose, the code block, then (optionally) a usage example in its own block."""
    text = f"Here is a solution.\n\n```python\n{code}\n```\n\nIt runs in linear time."
    return text + (f"\n\nFor example:\n\n```python\n{usage}\n```" if usage else "")


# function -> (a correct answer, a wrong answer) for each kept prompt
CORRECT_AND_WRONG = {
    "pairIndices": (
        answer(LEETCODE_ROWS["pair-indices"][1], "print(pairIndices([2, 7], 9))"),
        answer("def pairIndices(nums, target):\n    return [0, 1]"),
    ),
    "reverse_vowels": (
        answer(LEETCODE_ROWS["reverse-vowels"][1].replace("reverse_vowels", "reverseVowels"), "print(1)"),
        answer("def reverse_vowels(s):\n    return s[::-1]"),
    ),
    "transpose": (
        answer(LEETCODE_ROWS["transpose-grid"][1]),
        answer("def transpose(matrix):\n    return matrix"),
    ),
    "is_even_array": (
        answer("def is_even_array(nums):\n    return not any(n % 2 for n in nums)"),
        answer("def is_even_array(nums):\n    return True"),
    ),
    "mean": (
        answer("def mean(nums):\n    return sum(nums) / float(len(nums))"),
        answer("def mean(nums):\n    return 1"),
    ),
    "rotate": (
        answer("def rotate(nums, k):\n    for _ in range(k):\n        nums.insert(0, nums.pop())"),
        answer("def rotate(nums, k):\n    nums.reverse()"),
    ),
    "clamp": (
        answer("def clamp(x, low, high):\n    return low if x < low else high if x > high else x", "clamp(1, 0, 2)"),
        answer("def clamp(x, low, high):\n    return x"),
    ),
    "count_words": (
        answer("def count_words(text):\n    return len([w for w in text.split(' ') if w])"),
        answer("def count_words(text):\n    return text.count(' ') + 1"),
    ),
    "Stack": (
        answer(
            "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
            "        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n\n"
            "    def size(self):\n        return len(self.items)"
        ),
        answer("class Stack:\n    def push(self, x):\n        pass\n\n    def pop(self):\n        return None"),
    ),
}
