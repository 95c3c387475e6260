"""End to end: `fusechat demo --small` builds a small world and runs every stage on it, as `make demo` does."""

import json
import os
import subprocess
import sys

import pytest

from fusechat.demo.run import DEMO_CONFIG, SMALL_OVERRIDES
from fusechat.store import RunStore


def demo(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "demo", "--small", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.mark.slow
def test_small_demo_runs_every_stage_with_lineage(small_demo):
    tmp_path, first = small_demo  # also rendered in Chromium by test_report.py
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "report: runs/demo/report.html" in first.stdout
    store = RunStore(tmp_path / "runs/demo")
    latest = {stage: store.latest(stage) for stage in ("prompts", "samples", "scores", "datasets", "sft", "dpo")}
    assert all(v is not None and v.manifest["status"] == "complete" for v in latest.values()), latest
    assert latest["samples"].manifest["inputs"] == {"prompts": latest["prompts"].name}
    assert latest["scores"].manifest["inputs"] == {"samples": latest["samples"].name, "prompts": latest["prompts"].name}
    assert latest["datasets"].manifest["inputs"] == {
        "prompts": latest["prompts"].name,
        "samples": latest["samples"].name,
        "scores": latest["scores"].name,
    }
    assert latest["sft"].manifest["inputs"] == {"datasets": latest["datasets"].name}
    assert latest["dpo"].manifest["inputs"] == {"datasets": latest["datasets"].name, "sft": latest["sft"].name}
    models = sorted(v.manifest["counts"]["model"] for v in store.versions("eval"))
    assert models == sorted(
        [
            "source:llama-src",
            "source:qwen2-src",
            "source:mistral-src",
            "target",
            f"sft/{latest['sft'].name}",
            f"dpo/{latest['dpo'].name}",
        ]
    )
    samples = latest["samples"].manifest["counts"]
    prompts = latest["prompts"].manifest["counts"]["prompts"]
    assert samples["samples"] == 3 * 4 * prompts  # three sources, k=4 on every prompt
    engine = "vllm" if "sampling engine: vllm" in first.stdout else "transformers"
    assert f"sampling engine: {engine}" in first.stdout

    result = json.loads((tmp_path / "runs/demo/results.json").read_text())
    assert [r["model"] for r in result["rows"]][-3:] == [
        "target before fusion",
        "target after SFT",
        "target after SFT+DPO",
    ]
    assert set(result["contributions"]) == {"llama-src", "qwen2-src", "mistral-src"}
    table = (tmp_path / "runs/demo/results.md").read_text()
    assert "| target after SFT |" in table and "| source | SFT rows won | DPO pairs |" in table

    second = demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cached: world" in second.stdout
    for ref in ("prompts", "samples", "scores", "datasets", "sft", "dpo"):
        assert f"cached: {latest[ref].ref}" in second.stdout
    assert len(store.versions("eval")) == 6  # every evaluation was a cache hit too

    # `fusechat run` on the demo config: every stage cached, then the eval section's before/after table.
    overrides = ["seed=0", *(f"sources.{i}.engine={engine}" for i in range(3)), *SMALL_OVERRIDES]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusechat.cli",
            "run",
            "-c",
            str(DEMO_CONFIG),
            *(a for o in overrides for a in ("--set", o)),
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    evals = {v.manifest["counts"]["model"]: v.ref for v in store.versions("eval")}
    for label in ("target", f"sft/{latest['sft'].name}", f"dpo/{latest['dpo'].name}"):
        assert f"cached: {evals[label]}" in run.stdout
    assert len(store.versions("eval")) == 6
    table = run.stdout[run.stdout.index("the target before and after fusion") :]
    for column in ("before fusion", "after SFT", "after DPO", "Δ after SFT", "Δ after DPO"):
        assert column in table
    by_model = {r["model"]: r["accuracy"] for r in result["rows"]}
    before, sft, dpo = (by_model[m] for m in ("target before fusion", "target after SFT", "target after SFT+DPO"))
    for skill in result["skills"]:
        row = next(line for line in table.splitlines() if line.startswith(f"│ {skill} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[1:4] == [f"{100 * acc[skill]:.1f}" for acc in (before, sft, dpo)]
        assert cells[5] == f"{round(100 * dpo[skill], 1) - round(100 * before[skill], 1):+.1f}"
    assert "average (4 benchmarks)" in table
    assert "report: runs/demo/report.html" in run.stdout
