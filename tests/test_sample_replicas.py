"""Engine replicas of one source: the plan on simulated hardware (GPU counts, CUDA_VISIBLE_DEVICES, srun tasks,
hand-started --shard jobs, CPU cores; no GPU needed), and a CPU run with 2 replicas (processes) that writes the very
bytes one in-process engine writes. Hardware: CPU; the plan tests pass anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fusechat.config import SourceModel
from fusechat.errors import UserError
from fusechat.sample.replicas import in_process, replica_envs, replica_gpus
from fusechat.shards import ShardSpec
from fusechat.store import RunStore
from fusechat.workers import local_slot, run_workers, visible_ids


def vllm(tp: int = 1, pp: int = 1, replicas: int | None = None) -> SourceModel:
    args = {"tensor_parallel_size": tp} | ({"pipeline_parallel_size": pp} if pp > 1 else {})
    return SourceModel(name="big", model="x", engine_args=args, replicas=replicas)


def plan(source: SourceModel, n_gpus: int, env: dict[str, str] | None = None, shard: str = "1/1") -> list[str]:
    """CUDA_VISIBLE_DEVICES of each replica, as the job would start them."""
    env = env or {}
    groups = replica_gpus(source, "sources[0]", n_gpus, *local_slot(env, ShardSpec.parse(shard)))
    return [e["CUDA_VISIBLE_DEVICES"] for e in replica_envs(groups, visible_ids(env, n_gpus), cores=[0])]


def test_every_gpu_of_the_job_gets_a_replica():
    assert plan(vllm(tp=2), 8) == ["0,1", "2,3", "4,5", "6,7"]
    assert plan(vllm(tp=8), 8) == ["0,1,2,3,4,5,6,7"]
    assert plan(vllm(tp=4, replicas=1), 8) == ["0,1,2,3"]
    assert plan(vllm(tp=2, pp=2), 8) == ["0,1,2,3", "4,5,6,7"]
    assert plan(vllm(tp=3), 8) == ["0,1,2", "3,4,5"]  # 2 GPUs left idle: a third replica does not fit
    transformers = SourceModel(name="t", model="x", engine="transformers", engine_args={"tensor_parallel_size": 4})
    assert plan(transformers, 4) == ["0", "1", "2", "3"]  # one GPU each, whatever vLLM's keys say


def test_replicas_take_the_gpu_ids_the_job_was_given():
    # a Slurm job or a user gave this job GPUs 4-7: it takes them all, and names them as given
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert plan(vllm(tp=2), 4, env, shard="2/2") == ["4,5", "6,7"]
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}
    assert plan(vllm(), 2, uuids) == ["GPU-aa", "GPU-bb"]


def test_jobs_sharing_a_node_split_its_gpus():
    # two `--shard` jobs started by hand on one 8-GPU machine: each takes its half
    assert plan(vllm(tp=2), 8, shard="1/2") == ["0,1", "2,3"]
    assert plan(vllm(tp=2), 8, shard="2/2") == ["4,5", "6,7"]
    # srun with 2 tasks per node: the task's local id decides, not the shard
    srun = {"SLURM_JOB_ID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}
    assert plan(vllm(tp=4), 8, srun, shard="7/8") == ["4,5,6,7"]


def test_a_replica_that_does_not_fit_is_a_one_line_error():
    with pytest.raises(UserError) as e:
        plan(vllm(tp=8), 4)
    assert str(e.value) == (
        "sources[0].engine_args.tensor_parallel_size (big): a replica needs 8 GPUs but this job has 4; "
        "give the job more GPUs (CUDA_VISIBLE_DEVICES, --gres) or lower it"
    )
    with pytest.raises(UserError) as e:
        plan(vllm(tp=2, pp=2), 4, shard="2/2")
    assert str(e.value) == (
        "sources[0].engine_args.tensor_parallel_size x pipeline_parallel_size (big): a replica needs 2 x 2 = 4 GPUs "
        "but this job has 2 (GPUs 2-3 of 4: job 2 of 2 on this machine); give the job more GPUs "
        "(CUDA_VISIBLE_DEVICES, --gres) or lower it"
    )
    with pytest.raises(
        UserError, match=r"^sources\[0\]\.replicas \(big\): 5 replicas of 2 GPU\(s\) need 10 GPUs, this"
    ):
        plan(vllm(tp=2, replicas=5), 8)
    with pytest.raises(UserError, match=r"tensor_parallel_size: 'two' is not a whole number >= 1$"):
        plan(SourceModel(name="big", model="x", engine_args={"tensor_parallel_size": "two"}), 8)


def test_on_cpu_one_engine_runs_in_process_unless_replicas_split_the_cores():
    assert replica_gpus(vllm(tp=2), "sources[0]", 0, 0, 1) == [[]]  # tensor parallel is a GPU matter
    assert in_process([[]], 0)
    two = replica_gpus(vllm(replicas=2), "sources[0]", 0, 0, 1)
    assert two == [[], []] and not in_process(two, 0)
    assert replica_envs(two, [], cores=[0, 1, 2, 3]) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0,1", "OMP_NUM_THREADS": "2"},
        {"VLLM_CPU_OMP_THREADS_BIND": "2,3", "OMP_NUM_THREADS": "2"},
    ]
    # the job's OMP_NUM_THREADS caps each replica's threads; more replicas than cores share them
    assert [e["OMP_NUM_THREADS"] for e in replica_envs(two, [], cores=[0, 1, 2, 3], omp_threads=1)] == ["1", "1"]
    three = replica_envs([[], [], []], [], cores=[0, 1])
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in three] == ["0", "0", "1"]


def test_in_process_only_when_one_replica_uses_the_whole_job():
    assert in_process([[0, 1, 2, 3, 4, 5, 6, 7]], 8)
    assert not in_process([[0, 1, 2, 3]], 8)  # it must not see the other GPUs: a process of its own
    assert not in_process([[0, 1], [2, 3]], 4)


def test_replicas_is_placement_only():
    a, b = vllm(tp=2), vllm(tp=2, replicas=3)
    assert a.model_dump(mode="json") == b.model_dump(mode="json")  # fingerprints, parts and manifests agree
    with pytest.raises(ValueError, match="replicas"):
        SourceModel(name="d", engine="dataset", dataset="omi2", replicas=2)


def drain(tag: str, *, emit, tasks) -> None:
    """A worker of the test below: takes tasks from the shared queue until it is empty."""
    for task in tasks:
        if task == "bad":
            raise UserError("sources[0]: a user mistake")
        if task == "crash":
            raise ValueError("boom")
        emit("chunk", (tag, os.environ["REPLICA_ENV"], task))


def test_worker_processes_share_one_queue_and_report_failures():
    got = []
    run_workers(
        drain,
        [("a",), ("b",)],
        ["w1", "w2"],
        lambda kind, payload: got.append(payload),
        envs=[{"REPLICA_ENV": "1"}, {"REPLICA_ENV": "2"}],
        tasks=range(6),
    )
    assert sorted(task for _, _, task in got) == list(range(6))  # each task once, whichever worker took it
    assert {(tag, env) for tag, env, _ in got} <= {("a", "1"), ("b", "2")}  # each process with its own env
    with pytest.raises(UserError, match=r"^sources\[0\]: a user mistake$"):
        run_workers(drain, [("a",)], ["w1"], lambda *_: None, envs=[{"REPLICA_ENV": "1"}], tasks=["bad"])
    with pytest.raises(RuntimeError, match=r"^big replica 1/1 on GPUs 2,3 failed: ValueError: boom"):
        run_workers(drain, [("a",)], ["big replica 1/1 on GPUs 2,3"], lambda *_: None, tasks=["crash"])


def children(pid: int) -> set[int]:
    """Live child processes of `pid` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_cpu_replicas_killed_and_resumed_write_the_bytes_one_engine_writes(in_tmp, tiny_llama):
    n_chunks = 12
    rows = [{"q": f"Tell me about the number {i}."} for i in range(n_chunks)]
    (in_tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {
        "name": "llama",
        "model": str(tiny_llama),
        "engine": "transformers",
        "samples": {"chat": 2},
        "chunk_size": 1,
        "sampling": {"max_tokens": 16},
    }
    cfg = {
        "name": "r",
        "seed": 5,
        "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "chat", "fields": {"prompt": "q"}}]},
        "sources": [source],
    }
    (in_tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def cli(stage: str, n: int, wait: bool = True):
        cmd = [sys.executable, "-m", "fusechat.cli", stage, "-c", "cfg.yaml"]
        cmd += ["--set", f"workdir=w{n}", "--set", f"sources.0.replicas={n}"]
        if not wait:
            return subprocess.Popen(cmd, cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        done = subprocess.run(cmd, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    cli("prompts", 1)
    one = cli("sample", 1)
    assert "replica" not in one  # one engine, in the fusechat process

    # 2 replicas; fusechat is killed (SIGKILL) once their first chunk lands: the replicas die with it
    cli("prompts", 2)
    part = in_tmp / "w2" / "r" / "samples" / "parts"
    proc = cli("sample", 2, wait=False)
    deadline = time.time() + 240
    while not list(part.glob("llama-*/data/*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    replicas = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(replicas) >= 2  # the replicas, and multiprocessing's resource tracker
    deadline = time.time() + 30
    while any(alive(r) for r in replicas) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(r) for r in replicas), "a replica outlived fusechat"
    written = len(list(part.glob("llama-*/data/*.parquet")))
    assert 1 <= written < n_chunks

    two = cli("sample", 2)
    assert f"{n_chunks - written} of {n_chunks} chunks to do" in two and "llama: 2 replicas on CPU cores" in two
    files = {}
    for n in (1, 2):
        [version] = RunStore(in_tmp / f"w{n}" / "r").versions("samples")
        files[n] = {p.name: p.read_bytes() for p in sorted(version.data.glob("*.parquet"))}
        assert version.manifest["counts"]["samples"] == 2 * n_chunks
    assert sorted(files[1]) == [f"llama-{i:05d}.parquet" for i in range(n_chunks)]
    assert files[1] == files[2]
