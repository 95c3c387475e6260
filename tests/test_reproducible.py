"""Same inputs, same config, same seed: the same bytes. The small pipeline (tests/fault_world.py) run a second time
from scratch, by `fusechat run` in another folder and another process, must write every file of every version
(Parquet data with its metadata, the prompts version's responses.parquet, stats.json, the SFT model's weights,
config and tokenizer, log_history.json) and of every samples part (part.json and its chunks, which the samples
version links) byte for byte as the first run did; timings, dates and host facts live in the manifests only (and
in a part's hidden side files). Hardware: CPU (the same seed gives the same weights on CPU; GPU kernels need not be
deterministic)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from fault_world import ENV, NAME, data_files

from fusechat.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.cpu_only]
STAGES = ("prompts", "samples", "scores", "datasets", "sft")


def test_two_runs_from_scratch_write_the_same_bytes(fault_world, tmp_path):
    folder = fault_world.case(tmp_path / "again", "prompts")  # the config only: nothing copied
    run = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "run", "-c", "cfg.yaml", "--until", "sft"],
        cwd=folder,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = RunStore(folder / "runs" / NAME)
    compared = 0
    for stage in STAGES:
        [first], [second] = fault_world.store.versions(stage), store.versions(stage)
        assert second.fingerprint == first.fingerprint  # the same run: configs and inputs agree
        a, b = data_files(first.path), data_files(second.path)
        assert sorted(a) == sorted(b), stage
        assert [name for name in a if a[name] != b[name]] == [], stage
        compared += len(a)
        for f in first.path.rglob("*.parquet"):  # no timing, host or pid in any Parquet metadata
            metadata = pq.read_schema(f).metadata or {}
            words = (b"wall_s", b"generate_s", b"seconds", b"host", b"pid", b"device")
            assert not any(w in v for v in metadata.values() for w in words), (f, metadata)
    a, b = (data_files(root / "samples" / "parts") for root in (fault_world.run_dir, store.root))
    assert sorted(a) == sorted(b) and [name for name in a if a[name] != b[name]] == []
    assert len(a) == 3 + 18  # part.json of each source, and their chunks
    assert "responses.parquet" in data_files(store.latest("prompts").path)
    compared += len(a)
    # chunks of samples and scores, prompts and answers, datasets, model files, and the parts
    assert compared >= 18 + 22 + 2 + 3 + 5 + 21
