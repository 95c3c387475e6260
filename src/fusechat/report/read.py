"""What the report shows, read from the versions on disk only (manifests, stats.json, Parquet, trainers' logs): plain
numbers and arrays, no texts. Every reader tolerates missing and extra keys; a piece that is not there is None.

Rewards are read as three narrow columns (source and domain dictionary-encoded), so 3.2M scored responses take
about 60 MB; nothing here reads a response's text.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fusechat.store import STAGES, RunStore, Version

# Upstream first: the report follows the newest model back to the data it was trained on.
LINEAGE_ORDER = ("dpo", "sft", "datasets", "scores", "samples", "prompts")


def lineage(store: RunStore, pinned: dict[str, str] | None = None) -> dict[str, Version]:
    """The versions the report is about: the pinned ones, then the latest dpo version and what it was made from
    (its sft and datasets versions, their scores, samples and prompts); a stage nothing downstream names gives its
    latest version. Stages without a version are absent."""
    chosen: dict[str, Version] = {stage: store.resolve(stage, name) for stage, name in (pinned or {}).items()}
    for stage in LINEAGE_ORDER:
        if stage in chosen:
            continue
        named = [v.manifest.get("inputs", {}).get(stage) for v in chosen.values()]
        name = next((n for n in named if n), None)
        found = next((v for v in store.versions(stage) if v.name == name), None) if name else store.latest(stage)
        if found is not None:
            chosen[stage] = found
    return {stage: chosen[stage] for stage in STAGES if stage in chosen}


def all_versions(store: RunStore) -> list[Version]:
    return [v for stage in STAGES for v in store.versions(stage)]


# --------------------------------------------------------------------------------------------- prompts
def prompts_by_domain(version: Version) -> dict[str, dict[str, int]]:
    """domain -> split -> prompts: the manifest's counts, else counted from the Parquet file."""
    counts = version.manifest.get("counts", {}).get("by_domain")
    if isinstance(counts, dict) and counts and all(isinstance(v, dict) for v in counts.values()):
        return {d: {s: int(n) for s, n in splits.items()} for d, splits in sorted(counts.items())}
    table = pq.read_table(version.data / "prompts.parquet", columns=["domain", "split"])
    grouped = table.group_by(["domain", "split"]).aggregate([([], "count_all")]).to_pylist()
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in grouped:
        out[r["domain"]][r["split"]] = r["count_all"]
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- rewards
@dataclass(frozen=True)
class Rewards:
    """Every scored response's reward (nan when null), with its source and domain as codes into the name lists."""

    sources: list[str]
    domains: list[str]
    source: np.ndarray  # int32 code per response
    domain: np.ndarray
    reward: np.ndarray  # float32
    correct: np.ndarray  # int8: 1 verified correct, 0 wrong, -1 not verified

    def group(self, domain: str, source: str) -> np.ndarray:
        d, s = self.domains.index(domain), self.sources.index(source)
        return self.reward[(self.domain == d) & (self.source == s)]


def read_rewards(scores: Version, prompts: Version | None) -> Rewards:
    files = sorted(str(p) for p in scores.data.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {scores.data}")
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=["source", "domain"]))
    dataset = ds.dataset(files, format=fmt)
    names = dataset.schema.names
    columns = ["source", "reward"] + [c for c in ("domain", "correct") if c in names]
    if "domain" not in names:
        columns.append("prompt_id")  # scores versions written before the domain column: join the prompts'
    table = dataset.to_table(columns=columns)
    if "domain" not in names:
        if prompts is None:
            raise ValueError(f"{scores.ref} has no domain column and no prompts version was found")
        ref = pq.read_table(prompts.data / "prompts.parquet", columns=["prompt_id", "domain"])
        domain = ref.column("domain").take(pc.index_in(table.column("prompt_id"), ref.column("prompt_id")))
        table = table.drop_columns(["prompt_id"]).append_column("domain", pc.dictionary_encode(domain))
    table = table.unify_dictionaries().combine_chunks()

    def codes(name: str) -> tuple[list[str], np.ndarray]:
        col = table.column(name).chunk(0) if table.num_rows else pa.array([], pa.dictionary(pa.int32(), pa.string()))
        if not pa.types.is_dictionary(col.type):
            col = col.dictionary_encode()
        return col.dictionary.to_pylist(), col.indices.to_numpy(zero_copy_only=False).astype(np.int32)

    sources, source = codes("source")
    domains, domain = codes("domain")
    reward = table.column("reward").to_numpy().astype(np.float32)
    if "correct" in table.column_names:
        c = table.column("correct")
        correct = np.where(c.is_null().to_numpy(), -1, c.fill_null(False).to_numpy().astype(np.int8))
    else:
        correct = np.full(table.num_rows, -1, np.int8)
    return Rewards(sources, domains, source, domain, reward, correct.astype(np.int8))


def reward_summary(r: Rewards) -> list[dict[str, Any]]:
    """Per domain and source: responses, reward quantiles, share verified correct (None when not verified)."""
    rows = []
    for d, domain in sorted(enumerate(r.domains), key=lambda t: t[1]):
        for s, source in sorted(enumerate(r.sources), key=lambda t: t[1]):
            mask = (r.domain == d) & (r.source == s)
            n = int(mask.sum())
            if not n:
                continue
            values = r.reward[mask]
            values = values[np.isfinite(values)]
            verified = r.correct[mask]
            checked = verified >= 0
            q = np.quantile(values, [0.1, 0.5, 0.9]) if len(values) else [np.nan] * 3
            rows.append(
                {
                    "domain": domain,
                    "source": source,
                    "responses": n,
                    "p10": float(q[0]),
                    "median": float(q[1]),
                    "p90": float(q[2]),
                    "correct": float(verified[checked].mean()) if checked.any() else None,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------- datasets
def read_stats(datasets: Version) -> dict[str, Any]:
    path = datasets.path / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def rows_by_domain_source(datasets: Version, split: str) -> dict[str, dict[str, int]]:
    """domain -> source -> rows of the written `sft/` or `dpo/` set (the files, so any stats layout works)."""
    files = sorted(str(p) for p in (datasets.path / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {datasets.path / split}")
    table = ds.dataset(files, format="parquet").to_table(columns=["domain", "source"])
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in table.group_by(["domain", "source"]).aggregate([([], "count_all")]).to_pylist():
        out[r["domain"]][r["source"]] = r["count_all"]
    return {d: dict(sorted(c.items())) for d, c in sorted(out.items())}


@dataclass(frozen=True)
class Pairs:
    margin: np.ndarray
    chosen_len: np.ndarray
    rejected_len: np.ndarray
    length_unit: str  # "tokens" (the target's, prompt included) or "characters" (of the responses)


def read_pairs(datasets: Version) -> Pairs:
    """Reward margins and chosen / rejected lengths of the DPO pairs; texts are measured when some pair lacks token
    counts (no length filter, or lengths settled by a bound)."""
    files = sorted(str(p) for p in (datasets.path / "dpo").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {datasets.path / 'dpo'}")
    dataset = ds.dataset(files, format="parquet")
    names = dataset.schema.names
    numeric = [
        c for c in ("margin", "chosen_reward", "rejected_reward", "chosen_tokens", "rejected_tokens") if c in names
    ]
    table = dataset.to_table(columns=numeric)
    if "margin" in names:
        margin = table.column("margin").to_numpy()
    else:
        margin = table.column("chosen_reward").to_numpy() - table.column("rejected_reward").to_numpy()
    # Token counts only when every pair has them: the length filter leaves them null where a bound settled it.
    tokens = {"chosen_tokens", "rejected_tokens"} <= set(names) and all(
        table.column(c).null_count == 0 and (pc.min(table.column(c)).as_py() or 0) >= 0
        for c in ("chosen_tokens", "rejected_tokens")
    )
    if tokens and table.num_rows:
        return Pairs(
            margin, table.column("chosen_tokens").to_numpy(), table.column("rejected_tokens").to_numpy(), "tokens"
        )
    lengths: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for batch in dataset.to_batches(columns=["chosen", "rejected"], batch_size=4096):  # texts a batch at a time
        for side, out in lengths.items():
            turns = batch.column(side)  # the assistant message(s) of each pair
            chars = pc.utf8_length(pc.struct_field(pc.list_flatten(turns), "content")).fill_null(0).to_numpy()
            pair = np.repeat(np.arange(len(turns)), pc.list_value_length(turns).fill_null(0).to_numpy())
            out.append(np.bincount(pair, weights=chars, minlength=len(turns)).astype(np.int64))
    chosen, rejected = (np.concatenate(v) if v else np.zeros(0, int) for v in lengths.values())
    return Pairs(margin, chosen, rejected, "characters")


def margin_band(datasets: Version, stats: dict[str, Any]) -> tuple[float, float] | None:
    band = dig(stats, "dpo", "margin", "band") or dig(datasets.manifest, "config", "build", "margin")
    return (float(band[0]), float(band[1])) if isinstance(band, list | tuple) and len(band) == 2 else None


# --------------------------------------------------------------------------------------------- drops
@dataclass(frozen=True)
class Drop:
    stage: str
    reason: str
    count: int
    unit: str  # what is counted: prompts, responses, rows, pairs
    detail: str = ""  # e.g. the count per source


def drops(versions: dict[str, Version], stats: dict[str, Any] | None) -> list[Drop]:
    """Every drop reason of every stage, read generically: prompts (`dropped_*` per source), samples (prompts
    skipped as too long, responses cut at max_tokens, any `dropped_*`/`skipped_*` per source), scores (responses
    without a reward, flagged verdicts), build (every key of every `dropped` / `excluded` mapping in stats.json)."""
    out: list[Drop] = []
    if "prompts" in versions:
        per_source = dig(versions["prompts"].manifest, "counts", "by_source") or {}
        out += _per_source("prompts", per_source, lambda k: k.startswith("dropped_"), "prompts")
    if "samples" in versions:
        per_source = dig(versions["samples"].manifest, "counts", "by_source") or {}
        units = {"finish_length": "responses", "identical": "prompts"}
        out += _per_source(
            "samples",
            per_source,
            lambda k: k.startswith(("dropped_", "skipped_", "identical")) or k == "finish_length",
            "prompts",
            units,
        )
    if "scores" in versions:
        counts = versions["scores"].manifest.get("counts", {})
        for key in ("reward_null", "truncated"):
            if isinstance(counts.get(key), int) and counts[key]:
                out.append(Drop("score (flagged)", key, counts[key], "responses"))
        for verdict, n in (counts.get("by_verdict") or {}).items():
            if isinstance(n, int) and not verdict.endswith((":ok", ":correct", ":pass")):
                out.append(Drop("score (flagged)", f"verdict {verdict}", n, "responses"))
    for path, reasons in _drop_maps(stats or {}):
        where = ".".join(path)
        unit = "responses" if path[:1] == ["responses"] else "prompts"
        for reason, n in reasons.items():
            if isinstance(n, int | float):
                u = {"too_long": "rows" if path[:1] == ["sft"] else "pairs", "identical_texts": "pairs"}.get(
                    reason, unit
                )
                out.append(Drop(f"build ({where})", reason, int(n), u, _build_detail(stats or {}, where, reason)))
    return out


def _build_detail(stats: dict[str, Any], where: str, reason: str) -> str:
    """From stats.json's per domain breakdown (`domains`), when it has one: an excluded response's reason per
    source, a dropped prompt's (or row's) per domain."""
    domains = stats.get("domains")
    if not isinstance(domains, dict):
        return ""
    per: Counter = Counter()
    for name, d in domains.items():
        if not isinstance(d, dict):
            continue
        if where == "responses":
            for source, c in (d.get("by_source") or {}).items():
                per[source] += (dig(c, "excluded_responses", reason) or 0) if isinstance(c, dict) else 0
        else:
            per[name] += (dig(d, "dropped_prompts", where, reason) or 0) + (dig(d, "dropped_rows", where, reason) or 0)
    return ", ".join(f"{k}: {n:,}" for k, n in per.items() if n)


def _per_source(stage: str, per_source: dict, is_drop, unit: str, units: dict[str, str] | None = None) -> list[Drop]:
    totals: Counter = Counter()
    detail: dict[str, list[str]] = defaultdict(list)
    for source, counts in per_source.items():
        for key, n in (counts or {}).items() if isinstance(counts, dict) else ():
            if is_drop(key) and isinstance(n, int | float) and n:
                reason = key.removeprefix("dropped_")
                totals[reason] += int(n)
                detail[reason].append(f"{source}: {int(n):,}")
    return [
        Drop(stage, reason, n, (units or {}).get(reason, unit), ", ".join(detail[reason]))
        for reason, n in totals.items()
    ]


def _drop_maps(stats: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[list[str], dict[str, Any]]]:
    """(path, mapping) of every `dropped` or `excluded` mapping of counts, at any depth; per-domain or per-source
    breakdowns below the top ones are left to the breakdown tables."""
    found = []
    for key, value in stats.items():
        if not isinstance(value, dict):
            continue
        if key in ("dropped", "excluded") and all(isinstance(v, int | float) for v in value.values()):
            found.append((list(path), value))
        elif len(path) < 1:
            found += _drop_maps(value, (*path, key))
    return found


# --------------------------------------------------------------------------------------------- training
def log_history(version: Version) -> list[dict[str, Any]]:
    path = version.path / "log_history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def curves(history: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) over the trainer's step logs (the final summary entry has no `loss`)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        points = [
            (h["step"], h[key])
            for h in history
            if "step" in h and isinstance(h.get(key), int | float) and "train_runtime" not in h
        ]
        if points:
            out[key] = ([p[0] for p in points], [p[1] for p in points])
    return out


# --------------------------------------------------------------------------------------------- helpers
def dig(data: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data
