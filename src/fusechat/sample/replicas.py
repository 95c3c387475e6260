"""Engine replicas: every GPU of a job samples.

A source at `tensor_parallel_size` 2 on an 8-GPU node runs as 4 engine replicas of 2 GPUs each, one spawned process
per replica, each started with `CUDA_VISIBLE_DEVICES` set to its GPUs before vLLM (or torch) starts. The replicas
drain one shared queue of the job's pending chunks (a replica takes the next chunk when it finishes one, so a slow
chunk does not hold up the others) and each writes its chunks itself. A chunk's samples depend only on its prompts
and its seed (`chunk_seed`; vLLM seeds every request), so they are the same whichever replica, job or attempt runs
it, and whatever the number of replicas.

Planning is pure (`replica_gpus`, `replica_envs`): the GPUs this job sees, its slot on the machine
(`fusechat.workers.local_slot`: srun/torchrun task, hand-started `--shard` jobs), the source's tensor x pipeline
parallel size and `sources[].replicas`. Without GPUs one engine runs in the calling process, unless `replicas` asks
for more (each then gets its share of the CPU cores).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusechat.config import SourceModel
from fusechat.errors import UserError
from fusechat.shards import ChunkDir, ShardSpec
from fusechat.workers import gpu_count, gpu_slice, local_slot, run_workers, visible_ids


# --------------------------------------------------------------------------------------------- plan (pure)
def gpus_per_replica(source: SourceModel, where: str) -> int:
    """tensor_parallel_size x pipeline_parallel_size for vLLM; the transformers engine uses one GPU."""
    if source.engine != "vllm":
        return 1
    sizes = []
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = source.engine_args.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}.engine_args.{key}: {value!r} is not a whole number >= 1")
        sizes.append(value)
    return sizes[0] * sizes[1]


def replica_gpus(source: SourceModel, where: str, n_gpus: int, slot: int, slots: int) -> list[list[int]]:
    """The GPUs of each replica (indices among the visible ones). Without GPUs: `replicas` (default 1) CPU engines,
    `[]` each. With GPUs: the job's slice (`gpu_slice`) cut into groups of tensor x pipeline parallel size, as
    many replicas as groups fit, or `replicas` of them."""
    if n_gpus == 0:
        return [[] for _ in range(source.replicas or 1)]
    per = gpus_per_replica(source, where)
    mine = gpu_slice(n_gpus, slot, slots)
    if per > len(mine):
        args = source.engine_args
        if args.get("pipeline_parallel_size", 1) == 1:
            key, need = "tensor_parallel_size", f"{per}"
        else:
            key = "tensor_parallel_size x pipeline_parallel_size"
            need = f"{args.get('tensor_parallel_size', 1)} x {args['pipeline_parallel_size']} = {per}"
        whose = (
            f" (GPUs {mine[0]}-{mine[-1]} of {n_gpus}: job {slot + 1} of {slots} on this machine)" if slots > 1 else ""
        )
        raise UserError(
            f"{where}.engine_args.{key} ({source.name}): a replica needs {need} GPUs but this job has {len(mine)}"
            f"{whose}; give the job more GPUs (CUDA_VISIBLE_DEVICES, --gres) or lower it"
        )
    groups = [mine[i : i + per] for i in range(0, len(mine) - per + 1, per)]
    if source.replicas is not None:
        if source.replicas > len(groups):
            raise UserError(
                f"{where}.replicas ({source.name}): {source.replicas} replicas of {per} GPU(s) need "
                f"{source.replicas * per} GPUs, this job has {len(mine)}"
            )
        groups = groups[: source.replicas]
    return groups


def in_process(groups: list[list[int]], n_gpus: int) -> bool:
    """One replica that uses the whole job (every visible GPU, or the CPU) runs in the calling process, as a single
    engine always did; any other plan needs processes of its own (to see only their GPUs, or their cores)."""
    return len(groups) == 1 and groups[0] in ([], list(range(n_gpus)))


def replica_envs(
    groups: list[list[int]], visible: list[str], cores: list[int], omp_threads: int | None = None
) -> list[dict[str, str]]:
    """Per replica: its GPUs as `CUDA_VISIBLE_DEVICES` (the ids the job itself was given); on CPU its share of the
    job's cores, as many torch threads (at most `omp_threads`, the job's OMP_NUM_THREADS) and those cores for vLLM's
    thread binding (which its multiprocess CPU executor would otherwise do over every core)."""
    if any(groups):
        return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[i] for i in g)} for g in groups]
    k = len(groups)
    shares = [cores[r * len(cores) // k : (r + 1) * len(cores) // k] or [cores[r % len(cores)]] for r in range(k)]
    return [
        {
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share)),
            "OMP_NUM_THREADS": str(min(len(share), omp_threads or len(share))),
        }
        for share in shares
    ]


def replica_plan(source: SourceModel, where: str, shard: ShardSpec, env: Mapping[str, str]) -> list[list[int]]:
    return replica_gpus(source, where, gpu_count(), *local_slot(env, shard))


# --------------------------------------------------------------------------------------------- processes
def run_replicas(
    prep: Any,
    seed: int,
    tasks: list[tuple[str, list[dict[str, Any]]]],
    chunks: ChunkDir,
    groups: list[list[int]],
    log: Callable[[str], None],
    finished: Callable[[int, float], None],
) -> int:
    """Sample `tasks` ((chunk key, prompts) each) on one process per replica (at most one per task); `finished(tokens,
    generate seconds)` after each chunk written. Returns the number of replicas."""
    s = prep.source
    groups = groups[: len(tasks)]
    omp = os.environ.get("OMP_NUM_THREADS", "")
    visible = visible_ids(os.environ, gpu_count()) if any(groups) else []
    envs = replica_envs(groups, visible, cpu_cores(), int(omp) if omp.isdigit() else None)
    k = len(groups)
    where = [
        f"GPUs {env['CUDA_VISIBLE_DEVICES']}" if g else f"CPU cores {env['VLLM_CPU_OMP_THREADS_BIND']}"
        for g, env in zip(groups, envs, strict=True)
    ]
    log(f"{s.name}: {k} replica{'s' if k > 1 else ''} on {' | '.join(where)}")
    names = [f"{s.name} replica {r + 1}/{k} on {w}" for r, w in enumerate(where)]
    jobs = [(prep, seed, chunks.root, not g) for g in groups]

    def on_message(kind: str, payload: Any) -> None:
        if kind == "chunk":
            finished(*payload)
        else:
            log(payload)

    run_workers(sample_in_replica, jobs, names, on_message, envs=envs, tasks=tasks)
    return k


def cpu_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def sample_in_replica(prep: Any, seed: int, root: Path, on_cpu: bool, *, emit, tasks) -> None:
    """One replica: load the engine on the GPUs this process sees, sample the chunks it takes from the queue."""
    from fusechat.sample.engines import open_engine
    from fusechat.sample.stage import write_chunks

    if on_cpu:
        import torch  # it may have loaded (unpickling the tokenizer) before OMP_NUM_THREADS was set

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    engine = open_engine(prep.source, prep.stop_ids, prep.pad_id)
    try:
        write_chunks(prep, engine, seed, tasks, ChunkDir(root), lambda tokens, gen_s: emit("chunk", (tokens, gen_s)))
    finally:
        engine.close()
