"""Ingestion as the paper did, on files in the real layouts (`recipe_fixtures.py`): a seeded (stratified) `limit`
that does not depend on file order, the code/math exclusion by category column or by the topic rule with counts,
HelpSteer2's multi-turn prompts as real turns, and OpenMathInstruct-2's solutions kept as existing answers."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest
from recipe_fixtures import (
    ALPACA_ZH,
    HELPSTEER2_MULTI_TURN,
    MAGPIE_ZH,
    math_problems,
    write_alpaca_gpt4_zh,
    write_helpsteer2,
    write_magpie_pro_dpo,
    write_magpie_qwen2_zh,
    write_openmathinstruct2,
    write_ultrafeedback,
)

from fusechat.config import FusechatConfig
from fusechat.prompts import read_prompts, read_responses, run_prompts, split_turns
from fusechat.store import RunStore
from fusechat.subset import Reservoir, allocate
from fusechat.topics import topic_of


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------- pure core
@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("Write a Python function that reverses a linked list.", "code"),
        ("Why does this fail?\n```js\nconsole.log(x)\n```", "code"),
        ("def add(a, b):\n    return a + b\nwhat does this do?", "code"),
        ("SELECT name FROM users WHERE id = 3 -- explain this query", "code"),
        ("用Python写一个函数，返回列表中的最大值。", "code"),
        ("这段代码为什么报错？", "code"),
        ("Solve for x: 2x + 3 = 11", "math"),
        ("What is 17 * 23?", "math"),
        ("Compute $\\frac{3}{4} + \\frac{1}{8}$.", "math"),
        ("Find the derivative of sin(x) cos(x).", "math"),
        ("What is the probability of rolling two sixes?", "math"),
        ("计算 12 乘以 15 等于多少？", "math"),
        ("求解方程 x^2 - 5x + 6 = 0。", "math"),
        ("Write a poem about autumn leaves.", None),
        ("What is the dress code for a wedding in June 2023-06-14?", None),
        ("Compile a list of ten famous painters.", None),
        ("Write a script for a two-minute film about a lighthouse.", None),
        ("How do I bake sourdough bread with 1/2 cup of starter?", None),
        ("请介绍一下长城的历史。", None),
        ("我的计算机开不了机怎么办？", None),
    ],
)
def test_topic_rule(text, topic):
    assert topic_of(user(text)) == topic
    assert topic_of(user(text), ["math"]) == (topic if topic == "math" else None) or topic == "code"


def test_topic_rule_reads_user_turns_only():
    messages = [{"role": "system", "content": "You write Python code."}, *user("Tell me about tea.")]
    assert topic_of(messages) is None


def test_allocate_is_proportional_with_largest_remainders():
    assert allocate(30, {"a": 40, "b": 10, "c": 30, "d": 20, "e": 5, "f": 15}) == {
        "a": 10,
        "b": 3,  # 2.5: remainder .5, tied with c's 7.5, and b sorts first
        "c": 7,
        "d": 5,
        "e": 1,
        "f": 4,  # 3.75: the largest remainder gets the first of the 2 seats left
    }
    assert allocate(5, {"a": 2, "b": 2}) == {"a": 2, "b": 2}  # everything fits
    assert sum(allocate(7, {"x": 1, "y": 1, "z": 100}).values()) == 7


def test_reservoir_keeps_the_same_sample_in_any_order():
    keys = [f"k{i}" for i in range(500)]

    def draw(order):
        r = Reservoir(limit=20, seed=3)
        for row, key in enumerate(order):
            assert r.offer(key, None) or key not in r.live
            if key in r.live:
                r.add(key, None, row)
        rows, strata = r.sample()
        assert strata == {None: {"available": 500, "kept": 20}}
        return {order[i] for i in rows}

    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert draw(keys) == draw(shuffled)
    assert len(draw(keys)) == 20
    assert draw(keys) != set(keys[:20])


def test_split_turns_helpsteer2():
    assert split_turns(HELPSTEER2_MULTI_TURN, {"user": "<extra_id_1>User", "assistant": "<extra_id_1>Assistant"}) == [
        {"role": "user", "content": "I want to plant tomatoes on my balcony."},
        {"role": "assistant", "content": "Good idea: pick a sunny spot and a deep pot."},
        {"role": "user", "content": "How often should I water them?"},
    ]


# --------------------------------------------------------------------------------------------- the stage
def ingest(tmp_path, sources: list[dict], seed: int = 1):
    cfg = FusechatConfig.model_validate(
        {"name": "r", "workdir": str(tmp_path / "runs"), "seed": seed, "prompts": {"sources": sources}}
    )
    version = run_prompts(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    return version, read_prompts(version).to_pylist()


SIZES = {"evol_instruct": 40, "false_qa": 10, "flan_v2_niv2": 30, "sharegpt": 20, "truthful_qa": 5, "ultrachat": 15}


def uf_source(path, **extra) -> dict:
    return {
        "name": "ultrafeedback",
        "path": str(path),
        "domain": "instruction",
        "fields": {"prompt": "instruction"},
        **extra,
    }


def test_limit_on_a_group_ordered_file_keeps_every_group_in_proportion(tmp_path):
    path = write_ultrafeedback(tmp_path / "uf.jsonl", SIZES)
    version, rows = ingest(tmp_path / "a", [uf_source(path, limit=30, stratify="source")])
    got = Counter(r["messages"][0]["content"].split("(")[1].split(" prompt")[0] for r in rows)
    assert got == allocate(30, SIZES) == {"evol_instruct": 10, "false_qa": 3, "flan_v2_niv2": 7, "sharegpt": 5,
                                           "truthful_qa": 1, "ultrachat": 4}  # fmt: skip
    counts = version.manifest["counts"]
    assert counts["by_source"]["ultrafeedback"] == {"read": 120, "kept": 30, "dropped_over_limit": 90}
    assert counts["strata"]["ultrafeedback"]["ultrachat"] == {"available": 15, "kept": 4}

    # The same rows in another order: the same sample.
    lines = path.read_text().splitlines()
    random.Random(5).shuffle(lines)
    (tmp_path / "shuffled.jsonl").write_text("\n".join(lines) + "\n")
    _, again = ingest(tmp_path / "b", [uf_source(tmp_path / "shuffled.jsonl", limit=30, stratify="source")])
    assert {r["prompt_id"] for r in again} == {r["prompt_id"] for r in rows}

    # Without stratify: a seeded sample of the whole file, not its first rows (which are all evol_instruct).
    _, plain = ingest(tmp_path / "c", [uf_source(path, limit=30)])
    groups = Counter(r["messages"][0]["content"].split("(")[1].split(" prompt")[0] for r in plain)
    assert len(plain) == 30 and len(groups) >= 4 and groups["evol_instruct"] < 30
    _, reseeded = ingest(tmp_path / "d", [uf_source(path, limit=30)], seed=2)
    assert {r["prompt_id"] for r in reseeded} != {r["prompt_id"] for r in plain}


def test_code_and_math_exclusion_by_column_and_by_rule_is_counted(tmp_path):
    uf = write_ultrafeedback(
        tmp_path / "uf.jsonl",
        2,
        extra=[("sharegpt", "Fix my Python code: it raises KeyError."), ("flan_v2_niv2", "Solve for x: 3x = 12")],
    )
    sources = [
        uf_source(uf, exclude_topics=["code", "math"]),
        {
            "name": "magpie-pro-dpo",
            "path": str(write_magpie_pro_dpo(tmp_path / "magpie.parquet", 10)),
            "domain": "instruction",
            "fields": {"prompt": "instruction"},
            "exclude": {"task_category": ["Math", "Coding & Debugging"]},
        },
        {
            "name": "alpaca-gpt4-zh",
            "path": str(write_alpaca_gpt4_zh(tmp_path / "alpaca_gpt4_data_zh.json")),
            "domain": "chinese",
            "fields": {"prompt": ["instruction", "input"]},
            "exclude_topics": ["code", "math"],
        },
        {
            "name": "magpie-qwen2-pro-zh",
            "path": str(write_magpie_qwen2_zh(tmp_path / "magpie_zh.parquet")),
            "domain": "chinese",
            "fields": {"prompt": "instruction"},
            "exclude": {"task_category": ["Math", "Coding & Debugging"]},
        },
    ]
    version, rows = ingest(tmp_path, sources)
    by_source = version.manifest["counts"]["by_source"]
    assert by_source["ultrafeedback"] == {"read": 14, "kept": 12, "dropped_code": 1, "dropped_math": 1}
    assert by_source["magpie-pro-dpo"] == {"read": 10, "kept": 6, "dropped_excluded": 4}
    assert by_source["alpaca-gpt4-zh"] == {"read": len(ALPACA_ZH), "kept": 4, "dropped_code": 1, "dropped_math": 1}
    assert by_source["magpie-qwen2-pro-zh"] == {"read": len(MAGPIE_ZH), "kept": 4, "dropped_excluded": 2}
    zh = [r["messages"][0]["content"] for r in rows if r["origin"] == "alpaca-gpt4-zh"]
    assert "把下面的句子翻译成英文。\n\n今天天气很好。" in zh


def test_helpsteer2_multi_turn_prompts_become_turns(tmp_path):
    source = {
        "name": "helpsteer2",
        "path": str(write_helpsteer2(tmp_path / "train.jsonl", 4)),
        "domain": "instruction",
        "fields": {
            "prompt": "prompt",
            "turn_markers": {"user": "<extra_id_1>User", "assistant": "<extra_id_1>Assistant"},
        },
    }
    version, rows = ingest(tmp_path, [source])
    assert version.manifest["counts"]["by_source"]["helpsteer2"] == {"read": 8, "kept": 4, "dropped_duplicate": 4}
    multi = next(r for r in rows if len(r["messages"]) > 1)
    assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user"]
    assert multi["messages"][-1]["content"] == "How often should I water them?"
    assert not any("<extra_id_1>" in m["content"] for r in rows for m in r["messages"])


def test_openmathinstruct2_solutions_are_kept_as_answers(tmp_path):
    source = {
        "name": "openmathinstruct2",
        "path": str(write_openmathinstruct2(tmp_path / "omi2.jsonl", n=6, solutions=3)),
        "domain": "math",
        "fields": {"prompt": "problem", "answer": "expected_answer", "response": "generated_solution"},
        "max_responses": 2,
        "limit": 4,
    }
    version, rows = ingest(tmp_path, [source])
    counts = version.manifest["counts"]["by_source"]["openmathinstruct2"]
    assert counts == {"read": 18, "kept": 4, "more_responses": 12, "dropped_over_limit": 2, "responses": 8}
    answers = read_responses(version).to_pylist()
    assert len(answers) == 8 and {a["origin"] for a in answers} == {"openmathinstruct2"}
    by_prompt = Counter(a["prompt_id"] for a in answers)
    assert set(by_prompt) == {r["prompt_id"] for r in rows} and set(by_prompt.values()) == {2}
    expected = dict(math_problems(6))
    for a in answers:
        problem = next(r for r in rows if r["prompt_id"] == a["prompt_id"])["messages"][0]["content"]
        assert a["text"].endswith(f"$\\boxed{{{expected[problem]}}}$.")
    assert sorted(a["response_index"] for a in answers if a["prompt_id"] == answers[0]["prompt_id"]) == [0, 1]
    assert pq.read_schema(version.path / "responses.parquet").names == ["prompt_id", "origin", "response_index", "text"]
    assert json.loads(rows[0]["reference"]) == {"answer": expected[rows[0]["messages"][0]["content"]]}


def test_a_stratify_column_missing_from_a_row_is_one_line(tmp_path):
    from fusechat.errors import UserError

    path = write_ultrafeedback(tmp_path / "uf.jsonl", 1)
    with pytest.raises(
        UserError, match=r"uf.jsonl:1: missing field 'origin' \(mapped by prompts.sources\[0\].stratify\)"
    ):
        ingest(tmp_path, [uf_source(path, limit=3, stratify="origin")])
