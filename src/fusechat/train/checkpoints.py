"""Intermediate models kept in a training version, as the paper kept DPO checkpoints every 100 steps and picked the
better of the last two: `<stage>/vNNN/checkpoints/step-N`, each a model directory eval can load
(`fusechat eval --model dpo/v003@step-200`).

While training, each Trainer checkpoint's model files are hard-linked into `step-N` as soon as it is saved, so the
Trainer's rotation (`save_total_limit`) may delete the checkpoint (optimizer state and all) without losing them. At
commit only the `step-N` directories stay."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

from fusechat.errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STEP_RE = re.compile(r"^step-(\d+)$")
# What from_pretrained needs (weights, config, tokenizer, LoRA adapter) plus the Trainer's log up to that step;
# not the optimizer, scheduler, RNG or DeepSpeed shards.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.*",
    "merges.txt",
    "trainer_state.json",
)
# <stage>[/vNNN][@step-N]; a bare stage name is eval's own default
MODEL_REF_RE = re.compile(r"^(sft|dpo)(?:/(v\d+))?(?:@step-(\d+))?$")


def is_complete(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint was saved whole: the Trainer writes `trainer_state.json` last, and not
    atomically, so a run killed while saving leaves a checkpoint without it or with a truncated one."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def keep_checkpoint(checkpoint: Path, steps_dir: Path) -> Path | None:
    """`steps_dir/step-N` with the model files of Trainer checkpoint `checkpoint-N` (hard links where possible),
    the config with the KV cache on for generation. None when the checkpoint holds no weights (e.g. a DeepSpeed
    config without `zero3_save_16bit_model`)."""
    step = int(CHECKPOINT_RE.match(checkpoint.name).group(1))
    out = steps_dir / f"step-{step}"
    if out.is_dir():
        return out
    files = [f for f in checkpoint.iterdir() if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in MODEL_FILES)]
    if not any(f.suffix == ".safetensors" for f in files):
        return None
    tmp = steps_dir / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        if f.name == "config.json":
            config = json.loads(f.read_text())
            config["use_cache"] = True  # the trainers switch it off for training
            (tmp / f.name).write_text(json.dumps(config, indent=2) + "\n")
            continue
        try:
            os.link(f, tmp / f.name)
        except OSError:  # another filesystem, or no hard links there
            shutil.copy2(f, tmp / f.name)
    os.rename(tmp, out)
    return out


def keep_callback(steps_dir: Path):
    """A TrainerCallback that keeps each checkpoint's model as soon as rank 0 has saved it."""
    from transformers import TrainerCallback

    class KeepCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                keep_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", steps_dir)

    return KeepCheckpoints()


def finish(output_dir: Path, keep: bool) -> list[int]:
    """At commit: keep the models of the checkpoints still there (when `keep`), drop the Trainer checkpoints;
    returns the kept steps. `output_dir` is removed when nothing is kept."""
    if not output_dir.is_dir():
        return []
    for checkpoint in sorted(output_dir.iterdir()):
        if CHECKPOINT_RE.match(checkpoint.name):
            if keep and is_complete(checkpoint):
                keep_checkpoint(checkpoint, output_dir)
            shutil.rmtree(checkpoint)
    for other in output_dir.iterdir():
        if not STEP_RE.match(other.name):
            shutil.rmtree(other) if other.is_dir() else other.unlink()
    steps = kept_steps(output_dir)
    if not steps:
        shutil.rmtree(output_dir)
    return steps


def kept_steps(steps_dir: Path) -> list[int]:
    if not steps_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in steps_dir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def resolve_model_ref(store, text: str):
    """`dpo/v003@step-200`, `dpo@step-200` (latest dpo version), `sft/v001` -> (label, model dir, version); None
    for anything else (a bare `dpo`/`sft`, a path, a source name), which the caller resolves."""
    m = MODEL_REF_RE.match(text)
    if not m or (m.group(2) is None and m.group(3) is None):
        return None
    stage, name, step = m.group(1), m.group(2), m.group(3)
    if name is None:
        version = store.latest(stage)
        if version is None:
            raise UserError(f"--model {text}: no complete {stage} version in {store.root}")
    else:
        name = f"v{int(name[1:]):03d}"
        version = store.named(stage, name)
        if version is None:
            raise UserError(f"--model {text}: {store.stage_dir(stage) / name} is not a complete version")
    store.check(version)
    if step is None:
        return version.ref, version.path / "model", version
    path = version.path / "checkpoints" / f"step-{int(step)}"
    if not path.is_dir():
        kept = ", ".join(f"step-{s}" for s in kept_steps(version.path / "checkpoints"))
        hint = f"kept: {kept}" if kept else f"none kept; set {stage}.save_steps (and {stage}.keep_checkpoints)"
        raise UserError(f"--model {text}: {version.ref} has no checkpoint step-{int(step)} ({hint})")
    return f"{version.ref}@step-{int(step)}", path, version
