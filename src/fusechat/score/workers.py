"""Which devices one `fusechat score` job scores on, and one scoring process per device.

Jobs sharing a machine split its GPUs between them. A job learns its place on the machine (`local_slot`) from its
launcher: torchrun/accelerate (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`), or srun (`SLURM_LOCALID`,
`SLURM_STEP_TASKS_PER_NODE`). Without one, a job whose GPUs were chosen for it (`CUDA_VISIBLE_DEVICES`, a Slurm
allocation) takes them all, and `--shard I/N` jobs started by hand are taken to share this machine: shard I gets
the I-th of N slices of the GPUs. `devices_for` turns that place into devices; both are pure. One process per
device then scores its share of the job's chunks (`run_workers`); each writes finished chunks itself, so the
partial version stays resumable whatever happens to the others.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_lib
import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from fusechat.errors import UserError
from fusechat.shards import ShardSpec


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


def devices_for(n_gpus: int, slot: int, slots: int, workers: int | None = None) -> list[str]:
    """One device per worker: the slot's slice of the machine's GPUs (consecutive ones, so jobs never overlap while
    there are enough), one GPU when jobs outnumber GPUs, CPU without GPUs. `workers` overrides how many
    processes (they then take the slice's GPUs in turn)."""
    if n_gpus == 0:
        return ["cpu"] * (workers or 1)
    if slots <= 1:
        mine = list(range(n_gpus))
    elif slots <= n_gpus:
        mine = list(range(slot * n_gpus // slots, (slot + 1) * n_gpus // slots))
    else:
        mine = [slot % n_gpus]
    return [f"cuda:{mine[w % len(mine)]}" for w in range(workers or len(mine))]


def scoring_devices(shard: ShardSpec, workers: int | None, env: Mapping[str, str]) -> list[str]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return devices_for(n, *local_slot(env, shard), workers)


# --------------------------------------------------------------------------------------------- processes
Emit = Callable[[str, Any], None]


def _run(target: Callable[..., None], args: tuple, q: Any, worker: int) -> None:
    def emit(kind: str, payload: Any) -> None:
        q.put((kind, worker, payload))

    try:
        target(*args, emit=emit)
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
) -> None:
    """Run `target(*job, emit=...)` in one spawned process per job; `on_message(kind, payload)` gets what they
    emit. A worker's UserError is raised here as is; a crash or a dead worker stops the others and raises."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    q = ctx.Queue()
    # not daemons: a worker starts its own process pools (math verifier, sandbox)
    procs = [ctx.Process(target=_run, args=(target, job, q, w)) for w, job in enumerate(jobs)]
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
                    raise RuntimeError(f"scoring worker on {names[w]} died (exit code {procs[w].exitcode})") from None
                continue
            if kind == "done":
                running.discard(w)
            elif kind == "error":
                how, text = payload
                if how == "user":
                    raise UserError(text)
                raise RuntimeError(f"scoring worker on {names[w]} failed: {text}")
            else:
                on_message(kind, payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
