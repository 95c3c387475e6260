"""One training process: `python -m fusechat.train.worker <partial>/job.json` (one per rank under accelerate
launch), or `run_job(job)` in the parent when a single process trains.

Reads the recipe top to bottom: tokenizer, dataset (file-backed, so every rank shares the map cache), trainer,
resume from the last complete checkpoint, train, save `model/`, write `result.json` (rank 0).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | Path) -> tuple[Path | None, int]:
    """The newest checkpoint whose trainer state was written (the Trainer writes it last, so a run killed while
    saving leaves a checkpoint without it, which is skipped), and its step."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    if not found:
        return None, 0
    step, path = max(found)
    return path, step


def load_target_tokenizer(path: str, chat_template: str | None):
    from fusechat.tokenizers import load_tokenizer

    tok = load_tokenizer(path)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def run_job(job: dict[str, Any], callbacks: list | tuple = ()) -> dict[str, Any]:
    from datasets import load_dataset

    from fusechat.store import write_json_atomic
    from fusechat.train import dpo, sft

    recipe = {"sft": sft, "dpo": dpo}[job["kind"]]
    tok = load_target_tokenizer(job["tokenizer"], job.get("chat_template"))
    rows = load_dataset("parquet", data_files=job["data_files"], split="train")
    callbacks = list(callbacks)
    if job.get("keep_checkpoints"):
        from fusechat.train.checkpoints import keep_callback

        callbacks.append(keep_callback(Path(job["output_dir"])))
    trainer = recipe.make_trainer(job, recipe.prepare(rows), tok, callbacks)

    checkpoint, resumed_step = last_checkpoint(job["output_dir"])
    started = time.time()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.time() - started
    save_model(trainer, tok, job)

    result = summarize(trainer, out.metrics, resumed_step, wall)
    result.update(settings(trainer, job))
    if trainer.is_world_process_zero():
        write_json_atomic(Path(job["result"]), result)
        write_json_atomic(Path(job["result"]).with_name("log_history.json"), trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()
    _end_process_group()
    return result


def save_model(trainer, tok, job: dict[str, Any]) -> None:
    """A complete HF directory: weights (LoRA merged, or the adapter when `lora.merge` is false), config with the
    KV cache re-enabled for generation, tokenizer with its chat template."""
    model_dir = job["model_dir"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True  # the trainers switch it off for training
    if job.get("lora") and job["lora"].get("merge"):
        merged = model.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
    else:
        trainer.save_model(model_dir)  # also saves processing_class
    trainer.accelerator.wait_for_everyone()


def summarize(trainer, metrics: dict[str, Any], resumed_step: int, wall: float) -> dict[str, Any]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    last = logs[-1] if logs else {}
    runtime = metrics.get("train_runtime") or wall
    tokens = getattr(trainer, "_total_train_tokens", None) or last.get("num_tokens")
    result = {
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_step,
        "steps_run": trainer.state.global_step - resumed_step,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "train_loss": metrics.get("train_loss"),
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if tokens and runtime else None,
        "train_runtime_s": round(runtime, 3),
    }
    for key, name in (("rewards/accuracies", "reward_accuracy"), ("rewards/margins", "reward_margin")):
        if key in last:
            result[name] = last[key]
    return result


def settings(trainer, job: dict[str, Any]) -> dict[str, Any]:
    """What the trainer actually ran with (after TRL and transformers had their say), for the manifest."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "use_liger_kernel": bool(args.use_liger_kernel),
        "padding_free": bool(job.get("padding_free")),
    }
    source = getattr(trainer, "ref_logps_source", None)
    if source is not None:
        out["ref_logps_source"] = source
    return out


def _end_process_group() -> None:
    """Without it, a gloo rank sometimes aborts at exit after training finished (reference/env.md §5)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    run_job(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()


def peft_config(lora: dict[str, Any] | None):
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )
