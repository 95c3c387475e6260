"""Scores follow the samples' per-source parts: after a source is added, only its responses are scored; the other
sources' score chunks are the earlier version's files (hard links), and the result equals scoring from scratch."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from recipe_fixtures import write_openmathinstruct2

from fusechat.config import FusechatConfig
from fusechat.prompts import run_prompts
from fusechat.sample import run_sample
from fusechat.score.stage import run_score
from fusechat.store import RunStore

pytestmark = pytest.mark.slow


def test_adding_a_source_scores_only_that_source(tmp_path, tiny_reward):
    omi2 = {
        "name": "omi2",
        "path": str(write_openmathinstruct2(tmp_path / "omi2.jsonl", n=8, solutions=3, wrong_every=3)),
        "domain": "math",
        "fields": {"prompt": "problem", "answer": "expected_answer", "response": "generated_solution"},
    }
    first = {"name": "first", "engine": "dataset", "dataset": "omi2", "samples": {"math": 1}, "chunk_size": 3}
    second = {"name": "second", "engine": "dataset", "dataset": "omi2", "samples": {"math": 3}, "chunk_size": 3}
    data = {
        "name": "s",
        "workdir": str(tmp_path / "runs"),
        "prompts": {"sources": [omi2]},
        "sources": [first],
        "score": {
            "reward_model": {"path": str(tiny_reward), "dtype": "float32", "max_length": 512},
            "routes": {"math": ["reward", "math"]},
            "shard_size": 2,
        },
    }
    store = RunStore(tmp_path / "runs" / "s")
    cfg = FusechatConfig.model_validate(data)
    run_prompts(cfg, store, log=lambda m: None)
    run_sample(cfg, store, log=lambda m: None)
    before = run_score(cfg, store, log=lambda m: None)
    files = {p.name: p.stat().st_ino for p in before.data.glob("*.parquet")}
    assert len(files) == 5  # 8 answers in 3 samples files (3, 3, 2 rows): ranges of up to 2 rows per file

    both = FusechatConfig.model_validate({**data, "sources": [first, second]})
    run_sample(both, store, log=lambda m: None)
    logs: list[str] = []
    after = run_score(both, store, log=logs.append)
    assert "scores: 5 of 18 chunks cached from scores/v001" in logs
    linked = {p.name: p.stat().st_ino for p in after.data.glob("*.parquet") if p.name in files}
    assert linked == files  # the very same files
    assert after.manifest["counts"]["responses"] == 8 + 24

    fresh = run_score(both, store, force=True, log=lambda m: None)  # scored from scratch, nothing linked
    assert not {p.stat().st_ino for p in fresh.data.glob("*.parquet")} & set(files.values())

    def rows(v):
        keyed = {(r["prompt_id"], r["source"], r["sample_index"]): r for r in pq.read_table(v.data).to_pylist()}
        return {k: (round(r["reward"], 4), r["correct"], r["verdict"]) for k, r in keyed.items()}

    assert rows(after) == rows(fresh)
