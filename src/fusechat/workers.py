"""Which GPUs one job works on, and one spawned process per device (or group of devices) on them.

Used by `fusechat score` (one scoring process per GPU) and `fusechat sample` (one engine replica per group of
`tensor_parallel_size` GPUs). Jobs sharing a machine split its GPUs between them. A job learns its place on the
machine (`local_slot`) from its launcher: torchrun/accelerate (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`), or srun
(`SLURM_LOCALID`, `SLURM_STEP_TASKS_PER_NODE`). Without one, a job whose GPUs were chosen for it
(`CUDA_VISIBLE_DEVICES`, a Slurm allocation) takes them all, and `--shard I/N` jobs started by hand are taken to
share this machine: shard I gets the I-th of N slices of the GPUs (`gpu_slice`). All of that is pure. The processes
(`run_workers`) each write finished chunks themselves, so a partial version stays resumable whatever happens to the
others.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_lib
import re
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fusechat.errors import UserError
from fusechat.shards import ShardSpec


# --------------------------------------------------------------------------------------------- device plan (pure)
def local_slot(env: Mapping[str, str], shard: ShardSpec) -> tuple[int, int]:
    """(this job's index among the jobs sharing this machine, how many share it)."""
    if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_LOCALID" in env and "SLURM_STEP_TASKS_PER_NODE" in env:  # inside srun; e.g. "4(x2),3"
        per_node = re.match(r"\d+", env["SLURM_STEP_TASKS_PER_NODE"])
        return int(env["SLURM_LOCALID"]), int(per_node.group()) if per_node else 1
    if env.get("CUDA_VISIBLE_DEVICES") or "SLURM_JOB_ID" in env:
        return 0, 1
    return shard.index - 1, shard.count


def gpu_slice(n_gpus: int, slot: int, slots: int) -> list[int]:
    """The slot's GPUs, as indices among the visible ones: consecutive, so jobs never overlap while there are
    enough; one GPU (shared) when jobs outnumber GPUs."""
    if slots <= 1:
        return list(range(n_gpus))
    if slots <= n_gpus:
        return list(range(slot * n_gpus // slots, (slot + 1) * n_gpus // slots))
    return [slot % n_gpus]


def devices_for(n_gpus: int, slot: int, slots: int, workers: int | None = None) -> list[str]:
    """One device per worker: the slot's slice of the machine's GPUs, CPU without GPUs. `workers` overrides how
    many processes (they then take the slice's GPUs in turn)."""
    if n_gpus == 0:
        return ["cpu"] * (workers or 1)
    mine = gpu_slice(n_gpus, slot, slots)
    return [f"cuda:{mine[w % len(mine)]}" for w in range(workers or len(mine))]


def visible_ids(env: Mapping[str, str], n_gpus: int) -> list[str]:
    """What names each visible GPU in `CUDA_VISIBLE_DEVICES` (its entries: numbers or UUIDs; else 0..n-1), so that
    a process limited to some of them can be given the subset."""
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed if len(listed) == n_gpus else [str(i) for i in range(n_gpus)]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(shard: ShardSpec, workers: int | None, env: Mapping[str, str]) -> list[str]:
    return devices_for(gpu_count(), *local_slot(env, shard), workers)


# --------------------------------------------------------------------------------------------- processes
Emit = Callable[[str, Any], None]


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the fusechat process dies, even by SIGKILL, so no orphan keeps writing
    chunks into a partial folder whose lock its parent no longer holds."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _run(
    target: Callable[..., None], args: tuple, q: Any, worker: int, env: dict[str, str], tasks: Any, parent: int
) -> None:
    _die_with_parent(parent)
    # Before the target imports torch or vLLM: CUDA reads CUDA_VISIBLE_DEVICES once, when it starts.
    os.environ.update(env)

    def emit(kind: str, payload: Any) -> None:
        q.put((kind, worker, payload))

    try:
        if tasks is None:
            target(*args, emit=emit)
        else:
            target(*args, emit=emit, tasks=iter(tasks.get, None))
        emit("done", None)
    except UserError as e:
        emit("error", ("user", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        emit("error", ("crash", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_workers(
    target: Callable[..., None],
    jobs: list[tuple],
    names: list[str],
    on_message: Callable[[str, Any], None],
    *,
    envs: list[dict[str, str]] | None = None,
    tasks: Iterable[Any] | None = None,
) -> None:
    """Run `target(*job, emit=...)` in one spawned process per job; `on_message(kind, payload)` gets what they
    emit. `envs`: environment variables per process, set before the target runs. `tasks`: one shared queue that
    the processes drain (`target(..., tasks=iterator)`), each taking the next task when it is free, so a slow task
    does not hold up the others'. A worker's UserError is raised here as is; a crash or a dead worker stops the
    others and raises."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    q = ctx.Queue()
    shared = None
    if tasks is not None:
        shared = ctx.Queue()
        shared.cancel_join_thread()  # tasks left when a worker fails are dropped, not flushed at exit
        for task in tasks:
            shared.put(task)
        for _ in jobs:
            shared.put(None)  # one end mark per worker
    envs = envs or [{} for _ in jobs]
    # not daemons: a worker starts its own processes (math verifier, sandbox, vLLM's tensor-parallel workers)
    procs = [
        ctx.Process(target=_run, args=(target, job, q, w, envs[w], shared, os.getpid())) for w, job in enumerate(jobs)
    ]
    for p in procs:
        p.start()
    running = set(range(len(procs)))
    try:
        while running:
            try:
                kind, w, payload = q.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [w for w in running if not procs[w].is_alive()]
                if dead:
                    w = dead[0]
                    raise RuntimeError(f"{names[w]} died (exit code {procs[w].exitcode})") from None
                continue
            if kind == "done":
                running.discard(w)
            elif kind == "error":
                how, text = payload
                if how == "user":
                    raise UserError(text)
                raise RuntimeError(f"{names[w]} failed: {text}")
            else:
                on_message(kind, payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
