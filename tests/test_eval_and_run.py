import json
import os
import subprocess
import sys

import pytest
import yaml

from fusechat.config import EvalSet, FieldMap, FusechatConfig
from fusechat.errors import UserError
from fusechat.eval import accuracy_by_set, check_responses, eval_rows, resolve_model
from fusechat.store import RunStore


def write_set(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(tmp_path, **extra) -> dict:
    write_set(tmp_path / "p.jsonl", [{"q": "count a: aab", "a": "2"}])
    write_set(tmp_path / "e.jsonl", [{"q": "count a: aba", "a": "2"}, {"q": "count a: bbb", "a": "0"}])
    return {
        "name": "t",
        "workdir": str(tmp_path / "runs"),
        "prompts": {
            "sources": [
                {
                    "name": "p",
                    "path": str(tmp_path / "p.jsonl"),
                    "domain": "count",
                    "fields": {"prompt": "q", "answer": "a"},
                }
            ]
        },
        "eval": {
            "sets": [
                {
                    "name": "count",
                    "path": str(tmp_path / "e.jsonl"),
                    "domain": "count",
                    "fields": {"prompt": "q", "answer": "a"},
                }
            ]
        },
        **extra,
    }


def test_eval_rows_checks_and_accuracy(tmp_path):
    cfg = FusechatConfig.model_validate(config(tmp_path))
    rows = eval_rows(cfg.eval.sets)
    assert [r["messages"][0]["content"] for r in rows] == ["count a: aba", "count a: bbb"]
    assert rows[0]["reference"] == {"answer": "2"}
    verdicts = check_responses(rows, ["answer: 2", "1"], cfg)
    assert verdicts == ["exact:correct", "exact:wrong"]
    assert accuracy_by_set(rows, verdicts) == {"count": 0.5}


def test_eval_set_without_prompts_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    s = EvalSet(name="x", path=str(tmp_path / "empty.jsonl"), domain="d", fields=FieldMap(prompt="q"))
    with pytest.raises(UserError, match=r"eval.sets\[0\].path: .*empty.jsonl: no prompts"):
        eval_rows([s])


def test_resolve_model_names_what_is_missing(tmp_path):
    cfg = FusechatConfig.model_validate(config(tmp_path))
    store = RunStore(cfg.run_dir)
    with pytest.raises(UserError, match="no complete sft version"):
        resolve_model(cfg, store, "sft", {})
    with pytest.raises(UserError, match="target: not configured"):
        resolve_model(cfg, store, None, {})
    with pytest.raises(UserError, match="--model nowhere: not dpo, sft, target, a source name"):
        resolve_model(cfg, store, "nowhere", {})
    label, runner, inputs = resolve_model(cfg, store, str(tmp_path), {})
    assert (label, runner.sampling.temperature, inputs) == (str(tmp_path), 0.0, {})


@pytest.mark.slow
def test_run_stops_at_the_first_error_with_the_stage_named(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config(tmp_path)))
    r = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "run", "-c", "cfg.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert r.returncode == 2
    assert "wrote: prompts/v001" in r.stdout
    assert r.stderr.strip().splitlines() == ["error: stage sample: sources: no source models configured"]
    assert RunStore(tmp_path / "runs/t").versions("samples") == []
