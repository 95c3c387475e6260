import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.config import FieldMap, FusechatConfig, PromptSource
from fusechat.prompts import assign_splits, prompt_id, record_to_row
from fusechat.store import RunStore

FUSECHAT = [sys.executable, "-m", "fusechat.cli"]


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*FUSECHAT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def make_world(root: Path, ratio: float = 0.5) -> Path:
    rows = [{"q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(40)]
    rows += [{"q": "What is 3 + 4?", "a": "7"}, {"q": "  What   is 3 + 4? ", "a": "7"}, {"q": "   ", "a": "0"}]
    (root / "math.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = [
        {
            "conversations": [{"from": "human", "value": f"Write a poem about {w}."}, {"from": "gpt", "value": "..."}],
            "cat": "poetry" if w != "sums" else "Math",
        }
        for w in ["cats", "dogs", "sums", "rain", "snow", "sun"]
    ]
    pq.write_table(pa.Table.from_pylist(convs), root / "chat.parquet")
    cfg = {
        "name": "demo",
        "workdir": "runs",
        "seed": 3,
        "prompts": {
            "sft_ratio": {"math": ratio, "instruction": 0.5},
            "sources": [
                {"name": "math", "path": "math.jsonl", "domain": "math", "fields": {"prompt": "q", "answer": "a"}},
                {
                    "name": "chat",
                    "path": "chat.parquet",
                    "domain": "instruction",
                    "fields": {"messages": "conversations"},
                    "exclude": {"cat": ["Math"]},
                },
            ],
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


# --------------------------------------------------------------------------------------------- pure core
def test_record_to_row_maps_fields_and_reference():
    src = PromptSource(name="s", path="x.jsonl", domain="math", fields=FieldMap(prompt="q", answer="a"))
    row = record_to_row({"q": "1+1?", "a": 2}, src)
    assert row["messages"] == [{"role": "user", "content": "1+1?"}]
    assert json.loads(row["reference"]) == {"answer": 2}
    assert row["prompt_id"] == prompt_id("math", row["messages"])
    assert record_to_row({"q": "  ", "a": 2}, src) == "empty"


def test_record_to_row_joins_columns_and_drops_trailing_assistant():
    src = PromptSource(name="s", path="x", domain="zh", fields=FieldMap(prompt=["instruction", "input"]))
    assert record_to_row({"instruction": "翻译", "input": "hello"}, src)["messages"][0]["content"] == "翻译\n\nhello"
    chat = PromptSource(name="c", path="x", domain="d", fields=FieldMap(messages="m"))
    row = record_to_row({"m": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, chat)
    assert row["messages"] == [{"role": "user", "content": "hi"}]


def test_prompt_id_is_stable_and_whitespace_insensitive():
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert prompt_id("math", msgs) == prompt_id("math", [{"role": "user", "content": " What  is\n2+2? "}])
    assert prompt_id("math", msgs) != prompt_id("code", msgs)
    assert prompt_id("math", msgs) == "701dbe731d2fe3f2608e"  # golden: ids must not drift between releases


def test_assign_splits_exact_ratio_and_order_independent():
    ids = [f"id{i}" for i in range(101)]
    a = assign_splits(ids, 0.4, seed=1)
    assert sum(v == "sft" for v in a.values()) == 40
    assert assign_splits(list(reversed(ids)), 0.4, seed=1) == a
    assert assign_splits(ids, 0.4, seed=2) != a
    assert set(assign_splits(ids, 1.0, seed=1).values()) == {"sft"}


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_prompts_cli_writes_caches_and_versions(tmp_path):
    cfg = make_world(tmp_path)
    r = run_cli("prompts", "-c", "cfg.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote: prompts/v001" in r.stdout
    table = pq.read_table(tmp_path / "runs/demo/prompts/v001/data/prompts.parquet")
    assert table.column_names == ["prompt_id", "domain", "split", "messages", "reference", "origin"]
    manifest = json.loads((tmp_path / "runs/demo/prompts/v001/manifest.json").read_text())
    assert manifest["counts"]["by_source"]["math"] == {
        "read": 43,
        "kept": 41,
        "dropped_duplicate": 1,
        "dropped_empty": 1,
    }
    assert manifest["counts"]["by_source"]["chat"] == {"read": 6, "kept": 5, "dropped_excluded": 1}
    assert manifest["counts"]["by_domain"] == {"instruction": {"sft": 2, "dpo": 3}, "math": {"sft": 20, "dpo": 21}}
    assert table.num_rows == 46 and len(set(table.column("prompt_id").to_pylist())) == 46

    again = run_cli("prompts", "-c", "cfg.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "cached: prompts/v001" in again.stdout
    assert sorted(p.name for p in (tmp_path / "runs/demo/prompts").iterdir() if not p.name.startswith(".")) == ["v001"]

    changed = run_cli("prompts", "-c", str(cfg), "--set", "prompts.sft_ratio.math=0.25", cwd=tmp_path)
    assert changed.returncode == 0 and "wrote: prompts/v002" in changed.stdout
    v2 = pq.read_table(tmp_path / "runs/demo/prompts/v002/data/prompts.parquet").to_pylist()
    assert sum(r["split"] == "sft" for r in v2 if r["domain"] == "math") == 10

    status = run_cli("status", "-c", "cfg.yaml", cwd=tmp_path)
    assert status.returncode == 0 and "v002" in status.stdout and "complete" in status.stdout


def test_same_inputs_same_ids_and_splits_elsewhere(tmp_path):
    """Another machine = another directory, same files and seed: identical ids and splits."""
    from fusechat.config import load_config
    from fusechat.prompts import read_prompts, run_prompts

    tables = []
    for d in ("m1", "m2"):
        root = tmp_path / d
        root.mkdir()
        make_world(root)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            v = run_prompts(load_config("cfg.yaml", check_trl=False), RunStore("runs/demo"), log=lambda s: None)
            tables.append(
                sorted(zip(*[read_prompts(v).column(c).to_pylist() for c in ("prompt_id", "split")], strict=True))
            )
        finally:
            os.chdir(cwd)
    assert tables[0] == tables[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d, root: d["prompts"].update(surces=[]),
            "cfg.yaml: prompts.surces: unknown key; did you mean sources?",
        ),
        (
            lambda d, root: d["prompts"]["sources"][0].update(path="missing.jsonl"),
            "prompts.sources[0].path: missing.jsonl: file not found",
        ),
        (
            lambda d, root: (root / "math.jsonl").write_text('{"q": "ok", "a": "1"}\n{"q": "broken"\n'),
            "math.jsonl:2: malformed JSON line",
        ),
        (
            lambda d, root: d["prompts"]["sources"][0]["fields"].update(prompt="question"),
            "math.jsonl:1: missing field 'question' (mapped by prompts.sources[0].fields)",
        ),
        (
            lambda d, root: d["prompts"]["sources"][0].update(path="no-such-org/no-such-dataset"),
            "prompts.sources[0] (math): cannot load hub dataset 'no-such-org/no-such-dataset' (offline, or not found)",
        ),
    ],
    ids=["typo", "missing-file", "malformed-jsonl", "unmapped-field", "hub-offline"],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, mutate, expected):
    cfg = make_world(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    mutate(data, tmp_path)
    cfg.write_text(yaml.safe_dump(data))
    r = run_cli("prompts", "-c", "cfg.yaml", cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr
    prompts_dir = tmp_path / "runs/demo/prompts"
    assert not prompts_dir.exists() or not [p for p in prompts_dir.iterdir() if p.name != ".lock"]


@pytest.mark.slow
def test_sigkill_leaves_no_complete_version(tmp_path):
    make_world(tmp_path)
    with (tmp_path / "math.jsonl").open("w") as fh:
        for i in range(400_000):
            fh.write(json.dumps({"q": f"What is {i} times 7 plus some padding text?", "a": str(i * 7)}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*FUSECHAT, "prompts", "-c", "cfg.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stage_dir = tmp_path / "runs/demo/prompts"
    deadline = time.time() + 60
    while time.time() < deadline and not (stage_dir.exists() and any(stage_dir.glob(".tmp-*/spill.parquet"))):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = RunStore(tmp_path / "runs/demo")
    assert store.versions("prompts") == []
    assert store.partials("prompts")  # the killed attempt's temp dir, never read as a version
    r = run_cli("prompts", "-c", "cfg.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [v] = store.versions("prompts")
    assert v.manifest["counts"]["prompts"] == 400_000 + 5
    assert store.partials("prompts") == []  # the dead process's temp dir was cleaned up


def test_local_dataset_dir_and_limit(in_tmp):
    import datasets

    datasets.Dataset.from_list([{"text": f"prompt {i}"} for i in range(20)]).save_to_disk("ds")
    cfg = FusechatConfig.model_validate(
        {
            "name": "d",
            "prompts": {
                "sources": [
                    {"name": "ds", "path": "ds", "domain": "instruction", "fields": {"prompt": "text"}, "limit": 7}
                ]
            },
        }
    )
    from fusechat.prompts import read_prompts, run_prompts

    v = run_prompts(cfg, RunStore("runs/d"), log=lambda s: None)
    assert read_prompts(v).num_rows == 7
    assert v.manifest["counts"]["by_domain"] == {"instruction": {"sft": 3, "dpo": 4}}
