"""One comparable table: every score of the chosen models' eval versions, benchmarks as rows, models as columns,
as in the paper's tables.

Local sets are shown in % (accuracy, pass@1), AlpacaEval-2 as its length-controlled win rate (%), Arena-Hard as its
win rate against the baseline (%), MT-Bench and AlignBench on their own 0-10 scale; a judged score appears once its
results file exists in the eval version. The average is the paper's convention: the plain mean of the numbers as
shown (so MT-Bench and AlignBench weigh little), here over the benchmarks every compared model has.
"""

from __future__ import annotations

import re
from typing import Any

from fusechat.errors import UserError
from fusechat.eval.judged import judged_score
from fusechat.eval.settings import JUDGED
from fusechat.store import RunStore, Version

BENCHMARK_NAMES = {
    "alpaca_eval": "AlpacaEval-2 (LC %)",
    "arena_hard": "Arena-Hard (WR %)",
    "mt_bench": "MT-Bench (0-10)",
    "alignbench": "AlignBench (0-10)",
}
FUSION_LABELS = {"target": "before fusion", "sft": "after SFT", "dpo": "after DPO"}


def scores_of(version: Version) -> dict[str, float]:
    """Benchmark -> score: local accuracy in %, judged scores whose results file exists."""
    counts = version.manifest["counts"]
    scores = {name: round(100 * acc, 1) for name, acc in counts.get("accuracy", {}).items()}
    for benchmark in counts.get("judged", {}):
        score = judged_score(benchmark, version.path / "judged" / benchmark, counts["model_id"])
        if score is not None:
            scores[benchmark] = score
    return scores


def comparison(columns: list[tuple[str, dict[str, float]]], deltas: bool = False) -> dict[str, Any]:
    """{header, models, rows, average}: one row per benchmark (judged first, in the paper's order), one column per model,
    then with `deltas` each later model minus the first."""
    seen: list[str] = []
    for _, scores in columns:
        seen += [b for b in scores if b not in seen]
    benchmarks = [b for b in JUDGED if b in seen] + [b for b in seen if b not in JUDGED]
    labels = [label for label, _ in columns]
    header = ["benchmark", *labels] + ([f"Δ {label}" for label in labels[1:]] if deltas else [])

    def line(name: str, values: list[float | None]) -> list[Any]:
        first = values[0]
        diffs = [None if v is None or first is None else round(v - first, 2) for v in values[1:]]
        return [name, *values] + (diffs if deltas else [])

    rows = [line(BENCHMARK_NAMES.get(b, b), [scores.get(b) for _, scores in columns]) for b in benchmarks]
    common = [b for b in benchmarks if all(b in scores for _, scores in columns)]
    average = None
    if common:
        means = [round(sum(scores[b] for b in common) / len(common), 2) for _, scores in columns]
        average = line(f"average ({len(common)} benchmarks)", means)
    return {"header": header, "models": len(labels), "rows": rows, "average": average}


def fusion_columns(evals: dict[str, Version]) -> list[tuple[str, dict[str, float]]]:
    """The target before fusion, after SFT, after DPO, as labelled columns."""
    return [(FUSION_LABELS.get(m, m), scores_of(v)) for m, v in evals.items()]


def latest_evals(store: RunStore) -> dict[str, Version]:
    """The latest eval version of every model label, oldest label first."""
    found: dict[str, Version] = {}
    for v in store.versions("eval"):
        label = v.manifest["counts"]["model"]
        found.pop(label, None)
        found[label] = v
    return found


def pick_evals(store: RunStore, names: list[str] | None) -> list[tuple[str, Version]]:
    """(label, eval version) per `--model` name: dpo, sft (their latest evaluated version), target, a source
    name, a model path as it was given, or an eval version (eval/v003, v003). Default: every evaluated model."""
    latest = latest_evals(store)
    if not names:
        if not latest:
            raise UserError(f"no eval version in {store.root}; run fusechat eval first")
        return list(latest.items())
    versions = {v.name: v for v in store.versions("eval")}
    picked = []
    for name in names:
        version_name = name.removeprefix("eval/")
        if re.fullmatch(r"v\d{3,}", version_name):
            if version_name not in versions:
                raise UserError(f"--model {name}: no complete eval version {version_name} in {store.root}")
            v = versions[version_name]
            picked.append((v.manifest["counts"]["model"], v))
            continue
        if name in ("dpo", "sft"):
            labels = [label for label in latest if label.startswith(f"{name}/")]
        else:
            labels = [label for label in (name, f"source:{name.removeprefix('source:')}") if label in latest][:1]
        if not labels:
            raise UserError(f"--model {name}: not evaluated yet (run fusechat eval --model {name})")
        picked.append((labels[-1], latest[labels[-1]]))
    return picked
