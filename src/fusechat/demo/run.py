"""`fusechat demo`: build the tiny world, run the whole pipeline on it with the packaged demo config, evaluate
every source, the target before fusion, after SFT and after DPO, and report the table (also as Markdown)."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from fusechat.config import FusechatConfig, load_config
from fusechat.store import RunStore, Version

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
# Fewer prompts and steps for the end-to-end test: every stage runs, fusion is weaker. Logged often enough that
# the report still draws curves.
SMALL_OVERRIDES = ["sft.max_steps=40", "dpo.max_steps=10", "sft.logging_steps=4", "dpo.logging_steps=1"]


def sampling_engine() -> str:
    """vLLM when it is installed (the `cpu` extra here, `gpu` on GPU machines), else transformers' generate."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def demo_config(seed: int, small: bool, engine: str, overrides: list[str]) -> FusechatConfig:
    base = [f"seed={seed}", *(f"sources.{i}.engine={engine}" for i in range(3))]
    return load_config(DEMO_CONFIG, [*base, *(SMALL_OVERRIDES if small else []), *overrides])


def run_demo(
    *,
    seed: int = 0,
    small: bool = False,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
    progress_for: Callable[[str], AbstractContextManager[Any]] = lambda verb: nullcontext(),
) -> dict[str, Any]:
    from fusechat.demo.world import WorldSpec, build_world
    from fusechat.eval import evaluate_models
    from fusechat.pipeline import run_pipeline

    started = time.time()
    engine = sampling_engine()
    cfg = demo_config(seed, small, engine, overrides or [])
    world_root = Path(cfg.target.path).parent.parent  # <world>/models/target
    spec = WorldSpec(seed=seed)
    log(f"building the tiny world in {world_root} (seed {seed}{', small' if small else ''})")
    world = build_world(world_root, spec.small() if small else spec, log=log)
    t_world = time.time() - started
    log(f"sampling engine: {engine}" + ("" if engine == "vllm" else " (vLLM is not installed)"))
    store = RunStore(cfg.run_dir)
    # The pipeline evaluates the target before fusion, after SFT and after DPO; the sources the same way.
    versions = run_pipeline(cfg, store, until="eval", log=log, progress_for=progress_for)
    evals: dict[str, Version] = evaluate_models(cfg, store, [f"source:{s.name}" for s in cfg.sources], log=log)
    evals.update({m: versions[f"eval:{m}"] for m in ("target", "sft", "dpo")})
    result = results(cfg, versions, evals)
    result["timings_s"] = {
        "world": round(t_world, 1),
        "total": round(time.time() - started, 1),
        "world_build": world.info.get("timings_s", {}),
    }
    result["engine"] = engine
    (store.root / "results.md").write_text(markdown(result))
    (store.root / "results.json").write_text(json.dumps(result, indent=2))
    from fusechat.report import report_after_run

    report = report_after_run(store, log)  # `fusechat demo` prints its path after the tables
    result["report"] = str(report) if report else None
    return result


def results(cfg: FusechatConfig, versions: dict[str, Version], evals: dict[str, Version]) -> dict[str, Any]:
    """Accuracy per skill for every model, plus the SFT rows and DPO pairs each source supplied."""
    skills = [s.name for s in cfg.eval.sets]
    stats = json.loads((versions["build"].path / "stats.json").read_text())
    rows = []
    for model, v in evals.items():
        acc = v.manifest["counts"]["accuracy"]
        label = {"target": "target before fusion", "sft": "target after SFT", "dpo": "target after SFT+DPO"}.get(
            model, model.removeprefix("source:")
        )
        rows.append(
            {
                "model": label,
                "accuracy": {s: acc.get(s, 0.0) for s in skills},
                "mean": round(sum(acc.get(s, 0.0) for s in skills) / len(skills), 4),
                "eval": v.ref,
            }
        )
    contrib = {
        s.name: {
            "sft_rows": stats.get("sft", {}).get("by_source", {}).get(s.name, 0),
            "dpo_pairs": stats.get("dpo", {}).get("by_source", {}).get(s.name, 0),
        }
        for s in cfg.sources
    }
    return {
        "skills": skills,
        "rows": rows,
        "contributions": contrib,
        "versions": {k: v.ref for k, v in versions.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    skills = result["skills"]
    lines = ["| model | " + " | ".join(skills) + " | mean |", "|---|" + "---|" * (len(skills) + 1)]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | " + " | ".join(f"{r['accuracy'][s]:.2f}" for s in skills) + f" | **{r['mean']:.2f}** |"
        )
    lines += ["", "| source | SFT rows won | DPO pairs |", "|---|---|---|"]
    for name, c in result["contributions"].items():
        lines.append(f"| {name} | {c['sft_rows']} | {c['dpo_pairs']} |")
    t = result.get("timings_s", {})
    world = "world reused from the cache" if t.get("world", 0) < 1 else f"world built in {t['world']:.0f}s"
    lines += [
        "",
        f"Held-out greedy accuracy per skill. Sampling engine: {result.get('engine')}; {world}; "
        f"total {t.get('total', 0):.0f}s.",
    ]
    return "\n".join(lines) + "\n"
