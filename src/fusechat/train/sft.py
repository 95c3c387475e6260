"""`fusechat sft`: full (or LoRA) fine-tuning of the target on `datasets/vNNN/sft` with TRL's SFTTrainer.

Loss on the assistant turn only, for any chat template: each conversation becomes TRL's conversational
prompt/completion pair (prompt = every turn but the last, completion = the last assistant turn), and TRL masks
the prompt tokens. That needs no `{% generation %}` markers in the template, which most real templates lack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusechat.config import FusechatConfig
from fusechat.store import RunStore, Version


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"prompt_id {row.get('prompt_id')}: the last message must be an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def check_rows(files: list[str]) -> None:
    """Every conversation must end on an assistant turn (the completion); checked on the roles column only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fusechat.errors import UserError

    for f in files:
        table = pq.read_table(f, columns=["messages"])
        messages = table.column("messages").combine_chunks()
        roles = pc.struct_field(messages.flatten(), "role").to_pylist()
        offsets = messages.offsets.to_pylist()
        for i, (start, end) in enumerate(zip(offsets, offsets[1:], strict=False)):
            if end == start or roles[end - 1] != "assistant":
                raise UserError(f"{f}: row {i}: messages must end with an assistant turn (the response to train on)")


def prepare(rows):
    return rows.map(to_prompt_completion, remove_columns=rows.column_names, desc="prompt/completion")


def make_trainer(job: dict[str, Any], data, tok, callbacks: list):
    from trl import SFTConfig, SFTTrainer

    from fusechat.train.worker import peft_config

    args = SFTConfig(output_dir=job["output_dir"], **job["trl"])
    return SFTTrainer(
        model=job["model"],
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config(job["lora"]),
        callbacks=callbacks,
        data_collator=padding_free_collator(tok) if job.get("padding_free") else None,
    )


def padding_free_collator(tok):
    """TRL's collator in padding-free mode: a batch is one flattened row with position ids and sequence boundaries
    (flash-attn 2 attends within each sequence). Passed as the collator rather than TRL's `padding_free=True`, so
    that TRL still truncates rows to `max_length` (its padding-free mode refuses a max_length without packing)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)


def run_sft(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    callbacks: list | tuple = (),
) -> Version | None:
    """Train the target on the chosen (default: latest) datasets version; returns the sft version (None on a
    machine of rank > 0 of a multi-node run)."""
    from fusechat.errors import UserError
    from fusechat.train.stage import data_files, train_stage

    pinned = pinned or {}
    if cfg.target is None:
        raise UserError("target: missing; set target.path to the model to train (hub id or local dir)")
    datasets = store.resolve("datasets", pinned.get("datasets"))
    files = data_files(datasets, "sft", ("messages",))
    check_rows(files)
    return train_stage(
        "sft",
        cfg,
        store,
        model=cfg.target.path,
        inputs={"datasets": datasets},
        files=files,
        force=force,
        log=log,
        callbacks=callbacks,
    )
