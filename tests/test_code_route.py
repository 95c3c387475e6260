"""The code domain end to end on files in the real layouts of the recipes' code datasets (`code_fixtures.py`):
prompts with tests made at ingest, each kept prompt's tests passed by the dataset's own solution and failed by a
do-nothing and a wrong program; the real score stage (tiny reward model + the sandbox); build yielding code SFT
rows and DPO pairs; the one-line refusal where the machine cannot isolate code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from code_fixtures import CORRECT_AND_WRONG, LEETCODE_ROWS, SELF_OSS_ROWS, write_leetcode, write_self_oss
from hand_samples import sample_row, write_samples

from fusechat.build import run_build
from fusechat.code_tests import DROP_REASONS, has_checks
from fusechat.config import load_config
from fusechat.prompts import read_prompts, run_prompts
from fusechat.score.sandbox import DENY_NAMESPACES_ENV, check_code_many, isolation
from fusechat.score.stage import run_score
from fusechat.store import RunStore

pytestmark = pytest.mark.skipif(isolation() == "none", reason="no isolation on this machine")
DO_NOTHING = "```python\npass\n```"


def write_config(root: Path, reward: Path, target: Path) -> Path:
    cfg = {
        "name": "code",
        "workdir": str(root / "runs"),
        "seed": 5,
        "prompts": {
            "sft_ratio": {"code": 0.5},
            "sources": [
                {
                    "name": "leetcode",
                    "path": str(write_leetcode(root / "leetcode.jsonl")),
                    "domain": "code",
                    "fields": {"prompt": "content"},
                    "code_tests": {"format": "leetcode", "solution": "python"},
                },
                {
                    "name": "self-oss-instruct",
                    "path": str(write_self_oss(root / "self-oss.parquet")),
                    "domain": "code",
                    "fields": {"prompt": "instruction"},
                    "code_tests": {"format": "self-oss", "solution": "response"},
                },
            ],
        },
        "score": {
            "reward_model": {"path": str(reward), "dtype": "float32", "batch_size": 8},
            "routes": {"code": ["reward", "code"]},
            "code": {"timeout_s": 5, "workers": 2},
            "shard_size": 64,
        },
        "build": {"verified_domains": {"code": "code"}, "margin": [0.0, 1000.0], "max_length": 4096},
        "target": {"path": str(target)},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    from fusechat.demo.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("code")
    # A window that holds every answer: a response the reward model saw only in part is no candidate.
    reward = make_tiny(root / "reward", TinySpec(arch="llama", chat="chatml", max_positions=2048, seed=5), reward=True)
    cfg = load_config(write_config(root, reward, tiny_llama), check_trl=False)
    store = RunStore(cfg.run_dir)
    prompts = run_prompts(cfg, store, log=lambda m: None)
    return root, cfg, store, prompts


def _function_of(tests: str) -> str:
    return next(name for name in CORRECT_AND_WRONG if f"'{name}'" in tests or f"{name}(" in tests)


def test_prompts_keep_code_with_tests_and_count_every_drop(world):
    _, _, _, prompts = world
    by_source = prompts.manifest["counts"]["by_source"]
    for name, rows in (("leetcode", LEETCODE_ROWS), ("self-oss-instruct", SELF_OSS_ROWS)):
        expected = [outcome for *_, outcome in rows.values()]
        drops = {f"dropped_{r}": expected.count(r) for r in DROP_REASONS if r in expected}
        assert by_source[name] == {"read": len(rows), "kept": len(expected) - sum(drops.values()), **drops}
    table = read_prompts(prompts).to_pylist()
    assert len(table) == 9 and {r["domain"] for r in table} == {"code"}
    assert all(has_checks(json.loads(r["reference"])["tests"]) for r in table)  # every kept prompt carries tests
    kept = {_function_of(json.loads(r["reference"])["tests"]) for r in table}
    expected_kept = {o for *_, o in [*LEETCODE_ROWS.values(), *SELF_OSS_ROWS.values()] if o not in DROP_REASONS}
    assert kept == expected_kept == set(CORRECT_AND_WRONG)
    leetcode = [r for r in table if r["origin"] == "leetcode"]
    # the function to write is named where the problem text does not name it; self-oss instructions that name
    # it in backticks are left as they are
    assert any(r["messages"][-1]["content"].endswith("function `pairIndices(nums, target)`.") for r in leetcode)
    clamp = next(r for r in table if "clamp" in r["messages"][-1]["content"])
    assert clamp["messages"][-1]["content"].endswith("to the closed range [low, high].")


def test_own_solutions_pass_and_wrong_or_empty_programs_fail(world):
    _, cfg, _, prompts = world
    table = read_prompts(prompts).to_pylist()
    solutions = {content: python for content, python, _ in LEETCODE_ROWS.values()}
    items, expected = [], []
    for row in table:
        tests = json.loads(row["reference"])["tests"]
        good, wrong = CORRECT_AND_WRONG[_function_of(tests)]
        text = row["messages"][-1]["content"]
        own = next(
            (f"```python\n{python}\n```" for content, python in solutions.items() if text.startswith(content)),
            next((r for i, (r, _) in SELF_OSS_ROWS.items() if text.startswith(i)), None),
        )
        assert own is not None
        items += [(own, tests), (good, tests), (wrong, tests), (DO_NOTHING, tests)]
        expected += ["pass", "pass", "fail", "fail"]
    assert check_code_many(items, cfg.score.code) == expected


def _write_samples(store: RunStore, prompts):
    """Two sources answer each code prompt three times: correct, wrong, and broken (syntax / undefined name)."""
    rows = []
    for p in read_prompts(prompts).to_pylist():
        good, wrong = CORRECT_AND_WRONG[_function_of(json.loads(p["reference"])["tests"])]
        broken = ["```python\ndef f(:\n    pass\n```", "```python\nresult = helper(1)\n```"]
        for s, source in enumerate(("alpha", "beta")):
            rows += [sample_row(p["prompt_id"], source, k, text) for k, text in enumerate((good, wrong, broken[s]))]
    return write_samples(store, prompts, rows), rows


@pytest.mark.slow
def test_score_then_build_yield_code_sft_rows_and_dpo_pairs(world):
    root, cfg, store, prompts = world
    _, samples = _write_samples(store, prompts)
    scores = run_score(cfg, store, log=lambda m: None)
    verdicts = scores.manifest["counts"]["by_verdict"]
    n = len(samples) // 3
    assert verdicts["code:pass"] == n and verdicts["code:fail"] == n
    assert verdicts["code:syntax_error"] == n // 2 and verdicts["code:undefined_name"] == n // 2
    table = pq.read_table(scores.data).to_pylist()
    assert {r["verdict"].split(",")[1]: r["correct"] for r in table} == {
        "code:pass": True,
        "code:fail": False,
        "code:syntax_error": False,
        "code:undefined_name": False,
    }

    logs: list[str] = []
    version = run_build(cfg, store, log=logs.append)
    stats = json.loads((version.path / "stats.json").read_text())
    code = stats["domains"]["code"]
    assert code["sft_rows"] == code["prompts"]["sft"] > 0  # every SFT prompt has a correct answer
    # and a wrong one from the same source; the tiny reward model's gaps decide which pairs fall in the band
    assert code["dpo_pairs"] > 0 and set(code["dropped_prompts"]["dpo"]) <= {"margin_below_band"}, code
    assert code["candidates"] == len(samples) and code["acceptable"] == n
    assert set(code["by_source"]) == {"alpha", "beta"} and stats["warnings"] == []
    origins = code["by_origin"]
    assert set(origins) == {"leetcode", "self-oss-instruct"}
    assert sum(o["sft_rows"] + o["dpo_pairs"] for o in origins.values()) == code["sft_rows"] + code["dpo_pairs"]
    assert sum(sum(o["prompts"].values()) for o in origins.values()) == 9
    sft = pq.read_table(version.path / "sft" / "train.parquet").to_pylist()
    assert all(r["domain"] == "code" and "```python" in r["messages"][-1]["content"] for r in sft)
    dpo = pq.read_table(version.path / "dpo" / "train.parquet").to_pylist()
    good = {g for g, _ in CORRECT_AND_WRONG.values()}
    assert all(r["chosen"][0]["content"] in good and r["rejected"][0]["content"] not in good for r in dpo)
    assert not [m for m in logs if m.startswith("WARNING")]


def run_cli(*args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fusechat.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_without_isolation_code_routes_are_refused_with_one_line(world):
    root, _, store, prompts = world
    if not store.versions("samples"):
        _write_samples(store, prompts)
    deny = {DENY_NAMESPACES_ENV: "1"}
    for stage in ("score", "prompts"):
        res = run_cli(stage, "-c", str(root / "cfg.yaml"), "--force", cwd=root, env=deny)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "score.code.allow_no_isolation" in lines[0], res.stderr
        assert "set score.code.allow_no_isolation: true" in lines[0]
    assert not store.partials("scores")  # refused before anything was written


def test_prompts_cli_counts_drops_per_source_and_warns_on_an_empty_one(world, tmp_path):
    root, _, _, _ = world
    res = run_cli("prompts", "-c", str(root / "cfg.yaml"), cwd=root)
    assert res.returncode == 0, res.stderr
    assert "leetcode: read=10, kept=6, dropped_solution_fails=2" in res.stdout
    assert "self-oss-instruct: read=6, kept=3" in res.stdout
    cfg = yaml.safe_load((root / "cfg.yaml").read_text())
    untested = tmp_path / "untested.jsonl"
    untested.write_text(json.dumps({"instruction": "Reverse a string.", "response": "Use `s[::-1]`."}) + "\n")
    cfg["workdir"] = str(tmp_path / "runs")
    cfg["prompts"]["sources"][1]["path"] = str(untested)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("prompts", "-c", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "WARNING: prompt source 'self-oss-instruct' kept no prompts of 1 read (no_tests=1)" in res.stdout
