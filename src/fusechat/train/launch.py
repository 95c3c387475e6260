"""Relaunch training under `accelerate launch` (TRL-CLI style): the parent process resolves the config, the
versions and the cache, then starts N worker processes that train into the partial version directory, then commits.

On CPU the same path runs over gloo. Traps avoided here (reference/env.md §5): `accelerate launch --cpu` starts
one process only, so it is `--multi_gpu` plus `ACCELERATE_USE_CPU=true`; one OpenMP thread per rank.
Multi-node: every node runs the same `fusechat sft` command with its own launch arguments in
`FUSECHAT_ACCELERATE_ARGS` (`--num_machines 2 --machine_rank 1 --main_process_ip ...`); machine rank 0 commits.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

from fusechat.errors import UserError
from fusechat.train.defaults import Strategy
from fusechat.train.hardware import Hardware

SHIPPED = ("ddp", "zero3", "fsdp")
EXTRA_ARGS_ENV = "FUSECHAT_ACCELERATE_ARGS"


def resolve_config(value: str | None, where: str) -> Path | None:
    """An accelerate config: a YAML file, or the name of one shipped with fusechat (ddp, zero3, fsdp)."""
    if value is None:
        return None
    if Path(value).is_file():
        return Path(value).resolve()
    if value in SHIPPED:
        return Path(str(files("fusechat") / "accelerate_configs" / f"{value}.yaml"))
    raise UserError(f"{where}: {value!r} is neither a file nor one of the shipped configs ({', '.join(SHIPPED)})")


def _read_yaml(config: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{config}: cannot read the accelerate config ({e})") from None
    return data if isinstance(data, dict) else {}


def strategy(config: Path | None) -> Strategy:
    """How an accelerate config shares the model: DDP, DeepSpeed (with its ZeRO stage) or FSDP; for the defaults."""
    if config is None:
        return Strategy()
    data = _read_yaml(config)
    kind = str(data.get("distributed_type", "")).upper()
    mixed = str(data.get("mixed_precision", "no"))
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            try:
                stage = json.loads(Path(ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"]
            except (OSError, ValueError, KeyError, TypeError):
                stage = None
        return Strategy("deepspeed", int(stage) if str(stage).isdigit() else 0, mixed)
    if kind == "FSDP":
        return Strategy("fsdp", 0, mixed)
    return Strategy("ddp", 0, mixed)


def world_size(num_processes: int, config: Path | None) -> int:
    """The number of training processes `command` starts: `num_processes`, or the config file's when fusechat
    passes none (a file and num_processes 1)."""
    if num_processes > 1 or config is None:
        return num_processes
    return int(_read_yaml(config).get("num_processes") or 1)


def needs_launch(num_processes: int, config: Path | None) -> bool:
    return num_processes > 1 or config is not None or bool(os.environ.get(EXTRA_ARGS_ENV))


def extra_args() -> list[str]:
    return shlex.split(os.environ.get(EXTRA_ARGS_ENV, ""))


def machine_rank() -> int:
    args = extra_args()
    for i, arg in enumerate(args):
        if arg.startswith("--machine_rank"):
            value = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "0")
            return int(value)
    return 0


def command(job: Path, num_processes: int, config: Path | None, hw: Hardware) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` argv that runs `fusechat.train.worker job.json`, and its environment."""
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        argv += ["--config_file", str(config)]
    else:
        # precision comes from the TRL config (bf16 flag); accelerate's own setting stays off
        argv += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1 or config is None:
        argv += ["--num_processes", str(num_processes)]
    argv += [*extra_args(), "-m", "fusechat.train.worker", str(job)]
    env = dict(os.environ)
    if hw.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
    return argv, env


def _die_with_parent() -> None:
    """Linux: the launcher gets SIGTERM when fusechat dies, even by SIGKILL, and stops its workers; no orphan keeps
    writing checkpoints into the partial version that a re-run resumes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(job: Path, num_processes: int, config: Path | None, hw: Hardware, log=print) -> None:
    argv, env = command(job, num_processes, config, hw)
    log("launch: " + shlex.join(argv[1:]))
    rc = subprocess.run(argv, env=env, preexec_fn=_die_with_parent).returncode
    if rc != 0:
        err = UserError(
            f"training processes exited with status {rc}; checkpoints stay in {job.parent}, "
            "re-run the same command to resume"
        )
        err.exit_code = rc if 0 < rc < 256 else 1
        raise err
