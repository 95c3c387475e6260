"""`fusechat eval`: one model answers the held-out sets of `eval.sets` greedily; each answer is checked
(exact / math / code) and the accuracy per set goes into `eval/vNNN`.

The model is a stage version (`dpo`, `sft`: the latest or `--input`), the config's `target` before fusion, a
source by name (rendered with the source's own template and system policy), or any model directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusechat.config import EvalSet, FusechatConfig, PromptSource, SamplingParams, SourceModel
from fusechat.errors import UserError
from fusechat.store import RunStore, StageResult, Version, model_identity, run_stage

RESULTS_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("prompt_id", pa.string()),
        ("response", pa.string()),
        ("verdict", pa.string()),
        ("correct", pa.bool_()),
    ]
)


# --------------------------------------------------------------------------------------------- which model
def resolve_model(
    cfg: FusechatConfig, store: RunStore, model: str | None, pinned: dict[str, str]
) -> tuple[str, SourceModel, dict[str, Version]]:
    """(label, how to run it, input versions). Default: the latest dpo model, else sft, else the target."""
    if model is None:
        model = next((s for s in ("dpo", "sft") if s in pinned or store.latest(s) is not None), "target")
    from fusechat.train.checkpoints import resolve_model_ref

    if found := resolve_model_ref(store, model):  # dpo/v003, dpo/v003@step-200, sft@step-500
        label, path, version = found
        return label, _greedy(cfg, str(path)), {version.stage: version}
    if model in ("dpo", "sft"):
        version = store.resolve(model, pinned.get(model))
        return f"{model}/{version.name}", _greedy(cfg, str(version.path / "model")), {model: version}
    if model == "target":
        if cfg.target is None:
            raise UserError("target: not configured (needed to evaluate the target)")
        return "target", _greedy(cfg, cfg.target.path, chat_template=cfg.target.chat_template), {}
    name = model.removeprefix("source:")
    for s in cfg.sources:
        if s.name == name:
            return f"source:{name}", _greedy(cfg, s.model, base=s), {}
    if model.startswith("source:"):
        raise UserError(f"--model {model}: no source named {name!r} ({', '.join(s.name for s in cfg.sources)})")
    if not Path(model).expanduser().exists():
        raise UserError(f"--model {model}: not dpo, sft, target, a source name, or an existing model directory")
    return model, _greedy(cfg, model), {}


def _greedy(
    cfg: FusechatConfig, path: str, base: SourceModel | None = None, chat_template: str | None = None
) -> SourceModel:
    e = cfg.eval
    fields: dict[str, Any] = {"chat_template": chat_template}
    if base is not None:
        fields = {
            "chat_template": base.chat_template,
            "system_prompt": base.system_prompt,
            "system_role": base.system_role,
        }
    return SourceModel(
        name="eval",
        model=path,
        engine=e.engine,
        engine_args=e.engine_args,
        sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=e.max_new_tokens),
        default_samples=1,
        batch_size=e.batch_size,
        **fields,
    )


# --------------------------------------------------------------------------------------------- pure core
def eval_rows(sets: list[EvalSet]) -> list[dict[str, Any]]:
    """Every eval prompt as {set, check, prompt_id, messages, reference}, read with the prompts field mapping."""
    from fusechat.prompts import iter_records, record_to_row

    rows = []
    for i, s in enumerate(sets):
        where = f"eval.sets[{i}]"
        source = PromptSource(name=s.name, path=s.path, domain=s.domain, fields=s.fields)
        n = 0
        for location, record in iter_records(source, where):
            try:
                row = record_to_row(record, source)
            except (KeyError, ValueError) as e:
                raise UserError(f"{location}: {e} (mapped by {where}.fields)") from None
            if isinstance(row, str):
                continue
            reference = json.loads(row["reference"]) if row["reference"] else {}
            rows.append(
                {
                    "set": s.name,
                    "check": s.check,
                    "prompt_id": row["prompt_id"],
                    "messages": row["messages"],
                    "reference": reference,
                }
            )
            n += 1
            if s.limit is not None and n >= s.limit:
                break
        if n == 0:
            raise UserError(f"{where}.path: {s.path}: no prompts")
    return rows


def check_responses(rows: list[dict[str, Any]], responses: list[str], cfg: FusechatConfig) -> list[str]:
    """A verdict per response; `...:correct` / `...:pass` count as correct."""
    from fusechat.score.exact import check_exact

    verdicts: list[str] = [""] * len(rows)
    math_items, code_items = [], []
    for i, (row, text) in enumerate(zip(rows, responses, strict=True)):
        ref = row["reference"]
        if row["check"] == "exact":
            verdicts[i] = check_exact(text, ref.get("answer"))
        elif row["check"] == "math":
            math_items.append((i, text, ref.get("answer")))
        else:
            code_items.append((i, text, ref.get("tests")))
    if math_items:
        from fusechat.score.math_check import MathChecker

        checker = MathChecker(cfg.score.math.timeout_s, cfg.score.math.workers)
        try:
            out = checker.check_many([(t, str(a)) for _, t, a in math_items if a is not None])
        finally:
            checker.close()
        it = iter(out)
        for i, _, a in math_items:
            verdicts[i] = "math:no_reference" if a is None else f"math:{next(it)}"
    if code_items:
        from fusechat.score.sandbox import check_code_many

        out = check_code_many([(t, tests) for _, t, tests in code_items], cfg.score.code)
        for (i, _, tests), v in zip(code_items, out, strict=True):
            verdicts[i] = "code:no_tests" if not tests else f"code:{v}"
    return verdicts


def is_correct(verdict: str) -> bool:
    return verdict.endswith((":correct", ":pass"))


def accuracy_by_set(rows: list[dict[str, Any]], verdicts: list[str]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for row, v in zip(rows, verdicts, strict=True):
        t = totals.setdefault(row["set"], [0, 0])
        t[0] += is_correct(v)
        t[1] += 1
    return {name: round(c / n, 4) for name, (c, n) in totals.items()}


# --------------------------------------------------------------------------------------------- shell
def run_eval(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    model: str | None = None,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Version:
    from fusechat.sample.stage import prepare

    pinned = pinned or {}
    if not cfg.eval.sets:
        raise UserError("eval.sets: no evaluation sets configured")
    label, runner, inputs = resolve_model(cfg, store, model, pinned)
    rows = eval_rows(cfg.eval.sets)
    prep = prepare(runner, "eval", rows[0])
    config = {
        "eval": cfg.eval.model_dump(mode="json"),
        "model": label,
        "runner": runner.model_dump(mode="json"),
        "identity": model_identity(runner.model),
        "seed": cfg.seed,
        "score": cfg.score.code.model_dump(mode="json"),
    }

    def body(out: Path) -> StageResult:
        import pyarrow.parquet as pq

        from fusechat.sample.engines import open_engine

        started = time.time()
        log(f"eval {label}: {len(rows)} prompts ({runner.engine})")
        ids = [prep.render(r) for r in rows]
        engine = open_engine(runner, prep.stop_ids, prep.pad_id)
        try:
            completions = engine.generate(ids, 1, cfg.seed)
        finally:
            engine.close()
        generate_s = time.time() - started
        responses = [prep.tokenizer.decode(c[0].token_ids, skip_special_tokens=True) for c in completions]
        verdicts = check_responses(rows, responses, cfg)
        (out / "data").mkdir()
        table = pa.Table.from_pylist(
            [
                {"set": r["set"], "prompt_id": r["prompt_id"], "response": t, "verdict": v, "correct": is_correct(v)}
                for r, t, v in zip(rows, responses, verdicts, strict=True)
            ],
            schema=RESULTS_SCHEMA,
        )
        pq.write_table(table, out / "data" / "results.parquet")
        acc = accuracy_by_set(rows, verdicts)
        mean = round(sum(acc.values()) / len(acc), 4)
        log(f"  {label}: " + ", ".join(f"{k}={v:.2f}" for k, v in acc.items()) + f", mean={mean:.2f}")
        return StageResult(
            counts={"model": label, "prompts": len(rows), "mean_accuracy": mean, "accuracy": acc},
            timings={"generate_s": round(generate_s, 3)},
        )

    version = run_stage(store, "eval", config, inputs, body, force=force, log=log)
    assert version is not None
    return version
