"""Which model an evaluation runs: a stage version (`dpo`, `sft`: the latest or `--input`), the config's `target`
before fusion, a source by name (rendered with the source's own template and system policy), or any model
directory; and the name its answer files carry."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from fusechat.config import FusechatConfig, SamplingParams, SourceModel
from fusechat.errors import UserError
from fusechat.store import RunStore, Version


def resolve_model(
    cfg: FusechatConfig, store: RunStore, model: str | None, pinned: dict[str, str]
) -> tuple[str, SourceModel, dict[str, Version]]:
    """(label, how to run it, input versions). Default: the latest dpo model, else sft, else the target."""
    if model is None:
        model = next((s for s in ("dpo", "sft") if s in pinned or store.latest(s) is not None), "target")
    from fusechat.train.checkpoints import resolve_model_ref

    if found := resolve_model_ref(store, model):  # dpo/v003, dpo/v003@step-200, sft@step-500
        label, path, version = found
        return label, _runner(cfg, str(path)), {version.stage: version}
    if model in ("dpo", "sft"):
        version = store.resolve(model, pinned.get(model))
        return f"{model}/{version.name}", _runner(cfg, str(version.path / "model")), {model: version}
    if model == "target":
        if cfg.target is None:
            raise UserError("target: not configured (needed to evaluate the target)")
        return "target", _runner(cfg, cfg.target.path, chat_template=cfg.target.chat_template), {}
    name = model.removeprefix("source:")
    for s in cfg.sources:
        if s.name == name:
            if s.model is None:
                raise UserError(f"--model {model}: source {name!r} has no model (engine: dataset)")
            return f"source:{name}", _runner(cfg, s.model, base=s), {}
    if model.startswith("source:"):
        raise UserError(f"--model {model}: no source named {name!r} ({', '.join(s.name for s in cfg.sources)})")
    if not Path(model).expanduser().exists():
        raise UserError(f"--model {model}: not dpo, sft, target, a source name, or an existing model directory")
    return model, _runner(cfg, model), {}


def _runner(
    cfg: FusechatConfig, path: str, base: SourceModel | None = None, chat_template: str | None = None
) -> SourceModel:
    """The model with eval's engine settings; decoding is set per benchmark (greedy until then)."""
    e = cfg.eval
    fields: dict[str, Any] = {"chat_template": chat_template}
    if base is not None:
        fields = {
            "chat_template": base.chat_template,
            "system_prompt": base.system_prompt,
            "system_role": base.system_role,
        }
    engine = e.engine
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    return SourceModel(
        name="eval",
        model=path,
        engine=engine,
        engine_args=e.engine_args,
        sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=e.max_new_tokens),
        default_samples=1,
        batch_size=e.batch_size,
        **fields,
    )


def answer_model_id(cfg: FusechatConfig, label: str) -> str:
    """The model name in the harness files (AlpacaEval's `generator`, `model_id`, the answer file's name): the
    target's or a directory's base name, a source's name, `<run>-dpo-v001` for a stage version."""
    if label == "target" and cfg.target is not None:
        name = Path(cfg.target.path).name
    elif label.startswith("source:"):
        name = label.removeprefix("source:")
    elif label.split("/")[0] in ("sft", "dpo"):
        name = f"{cfg.name}-{label}"
    else:
        name = Path(label).expanduser().name or label
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
