"""The stated rule behind `prompts.sources[].exclude_topics`: is a prompt about code or math?

The paper removed code and math prompts from its instruction and Chinese sets without saying how. Datasets with a
category column (Magpie: `task_category`) are filtered on it (`exclude`); the others (UltraFeedback, HelpSteer2,
alpaca_gpt4_zh) by this rule, which reads the user turns only:

- code: a fenced code block or a line of code (`def f(`, `#include`, `SELECT ... FROM`, `console.log`, ...), or
  programming vocabulary (a language name such as Python, JavaScript, C++, SQL; code (not dress/zip code),
  coding, programming, algorithm, compiler, debug, regex, API, ...; in Chinese 代码, 编程, 算法, 脚本, ...);
- math: LaTeX math (`\\frac`, `\\sqrt`, `$x^2$`, ...), an arithmetic expression or equation (`3 + 4`, `2x = 6`),
  or math vocabulary (equation, integral, derivative, probability, polynomial, theorem, ...; in Chinese 数学, 方程,
  计算, 积分, 概率, 几何, ...).

A keyword rule over-reaches at the margin (a poem about programming counts as code); its counts per source are in
the prompts manifest (`dropped_code`, `dropped_math`), so what it removed is visible.
"""

from __future__ import annotations

import re

VERSION = 1  # bump when the rule changes: cached prompts versions that used it are then rebuilt
CODE_PATTERNS = [
    re.compile(r"```"),
    re.compile(
        r"^\s*(?:def \w+\s*\(|class \w+\s*[:(]|import \w+|from [\w.]+ import |#include\b|public (?:static )?\w+|"
        r"(?:const|let|var) \w+\s*=|function\s*\w*\s*\(|for\s*\(.*;.*;|if\s*\(.+\)\s*\{|<\?php|</?(?:div|html|body)\b|"
        r"SELECT\b.+\bFROM\b)",
        re.MULTILINE,
    ),
    re.compile(r"console\.log\(|System\.out\.|printf\(|std::|\bnp\.\w|\bdf\.\w+\(|=>\s*\{|\$\(\w"),
    re.compile(
        r"(?<![a-z0-9_])(?:python|javascript|typescript|java|c\+\+|c#|golang|kotlin|scala|perl|php|sql|mysql|postgres(?:ql)?|"
        r"html|css|json|xml|yaml|bash|shell script|powershell|matlab|numpy|pytorch|tensorflow|django|node\.?js|"
        r"jquery|regex|regular expression|api|sdk|git|github|docker|kubernetes|linux command|"
        r"coding|coder|source code|snippet|programming|programmer|write a program|algorithm|algorithms|compiler|"
        r"debug|debugging|python script|function that|data structure|linked list|binary tree|recursion|recursive)(?![a-z0-9_])|"
        r"(?<!dress )(?<!zip )(?<!postal )(?<!morse )(?<![a-z0-9_])codes?(?![a-z0-9_])(?! of conduct)",
        re.IGNORECASE,
    ),
    re.compile(r"代码|编程|程序员|算法|脚本|调试|数据结构|正则表达式"),
]

MATH_PATTERNS = [
    re.compile(r"\\(?:frac|sqrt|sum|int|prod|lim|cdot|times|div|pi|theta|alpha|binom|log|sin|cos|tan)\b"),
    re.compile(r"\$[^$\n]*[\d^_=+\\][^$\n]*\$|\\\(|\\\["),
    # 3 + 4, 6*7, 2^10, 3 × 4, 12 - 5 (spaced, so that dates and ranges are not), 2x = 6, f(x) = x^2
    re.compile(r"\d\s*[+*×÷^]\s*\d|\d\s+[-/]\s+\d|\b\w{1,3}(?:\(\w\))?\s*=\s*-?\(?\d|\d[a-z]\s*[-+=]\s*\d"),
    re.compile(
        r"(?<![a-z0-9_])(?:math|maths|mathematics|mathematical|equation|equations|inequality|solve for|integral|integrate|"
        r"derivative|differentiate|calculus|probability|polynomial|quadratic|algebra|algebraic|geometry|"
        r"trigonometr\w*|theorem|prove that|factorial|prime numbers?|logarithm|matrix|matrices|arithmetic|"
        r"remainder when|divisible by|perimeter|hypotenuse|area of (?:a|the) (?:circle|triangle|rectangle|square)|"
        r"find (?:the value|all values)|standard deviation|calculate)(?![a-z0-9_])",
        re.IGNORECASE,
    ),
    re.compile(
        r"数学|方程|计算(?!机)|积分|导数|概率|几何|多项式|三角形|面积|周长|求解|化简|求证|质数|素数|余数|平方根"
    ),
]

TOPICS = ("code", "math")


def topic_of(messages: list[dict[str, str]], topics: list[str] | tuple[str, ...] = TOPICS) -> str | None:
    """The first of `topics` the user turns are about (code is checked before math), or None."""
    text = "\n".join(m["content"] for m in messages if m["role"] == "user")
    for topic in topics:
        patterns = CODE_PATTERNS if topic == "code" else MATH_PATTERNS
        if any(p.search(text) for p in patterns):
            return topic
    return None
