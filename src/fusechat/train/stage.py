"""The shell both training stages share: check everything a user can get wrong (data, tokenizer, hardware, TRL
arguments, the global batch) before a model loads, plan the hardware defaults (`train.defaults`), fingerprint the
effective config, then train in the resumable partial version (in this process, or under `accelerate launch`) and
commit `model/` (plus the kept `checkpoints/step-N` and stored reference log-probs) with the run's numbers and the
reasons of the defaults in the manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusechat.config import FusechatConfig
from fusechat.errors import UserError
from fusechat.store import RunStore, StageResult, Version, model_identity, run_stage, write_json_atomic
from fusechat.train import checkpoints, defaults, hardware, launch, ref_logps

# Files in the partial version that exist only while training (hidden: the commit drops them); `model/`,
# `log_history.json`, the kept `checkpoints/step-N` and `ref_logps.parquet` stay. The result is written once
# `model/` is saved, so a run killed after it commits the finished training instead of training again.
JOB, RESULT = ".job.json", ".result.json"


def data_files(version: Version, split: str, columns: tuple[str, ...]) -> list[str]:
    """The version's `<split>/*.parquet` files, after checking that they hold rows with the needed columns."""
    import pyarrow.parquet as pq

    found = sorted((version.path / split).glob("*.parquet"))
    if not found:
        raise UserError(f"{version.path / split}: no Parquet files; is {version.ref} a datasets version?")
    for f in found:
        names = pq.read_schema(f).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(f"{f}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")
    if sum(pq.read_metadata(f).num_rows for f in found) == 0:
        raise UserError(f"{version.path / split}: no rows to train on")
    return [str(f.resolve()) for f in found]


def chat_template(cfg: FusechatConfig) -> str | None:
    """`target.chat_template`: a .jinja file or the template itself."""
    from fusechat.tokenizers import template_override

    return template_override(cfg.target.chat_template if cfg.target else None, "target.chat_template")


def check_tokenizer(model: str, template: str | None, where: str) -> None:
    from fusechat.train.worker import load_target_tokenizer

    try:
        tok = load_target_tokenizer(model, template)
    except Exception as e:  # transformers raises OSError, ValueError or TypeError for a dir without tokenizer files
        raise UserError(
            f"{where}: cannot load a tokenizer from {model} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if not tok.chat_template:
        raise UserError(f"{where}: the tokenizer of {model} has no chat template; set target.chat_template")


def check_trl_args(kind: str, args: dict[str, Any]) -> None:
    """Build the TRL config once here, so that a bad value fails before training, naming the section."""
    import tempfile

    from trl import DPOConfig, SFTConfig

    cls = SFTConfig if kind == "sft" else DPOConfig
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cls(output_dir=tmp, **args)
        except (ValueError, TypeError) as e:
            raise UserError(f"{kind}: invalid TRL {cls.__name__} arguments: {str(e).splitlines()[0]}") from None


def train_stage(
    kind: str,
    cfg: FusechatConfig,
    store: RunStore,
    *,
    model: str,
    inputs: dict[str, Version],
    files: list[str],
    force: bool,
    log: Callable[[str], None],
    callbacks: list | tuple,
) -> Version | None:
    """Returns None on a machine of rank > 0 of a multi-node run (machine rank 0 commits)."""
    section = getattr(cfg, kind)
    template = chat_template(cfg)
    where = "target.path" if kind == "sft" else f"{inputs['sft'].ref}/model" if "sft" in inputs else "dpo.model"
    check_tokenizer(model, template, where)
    user = section.trl_args()
    hw = hardware.detect(force_cpu=bool(user.get("use_cpu")))
    accelerate_config = launch.resolve_config(section.accelerate_config, f"{kind}.accelerate_config")
    plan = defaults.plan(
        kind,
        user,
        hw,
        world_size=launch.world_size(section.num_processes, accelerate_config),
        seed=cfg.seed,
        facts=hardware.model_facts(model),
        strategy=launch.strategy(accelerate_config),
        lora=section.lora is not None,
        global_batch=section.global_batch_size,
    )
    trl_args = plan.trl
    check_trl_args(kind, trl_args)
    keep = section.keep_checkpoints if section.keep_checkpoints is not None else kind == "dpo"
    model_id = "sft" if "sft" in inputs else model_identity(model)  # a rebuilt target dir is a new input
    config = {
        "model": model_id,
        "chat_template": template,
        "trl": trl_args,
        "lora": section.lora.model_dump() if section.lora else None,
        "num_processes": section.num_processes,
        "accelerate_config": section.accelerate_config,
        "global_batch_size": section.global_batch_size,
        "padding_free": plan.padding_free,
        "keep_checkpoints": keep,
    }
    log(f"{kind} defaults: " + ", ".join(f"{k}={d['value']}" for k, d in plan.decisions.items()))
    if hw.device == "cuda":
        for key in ("use_liger_kernel", "gradient_checkpointing"):
            log(f"  {key}: {plan.decisions[key]['reason']}")
    ref_key, reuse = None, None
    if kind == "dpo" and trl_args.get("precompute_ref_log_probs"):
        reference = inputs["sft"].fingerprint if "sft" in inputs else model_id
        ref_key = ref_logps.cache_key(reference, inputs["datasets"].fingerprint, trl_args, template)
        reuse = ref_logps.find(store, ref_key)

    def body(partial: Path) -> StageResult:
        job = {
            "kind": kind,
            "model": model,
            "tokenizer": model,
            "chat_template": template,
            "data_files": files,
            "trl": trl_args,
            "lora": config["lora"],
            "padding_free": plan.padding_free,
            "keep_checkpoints": keep,
            "output_dir": str(partial / "checkpoints"),
            "model_dir": str(partial / "model"),
            "result": str(partial / RESULT),
        }
        if ref_key is not None:
            # this partial's own file first (a resumed run), then the newest version with the same key
            candidates = [partial / ref_logps.FILE] + ([reuse.path / ref_logps.FILE] if reuse else [])
            job["ref_logps"] = {"path": str(partial / ref_logps.FILE), "reuse": [str(p) for p in candidates]}
        if (partial / RESULT).is_file():
            log(f"{kind}: training finished in an earlier attempt ({partial.name}); committing it")
            result = json.loads((partial / RESULT).read_text())
        elif launch.needs_launch(section.num_processes, accelerate_config):
            write_json_atomic(partial / JOB, job)
            launch.run(partial / JOB, section.num_processes, accelerate_config, hw, log=log)
            if launch.machine_rank() != 0:
                log(f"machine rank {launch.machine_rank()} done; machine rank 0 commits the version")
                return StageResult(complete=False)
            result = json.loads((partial / RESULT).read_text())
        else:
            from fusechat.train.worker import run_job

            result = run_job(job, callbacks)
        steps = checkpoints.finish(partial / "checkpoints", keep)
        extra: dict[str, Any] = {"train": result, "hardware": hw.as_dict(), "defaults": plan.decisions}
        if steps:
            extra["checkpoints"] = [f"step-{s}" for s in steps]
        if ref_key is not None:
            reused = reuse is not None and result.get("ref_logps_source") == str(reuse.path / ref_logps.FILE)
            extra["ref_logps"] = {"key": ref_key, "source": reuse.ref if reused else "computed"}
            if reused:  # the version holds its own copy (a hard link: no extra space)
                _link(reuse.path / ref_logps.FILE, partial / ref_logps.FILE)
            log(f"reference log-probs: {f'reused from {reuse.ref}' if reused else 'computed'}")
        return StageResult(
            counts={"rows": sum(_num_rows(f) for f in files), "steps": result["global_step"]},
            timings={"train_s": result["train_runtime_s"]},
            extra=extra,
        )

    # every machine of a multi-node run works in the one partial version: one job each
    job = f"machine-{launch.machine_rank()}" if launch.extra_args() else None
    return run_stage(store, kind, config, inputs, body, force=force, resumable=True, job=job, log=log)


def _link(src: Path, dst: Path) -> None:
    import os

    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows
