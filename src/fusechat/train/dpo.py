"""`fusechat dpo`: preference optimisation of the SFT model on `datasets/vNNN/dpo` with TRL's DPOTrainer.

The policy starts from the model of the latest complete sft version (or `--input sft=vNNN`, or `dpo.model`), and
the same weights are the frozen reference (a copy, or the adapter-disabled base with LoRA). `loss_type`, `beta`
and the rest come from `dpo:`; the Llama recipes use length-normalised DPO (`loss_type: sigmoid_norm`, beta 10).
The model of every `save_steps` checkpoint stays in the version (`checkpoints/step-N`, see `train.checkpoints`);
with `precompute_ref_log_probs` the reference log-probs are stored and reused (`train.ref_logps`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusechat.config import FusechatConfig
from fusechat.store import RunStore, Version

COLUMNS = ("prompt", "chosen", "rejected")


def prepare(rows):
    return rows.select_columns(list(COLUMNS))


def make_trainer(job: dict[str, Any], data, tok, callbacks: list):
    from trl import DPOConfig

    from fusechat.train.worker import peft_config

    args = DPOConfig(output_dir=job["output_dir"], **job["trl"])
    return trainer_class(job.get("ref_logps"))(
        model=job["model"],
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config(job["lora"]),
        callbacks=callbacks,
    )


def trainer_class(ref: dict[str, Any] | None):
    """TRL's DPOTrainer; with precomputed reference log-probs, one that reads them from the first stored file that
    matches the run's tokens (`ref["reuse"]`) and otherwise computes and stores them (`ref["path"]`)."""
    from trl import DPOTrainer

    if not ref:
        return DPOTrainer
    from fusechat.train import ref_logps

    class StoredRefLogpsTrainer(DPOTrainer):
        ref_logps_source: str | None = None

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if name != "train":
                return super()._precompute_ref_logps(dataset, name, batch_size)
            for candidate in ref["reuse"]:
                found = ref_logps.attach(Path(candidate), dataset)
                if found is not None:
                    self.ref_logps_source = candidate
                    return found
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                ref_logps.save(Path(ref["path"]), out)
            self.accelerator.wait_for_everyone()
            self.ref_logps_source = "computed"
            return out

    return StoredRefLogpsTrainer


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
