"""One training process: `python -m fusechat.train.worker <partial>/.job.json` (one per rank under accelerate
launch), or `run_job(job)` in the parent when a single process trains.

Reads the recipe top to bottom: tokenizer, dataset (file-backed, so every rank shares the map cache), trainer,
resume from the last complete checkpoint, train, save `model/`, write the result (rank 0).

A resumed run ends where an uninterrupted one would, with its weights: the Trainer restores weights, optimizer,
scheduler, RNG states and the data order from the checkpoint, and `stop_at_max_steps` keeps it from taking one
step too many when the checkpoint is the last one (the Trainer would otherwise run a step before it checks
`max_steps`). The run's totals (loss sum, tokens) ride in the checkpoint's trainer state (`RunTotals`), so the
manifest's numbers cover the whole run, not only the steps after the resume.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints saved whole (`checkpoints.is_complete`; one killed while saving is skipped), oldest first."""
    from fusechat.train.checkpoints import is_complete

    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def last_checkpoint(output_dir: str | Path) -> tuple[Path | None, int]:
    """The newest complete checkpoint and its step."""
    found = complete_checkpoints(output_dir)
    if not found:
        return None, 0
    return found[-1], int(CHECKPOINT_RE.match(found[-1].name).group(1))


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
        from fusechat.train.checkpoints import keep_callback, keep_checkpoint

        callbacks.append(keep_callback(Path(job["output_dir"])))
        for found in complete_checkpoints(job["output_dir"]):  # a run killed before it kept them
            keep_checkpoint(found, Path(job["output_dir"]))
    checkpoint, resumed_step = last_checkpoint(job["output_dir"])
    before = totals_before(checkpoint)
    totals = run_totals(before)
    trainer = recipe.make_trainer(job, recipe.prepare(rows), tok, [*callbacks, totals])
    type(totals).trainer = trainer
    stop_at_max_steps(trainer)
    if hasattr(trainer, "_total_train_tokens"):  # TRL counts from 0 in each process; continue the run's count
        trainer._total_train_tokens = before["tokens"]
    started = time.time()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.time() - started
    save_model(trainer, tok, job)

    result = summarize(trainer, out.metrics, resumed_step, wall, before)
    result.update(settings(trainer, job))
    if trainer.is_world_process_zero():
        # per-step entries only (the summary entry holds this process's timings: they go to the manifest), keys
        # sorted as a checkpoint's trainer state stores them, so a resumed run writes the same file
        steps = [dict(sorted(h.items())) for h in trainer.state.log_history if "train_runtime" not in h]
        write_json_atomic(Path(job["result"]).with_name("log_history.json"), steps)
        write_json_atomic(Path(job["result"]), result)  # last: it says the training is done
    trainer.accelerator.wait_for_everyone()
    _end_process_group()
    return result


def stop_at_max_steps(trainer) -> None:
    """Resumed from the checkpoint of the last step, the Trainer would take one more step before it looks at
    `max_steps` (its epoch loop runs a step, then checks); with no batches handed out once `max_steps` is reached,
    it ends at once with the checkpoint's weights. A run that reaches `max_steps` itself stops before asking."""
    fetch = trainer.get_batch_samples

    def get_batch_samples(epoch_iterator, num_batches, device):
        if trainer.state.max_steps > 0 and trainer.state.global_step >= trainer.state.max_steps:
            return [], None
        return fetch(epoch_iterator, num_batches, device)

    trainer.get_batch_samples = get_batch_samples


def totals_before(checkpoint: Path | None) -> dict[str, float]:
    """The run's loss sum and token count up to `checkpoint`, from its trainer state (zeros for a fresh run)."""
    before = {"loss_sum": 0.0, "tokens": 0}
    if checkpoint is None:
        return before
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        saved = state["stateful_callbacks"]["RunTotals"]["attributes"]
        return {"loss_sum": float(saved["loss_sum"]), "tokens": int(saved["tokens"] or 0)}
    except (OSError, ValueError, KeyError, TypeError):
        return before


def run_totals(before: dict[str, float]):
    """A callback whose state, saved in every checkpoint's trainer_state.json, is the run's loss sum and token count
    so far (the Trainer calls `state()` when it saves). Its `trainer` is a class attribute, set once the trainer
    exists, so an instance the Trainer re-creates from a checkpoint (`restore_callback_states_from_checkpoint`)
    sees it too."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class RunTotals(TrainerCallback, ExportableState):
        trainer = None

        def state(self) -> dict[str, Any]:
            trainer = type(self).trainer
            loss = float(getattr(trainer, "_total_loss_scalar", 0.0) or 0.0)
            pending = getattr(trainer, "_tr_loss", None)
            if pending is not None:
                loss += float(pending.item())
            tokens = getattr(trainer, "_total_train_tokens", None)
            return {"args": {}, "attributes": {"loss_sum": before["loss_sum"] + loss, "tokens": tokens}}

        def on_train_begin(self, args, state, control, **kwargs):
            # a checkpoint written before this callback existed has no entry; the Trainer's save expects one
            state.stateful_callbacks.setdefault("RunTotals", {"args": {}, "attributes": dict(before)})

    return RunTotals()


def save_model(trainer, tok, job: dict[str, Any]) -> None:
    """A complete HF directory: weights (LoRA merged, or the adapter when `lora.merge` is false), config with the
    KV cache re-enabled for generation, tokenizer with its chat template. What a killed attempt left there goes
    first."""
    model_dir = job["model_dir"]
    if trainer.is_world_process_zero():
        shutil.rmtree(model_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
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


def summarize(
    trainer, metrics: dict[str, Any], resumed_step: int, wall: float, before: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's numbers. Loss and tokens cover the whole run, also after a resume (`before`: the totals up to the
    checkpoint it resumed from); the speed and time are this process's."""
    before = before or {"loss_sum": 0.0, "tokens": 0}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    last = logs[-1] if logs else {}
    runtime = metrics.get("train_runtime") or wall
    step = trainer.state.global_step
    steps_run = step - resumed_step
    # the Trainer's train_loss is the mean over this process's steps
    loss_sum = before["loss_sum"] + (metrics.get("train_loss") or 0.0) * steps_run
    tokens = getattr(trainer, "_total_train_tokens", None) or last.get("num_tokens")
    new_tokens = tokens - before["tokens"] if tokens is not None else None
    result = {
        "world_size": trainer.args.world_size,
        "global_step": step,
        "resumed_from_step": resumed_step,
        "steps_run": steps_run,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "train_loss": loss_sum / step if step else None,
        "tokens": tokens,
        "tokens_per_s": round(new_tokens / runtime, 1) if new_tokens and runtime else None,
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
