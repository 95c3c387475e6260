"""`fusechat dpo`: preference optimisation of the SFT model on `datasets/vNNN/dpo` with TRL's DPOTrainer.

The policy starts from the model of the latest complete sft version (or `--input sft=vNNN`, or `dpo.model`), and
the same weights are the frozen reference (a copy, or the adapter-disabled base with LoRA). `loss_type`, `beta`
and the rest come from `dpo:`; the Llama recipes use length-normalised DPO (`loss_type: sigmoid_norm`, beta 10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusechat.config import FusechatConfig
from fusechat.store import RunStore, Version

COLUMNS = ("prompt", "chosen", "rejected")


def prepare(rows):
    return rows.select_columns(list(COLUMNS))


def make_trainer(job: dict[str, Any], data, tok, callbacks: list):
    from trl import DPOConfig, DPOTrainer

    from fusechat.train.worker import peft_config

    args = DPOConfig(output_dir=job["output_dir"], **job["trl"])
    return DPOTrainer(
        model=job["model"],
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config(job["lora"]),
        callbacks=callbacks,
    )


def run_dpo(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    callbacks: list | tuple = (),
) -> Version | None:
    """DPO from the sft model (pinned, latest, or `dpo.model`) on the chosen datasets version."""
    from fusechat.train.stage import data_files, train_stage

    pinned = pinned or {}
    datasets = store.resolve("datasets", pinned.get("datasets"))
    inputs = {"datasets": datasets}
    if cfg.dpo.model and "sft" not in pinned:
        model = cfg.dpo.model
    else:
        inputs["sft"] = store.resolve("sft", pinned.get("sft"))
        model = str(inputs["sft"].path / "model")
    return train_stage(
        "dpo",
        cfg,
        store,
        model=model,
        inputs=inputs,
        files=data_files(datasets, "dpo", COLUMNS),
        force=force,
        log=log,
        callbacks=callbacks,
    )
