"""scripts/slurm_sample.sh against a fake `sbatch` that records what it is asked to submit: the recipe's sources
as sample arrays (a dataset source as one CPU job), then score, then build, each after the one before; and each job's
command, run as its job would run it, gives fusechat the intended arguments. Hardware: none (no Slurm needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = """#!{python}
import json, os, sys
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{100 + sum(1 for _ in open(log))}};cluster")
"""


def test_scripts_parse():
    for script in ("slurm_sample.sh", "slurm_train.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def option(call: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    if "--wrap" in call and name == "wrap":
        values.append(call[call.index("--wrap") + 1])
    return values[0] if values else None


def fake_slurm(tmp_path: Path, sbatch: str) -> dict[str, str]:
    """PATH with a fake `sbatch` (the script given), a `fusechat` that records its arguments, this venv's `python3`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(sbatch)
    (bin_dir / "fusechat").write_text(RECORD.format(python=sys.executable))  # records the arguments a job gives it
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
        "FAKE_LOG": str(tmp_path / "sbatch.jsonl"),
        "LOGS": str(tmp_path / "logs"),
    }


def test_slurm_sample_submits_sample_arrays_then_score_then_build(tmp_path):
    env = fake_slurm(tmp_path, RECORD.format(python=sys.executable))
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "slurm_sample.sh"),
            "configs/llama-3.1-8b.yaml",
            "--set",
            "workdir=/shared/r s",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    ids = [str(101 + i) for i in range(len(calls))]
    assert len(calls) == 1 + 6 + 1 + 1  # prompts, 6 sources, score, build
    prompts, *samples, score, build = calls
    assert option(prompts, "dependency") is None and option(prompts, "gres") is None

    models = samples[:5]
    assert [option(c, "job-name") for c in models] == [
        "fusechat-sample-gemma-2-27b-it",
        "fusechat-sample-mistral-large-2407",
        "fusechat-sample-qwen2.5-72b-instruct",
        "fusechat-sample-llama-3.1-70b-instruct",
        "fusechat-sample-qwen2.5-math-72b-instruct",
    ]
    for c in models:
        assert option(c, "array") == "1-4" and option(c, "gres") == "gpu:8" and option(c, "cpus-per-task") == "96"
        assert option(c, "dependency") == f"afterok:{ids[0]}"
    dataset = samples[5]  # llama-3.1-405b-instruct: OpenMathInstruct-2's answers, no model
    assert option(dataset, "job-name") == "fusechat-sample-llama-3.1-405b-instruct"
    assert option(dataset, "array") is None and option(dataset, "gres") is None
    assert option(score, "dependency") == "afterok:" + ":".join(ids[1:7])
    assert option(score, "array") == "1-2" and option(score, "gres") == "gpu:8"
    assert option(build, "dependency") == f"afterok:{ids[7]}" and option(build, "gres") is None
    assert f"build: job {ids[8]}" in done.stdout

    # Each job's command as its job runs it (sbatch --wrap: sh), with its array task id.
    (tmp_path / "sbatch.jsonl").write_text("")
    for call, task in ((prompts, None), (models[1], "3"), (dataset, None), (score, "2"), (build, None)):
        job_env = {**env, **({"SLURM_ARRAY_TASK_ID": task} if task else {})}
        subprocess.run(["sh", "-c", option(call, "wrap")], env=job_env, check=True)
    commands = [json.loads(line) for line in (tmp_path / "sbatch.jsonl").read_text().splitlines()]
    common = ["-c", "configs/llama-3.1-8b.yaml"]
    workdir = ["--set", "workdir=/shared/r s"]
    assert commands == [
        ["prompts", *common, *workdir],
        ["sample", *common, "--source", "mistral-large-2407", "--shard", "3/4", *workdir],
        ["sample", *common, "--source", "llama-3.1-405b-instruct", *workdir],
        ["score", *common, "--shard", "2/2", *workdir],
        ["build", *common, *workdir],
    ]


def test_slurm_sample_stops_on_a_bad_config_before_submitting(tmp_path):
    env = fake_slurm(tmp_path, "#!/bin/sh\necho submitted >&2\nexit 1\n")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_sample.sh"), "configs/llama-3.1-8b.yaml", "--set", "sources.0.x=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "submitted" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("error: configs/llama-3.1-8b.yaml: sources[0].x: unknown key")
    )
