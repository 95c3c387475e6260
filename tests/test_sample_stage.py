"""The sample stage end to end on the transformers engine: --source, SIGKILL and resume, --shard jobs as separate
processes. Chunking is the same for both engines; the vLLM engine is exercised in test_sample_engines.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.config import load_config
from fusechat.prompts import run_prompts
from fusechat.sample import run_sample
from fusechat.store import RunStore

pytestmark = pytest.mark.slow
FUSECHAT = [sys.executable, "-m", "fusechat.cli"]
N_PROMPTS = 12


def cli(*args, cwd, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    cmd = [*FUSECHAT, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def world(in_tmp, tiny_llama, tiny_qwen2):
    rows = [
        {"q": f"Say something about the number {i}.", "kind": "chat" if i % 3 else "math"} for i in range(N_PROMPTS)
    ]
    (in_tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"engine": "transformers", "chunk_size": 2, "batch_size": 2, "sampling": {"max_tokens": 12}}
    cfg = {
        "name": "s",
        "workdir": "runs",
        "seed": 7,
        "prompts": {
            "sources": [
                {
                    "name": "chat",
                    "path": "p.jsonl",
                    "domain": "chat",
                    "fields": {"prompt": "q"},
                    "exclude": {"kind": ["math"]},
                },
                {
                    "name": "math",
                    "path": "p.jsonl",
                    "domain": "math",
                    "fields": {"prompt": "q"},
                    "exclude": {"kind": ["chat"]},
                },
            ]
        },
        "sources": [
            {"name": "llama", "model": str(tiny_llama), "samples": {"chat": 2, "math": 1}, **common},
            {"name": "qwen", "model": str(tiny_qwen2), "samples": {"math": 3}, **common},  # chat: k=0, not answered
        ],
    }
    (in_tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_prompts(load_config(in_tmp / "cfg.yaml"), RunStore(in_tmp / "runs" / "s"), log=lambda _: None)
    return in_tmp


EXPECTED_ROWS = 8 * 2 + 4 * 1 + 4 * 3  # llama: 8 chat x 2 + 4 math x 1; qwen: 4 math x 3


def files_of(parts, source):
    """{chunk file name: (inode, mtime)} of a source's part(s): a file rewritten or copied gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob(f"{source}-*/data/*.parquet")}


def version_files(version, source=""):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in version.data.glob(f"{source}*.parquet")}


def rows_of(version_dir):
    table = pq.read_table(version_dir / "data")
    return sorted(table.to_pylist(), key=lambda r: (r["source"], r["prompt_id"], r["sample_index"]))


def test_source_then_kill_then_resume_equals_an_uninterrupted_run(world):
    cfg = load_config(world / "cfg.yaml")
    store = RunStore(world / "runs" / "s")
    # --source llama: its chunks only; the version stays partial and says how far it is.
    assert run_sample(cfg, store, source="llama", log=lambda _: None) is None
    [partial] = store.partials("samples")
    assert json.loads((partial / "progress.json").read_text()) == {"chunks": "6/8", "llama": "6/6", "qwen": "0/2"}
    assert "partial" in cli("status", "-c", "cfg.yaml", cwd=world).stdout

    # Every source, killed with SIGKILL after its first new chunk lands (chunks land in each source's part).
    parts = store.root / "samples" / "parts"
    before = files_of(parts, "llama")
    proc = cli("sample", "-c", "cfg.yaml", cwd=world, wait=False)
    deadline = time.time() + 240
    while not files_of(parts, "qwen") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    survived = {**files_of(parts, "llama"), **files_of(parts, "qwen")}
    assert "qwen-00000.parquet" in survived and "qwen-00001.parquet" not in survived
    assert store.versions("samples") == []

    # Re-run: only the missing chunk is generated, finished chunk files are untouched.
    result = cli("sample", "-c", "cfg.yaml", cwd=world)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qwen: loading" in result.stdout and "1 of 2 chunks to do" in result.stdout
    assert "llama: loading" not in result.stdout and "llama: cached (samples/parts/llama-" in result.stdout
    [version] = store.versions("samples")
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in version.data.glob("*.parquet")}
    assert {name: after[name] for name in survived} == survived
    assert {name: after[name] for name in before} == before
    assert not list(version.data.glob(".*")) and not (version.path / "progress.json").exists()

    resumed = rows_of(version.path)
    assert len(resumed) == EXPECTED_ROWS
    assert len({(r["prompt_id"], r["source"], r["sample_index"]) for r in resumed}) == EXPECTED_ROWS
    counts = version.manifest["counts"]
    assert counts["samples"] == EXPECTED_ROWS
    assert counts["by_source"]["qwen"]["prompts"] == 4 and counts["by_source"]["llama"]["samples"] == 20
    assert counts["by_source"]["llama"]["tokens"] == sum(r["num_tokens"] for r in resumed if r["source"] == "llama")
    assert version.manifest["timings"]["by_source"]["qwen"]["tokens_per_s"] > 0
    assert {r["finish_reason"] for r in resumed} <= {"stop", "length"}

    # A cache hit does no work; --force regenerates from scratch and gives the same rows (seeds per chunk).
    assert "cached: samples/v001" in cli("sample", "-c", "cfg.yaml", cwd=world).stdout
    fresh = run_sample(cfg, store, force=True, log=lambda _: None)
    assert fresh.name == "v002"
    assert rows_of(fresh.path) == resumed

    # --shard 1/2 and 2/2 as two concurrent processes fill one version equal to the single run.
    assert cli("prompts", "-c", "cfg.yaml", "--set", "workdir=sharded", cwd=world).returncode == 0
    jobs = [
        cli("sample", "-c", "cfg.yaml", "--shard", s, "--set", "workdir=sharded", cwd=world, wait=False)
        for s in ("1/2", "2/2")
    ]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    [sharded] = RunStore(world / "sharded" / "s").versions("samples")
    assert rows_of(sharded.path) == resumed
    assert sharded.fingerprint == version.fingerprint


def test_adding_a_source_or_changing_one_samples_only_that_source(world):
    base = yaml.safe_load((world / "cfg.yaml").read_text())
    llama, qwen = base["sources"]
    store = RunStore(world / "runs" / "s")

    def sample(sources, name):
        (world / name).write_text(yaml.safe_dump({**base, "sources": sources}))
        result = cli("sample", "-c", name, cwd=world)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout, store.latest("samples")

    out, first = sample([llama], "one.yaml")
    assert "llama: loading" in out
    llama_files = version_files(first)
    assert set(llama_files) == {f"llama-{n:05d}.parquet" for n in range(6)}

    # Adding a source: only the new one is sampled; the other's files in the new version are the very same files.
    out, second = sample([llama, qwen], "two.yaml")
    assert "llama: cached (samples/parts/llama-" in out and "llama: loading" not in out and "qwen: loading" in out
    assert second.name == "v002"
    assert version_files(second, "llama") == llama_files
    assert version_files(first) == llama_files
    assert [r for r in rows_of(second.path) if r["source"] == "llama"] == rows_of(first.path)
    assert second.manifest["parts"]["llama"]["reused_from"] == "v001"
    assert second.manifest["parts"]["qwen"]["reused_from"] is None
    assert "llama=cached(v001) qwen=sampled" in cli("status", "-c", "two.yaml", cwd=world).stdout.replace("\n", "")

    # One source's temperature changes: only it is sampled again. Greedy (0) makes its k=3 samples identical, which
    # the manifest counts per source.
    out, third = sample([llama, {**qwen, "sampling": {**qwen["sampling"], "temperature": 0.0}}], "three.yaml")
    assert "llama: cached" in out and "llama: loading" not in out and "qwen: loading" in out
    assert version_files(third, "llama") == llama_files
    qwen_rows = [r for r in rows_of(third.path) if r["source"] == "qwen"]
    assert qwen_rows != [r for r in rows_of(second.path) if r["source"] == "qwen"]
    assert all(r["identical_samples"] for r in qwen_rows) and len(qwen_rows) == 12
    assert third.manifest["counts"]["by_source"]["qwen"]["identical_prompts"] == 4
    assert second.manifest["counts"]["by_source"]["qwen"]["identical_prompts"] == 0
    assert third.manifest["parts"]["llama"]["reused_from"] == "v001"

    # Back to the first settings: every part exists, so the version is made without sampling anything.
    out, back = sample([llama, qwen], "four.yaml")
    assert "cached: samples/v002" in out and back.name == "v003"
