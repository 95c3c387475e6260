"""`fusechat sample`: every source model answers every prompt of its domains k times.

Core (pure): `plan_chunks` cuts each source's prompts into named chunks, `chunk_seed` gives each chunk its own
seed, `completion_rows` turns completions into rows. Shell: `run_sample` checks every selected source before any
model loads, then per source loads one engine, fills the chunks this job owns (`--shard`), releases the model,
and commits the version once every chunk of every source exists. A killed run loses at most the chunk in flight.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.config import FusechatConfig, SourceModel
from fusechat.errors import UserError, first_line
from fusechat.prompts import read_prompts
from fusechat.sample.engines import Completion, check_engine, open_engine
from fusechat.sample.render import chat_template, render_ids, stop_token_ids, with_system
from fusechat.shards import ChunkDir, ShardSpec, chunk_ranges
from fusechat.store import RunStore, StageResult, Version, fingerprint, model_identity, run_stage

SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)
CHUNK_STATS = b"fusechat.chunk"  # Parquet metadata key: per-chunk counts, summed into the manifest

Progress = Callable[[str, int, int, int, float], None]  # source, chunks done, chunks total, tokens, seconds
Plans = dict[str, list[tuple[str, list[int]]]]  # source -> [(chunk key, prompt row numbers)]


# --------------------------------------------------------------------------------------------- pure core
def plan_chunks(source: SourceModel, domains: list[str]) -> list[tuple[str, list[int]]]:
    """(chunk key, prompt row numbers) for the prompts this source answers (k > 0), in prompts order."""
    rows = [i for i, d in enumerate(domains) if source.k_for(d) > 0]
    return [
        (f"{source.name}-{n:05d}", rows[start:end])
        for n, (start, end) in enumerate(chunk_ranges(len(rows), source.chunk_size))
    ]


def chunk_seed(seed: int, source: str, chunk_key: str, k: int) -> int:
    """Independent of which job or attempt runs the chunk, so a resumed or sharded run gives the same samples."""
    digest = hashlib.sha256(f"{seed}:{source}:{chunk_key}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def completion_rows(prompt_id: str, source: str, completions: list[Completion], decode) -> list[dict[str, Any]]:
    return [
        {
            "prompt_id": prompt_id,
            "source": source,
            "sample_index": j,
            "text": decode(c.token_ids),
            "num_tokens": len(c.token_ids),
            "finish_reason": c.finish_reason,
        }
        for j, c in enumerate(completions)
    ]


def probe_prompt(prompts: list[dict[str, Any]], plan: list[tuple[str, list[int]]]) -> dict[str, Any]:
    """The prompt to test-render a source's template with: its first one with a system turn, else its first."""
    rows = (prompts[r] for _, chunk in plan for r in chunk)
    first = prompts[plan[0][1][0]]
    return next((p for p in rows if any(m["role"] == "system" for m in p["messages"])), first)


def stage_config(cfg: FusechatConfig) -> dict[str, Any]:
    """The sources' settings and the identity of their weights: a model rebuilt in place is not a cache hit."""
    return {
        "seed": cfg.seed,
        "sources": [s.model_dump(mode="json") for s in cfg.sources],
        "models": {s.name: model_identity(s.model) for s in cfg.sources},
    }


# --------------------------------------------------------------------------------------------- preparing a source
@dataclass
class Prepared:
    """What a source needs besides its model: checked before any model loads."""

    source: SourceModel
    where: str  # the config key, for errors: sources[i]
    tokenizer: Any
    template: str
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int = 0

    def render(self, prompt: dict[str, Any]) -> list[int]:
        s = self.source
        try:
            return render_ids(
                self.tokenizer, with_system(prompt["messages"], s.system_prompt, s.system_role), self.template
            )
        except Exception as e:  # jinja raises TemplateError, e.g. Gemma-2's "System role not supported"
            raise UserError(
                f"{self.where}.chat_template ({s.name}): prompt {prompt['prompt_id']}: the template failed: {e} "
                f"(for a template without system turns set {self.where}.system_role: merge)"
            ) from None


def prepare(source: SourceModel, where: str, probe: dict[str, Any]) -> Prepared:
    """Tokenizer, template, stop ids, engine check, and one rendered prompt (`probe`, preferably one with a system
    turn): the mistakes a user can make surface here, before any model loads."""
    from fusechat.tokenizers import load_tokenizer

    path = Path(source.model).expanduser()
    looks_like_path = source.model.startswith((".", "/", "~")) or source.model.count("/") > 1
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"{where}.model ({source.name}): {source.model} is not a model directory (no config.json)")
    if not path.exists() and looks_like_path:
        raise UserError(f"{where}.model ({source.name}): {source.model}: directory not found")
    model = str(path) if path.exists() else source.model
    try:
        tokenizer = load_tokenizer(model)
    except Exception as e:  # transformers raises OSError, ValueError, ... for an unknown or uncached hub id
        raise UserError(
            f"{where}.model ({source.name}): cannot load {source.model!r} "
            f"(not a local directory; hub id not found or not cached offline): {first_line(e)}"
        ) from None
    prep = Prepared(source, where, tokenizer, chat_template(source, tokenizer, where))
    check_engine(source, where)
    prep.render(probe)
    prep.stop_ids = stop_token_ids(model, tokenizer)
    if not prep.stop_ids:
        raise UserError(f"{where}.model ({source.name}): no eos_token_id in its tokenizer or generation_config.json")
    prep.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prep.stop_ids[0]
    return prep


# --------------------------------------------------------------------------------------------- shell
def run_sample(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    source: str | None = None,
    shard: ShardSpec = ShardSpec(),
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> Version | None:
    """Fill this job's chunks of the samples version; return it when complete, else None (other parts missing)."""
    pinned = pinned or {}
    for stage in pinned:
        if stage != "prompts":
            raise UserError(f"--input {stage}=...: sample reads only prompts")
    if not cfg.sources:
        raise UserError("sources: no source models configured")
    names = [s.name for s in cfg.sources]
    if source is not None and source not in names:
        raise UserError(f"--source {source}: not in the config's sources ({', '.join(names)})")
    prompts_version = store.resolve("prompts", pinned.get("prompts"))
    config = stage_config(cfg)
    inputs = {"prompts": prompts_version}
    fp = fingerprint("samples", config, inputs)
    if not force and (cached := store.find("samples", fp)) is not None:
        log(f"cached: {cached.ref}")
        return cached

    prompts = read_prompts(prompts_version, columns=["prompt_id", "domain", "messages"]).to_pylist()
    domains = [p["domain"] for p in prompts]
    plans: Plans = {s.name: plan_chunks(s, domains) for s in cfg.sources}
    selected = [(i, s) for i, s in enumerate(cfg.sources) if source in (None, s.name) and plans[s.name]]
    if not selected:
        raise UserError(nothing_to_sample(domains, source))
    prepared = {s.name: prepare(s, f"sources[{i}]", probe_prompt(prompts, plans[s.name])) for i, s in selected}

    def body(partial: Path) -> StageResult:
        chunks = ChunkDir(partial)
        for _, s in selected:
            chunks.drop_broken([key for key, _ in plans[s.name]], chunk_check(plans[s.name]), log)
            todo = [(key, rows) for n, (key, rows) in enumerate(plans[s.name]) if shard.owns(n)]
            pending = [(key, rows) for key, rows in todo if not chunks.done(key)]
            if not pending:
                continue
            fill_source(prepared[s.name], cfg.seed, prompts, pending, chunks, plans, len(todo), log, progress)
        return finish(chunks, plans, len(prompts), log)

    job = "-".join(
        ([f"source-{source}"] if source else []) + ([f"shard-{shard.index}of{shard.count}"] if shard.count > 1 else [])
    )
    try:
        return run_stage(store, "samples", config, inputs, body, force=force, resumable=True, job=job or None, log=log)
    except FileNotFoundError:
        # Another shard job committed the same partial version while this one was summing it up.
        done = store.find("samples", fp)
        if done is None:
            raise
        log(f"wrote: {done.ref} (committed by another job)")
        return done


def fill_source(
    prep: Prepared,
    seed: int,
    prompts: list[dict[str, Any]],
    pending: list[tuple[str, list[int]]],
    chunks: ChunkDir,
    plans: Plans,
    owned: int,
    log: Callable[[str], None],
    progress: Progress | None,
) -> None:
    """Load the source's engine, write each pending chunk, release the model."""
    s = prep.source
    base_seed = s.sampling.seed if s.sampling.seed is not None else seed
    done, tokens, seconds = owned - len(pending), 0, 0.0
    log(f"{s.name}: loading {s.model} ({s.engine}); {len(pending)} of {owned} chunks to do")
    if progress:
        progress(s.name, done, owned, tokens, seconds)
    engine = open_engine(s, prep.stop_ids, prep.pad_id)
    try:
        for key, rows in pending:
            if chunks.done(key):  # a concurrent job running the same shard got there first
                continue
            table, timings = sample_chunk(prep, engine, base_seed, key, [prompts[r] for r in rows])
            chunks.write(key, table, timings)
            record_progress(chunks, plans)
            stats = json.loads(table.schema.metadata[CHUNK_STATS])
            done, tokens, seconds = done + 1, tokens + stats["tokens"], seconds + timings["generate_s"]
            if progress:
                progress(s.name, done, owned, tokens, seconds)
    finally:
        engine.close()
    log(f"{s.name}: {tokens:,} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tok/s)")


def sample_chunk(
    prep: Prepared, engine, seed: int, key: str, prompts: list[dict[str, Any]]
) -> tuple[pa.Table, dict[str, float]]:
    """Render, skip prompts that fill the context, generate per k (k depends on the domain), decode. The counts
    go in the table's metadata, the timings beside it (data files hold nothing that differs between runs)."""
    s = prep.source
    chunk_started = time.perf_counter()
    ids = [prep.render(p) for p in prompts]
    fits = [j for j, x in enumerate(ids) if len(x) < engine.context_len]
    by_k: dict[int, list[int]] = {}
    for j in fits:
        by_k.setdefault(s.k_for(prompts[j]["domain"]), []).append(j)
    completions: dict[int, list[Completion]] = {}
    started = time.perf_counter()
    for k, js in sorted(by_k.items()):
        for j, out in zip(js, engine.generate([ids[j] for j in js], k, chunk_seed(seed, s.name, key, k)), strict=True):
            completions[j] = out
    elapsed = time.perf_counter() - started

    def decode(token_ids: list[int]) -> str:
        return prep.tokenizer.decode(token_ids, skip_special_tokens=True)

    rows = [r for j in fits for r in completion_rows(prompts[j]["prompt_id"], s.name, completions[j], decode)]
    stats = {
        "prompts": len(fits),
        "skipped_too_long": len(prompts) - len(fits),
        "samples": len(rows),
        "tokens": sum(r["num_tokens"] for r in rows),
        "finish_length": sum(r["finish_reason"] == "length" for r in rows),
    }
    timings = {"generate_s": round(elapsed, 4), "wall_s": round(time.perf_counter() - chunk_started, 4)}
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    return table.replace_schema_metadata({CHUNK_STATS: json.dumps(stats)}), timings


def chunk_check(plan: list[tuple[str, list[int]]]) -> Callable[[str, Any], str | None]:
    """What a finished chunk file of this source must hold: its counts, for as many prompts as the chunk has."""
    sizes = {key: len(rows) for key, rows in plan}

    def problem(key: str, meta) -> str | None:
        try:
            stats = json.loads((meta.metadata or {})[CHUNK_STATS])
        except (KeyError, ValueError):
            return "no chunk counts in its metadata"
        n_prompts = stats.get("prompts", 0) + stats.get("skipped_too_long", 0)
        if n_prompts != sizes[key]:
            return f"counts for {n_prompts} prompts, expected {sizes[key]}"
        if meta.num_rows != stats.get("samples"):
            return f"{meta.num_rows} rows, expected {stats.get('samples')}"
        return None

    return problem


def nothing_to_sample(domains: list[str], source: str | None) -> str:
    """The one-line error when no selected source answers any prompt (every k is 0 for the domains present)."""
    if not domains:
        return "the prompts version holds no prompts"
    who = f"--source {source}: it answers no prompt" if source else "sources: no source answers any prompt"
    return (
        f"{who} (samples per domain are 0 for every domain present: {', '.join(sorted(set(domains)))}); "
        "set sources[].samples or sources[].default_samples"
    )


def record_progress(chunks: ChunkDir, plans: Plans) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Finished chunk keys per source, and `progress.json` (shown by `fusechat status`): how far the version is."""
    done = {name: chunks.finished(key for key, _ in plan) for name, plan in plans.items()}
    n_done, total = sum(map(len, done.values())), sum(map(len, plans.values()))
    fields = {"chunks": f"{n_done}/{total}", **{name: f"{len(done[name])}/{len(plan)}" for name, plan in plans.items()}}
    chunks.write_progress(**fields)
    return done, fields


def finish(chunks: ChunkDir, plans: Plans, n_prompts: int, log: Callable[[str], None]) -> StageResult:
    """Complete when every chunk of every source exists; otherwise say how far the version is."""
    done, fields = record_progress(chunks, plans)
    total = sum(map(len, plans.values()))
    if sum(map(len, done.values())) < total:
        per_source = ", ".join(f"{name} {fields[name]}" for name in plans)
        log(
            f"samples: {fields['chunks']} chunks done ({per_source}); "
            "the version completes when every source and shard has run"
        )
        return StageResult(complete=False)
    chunks.clean_temps()
    by_source: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}
    for name, keys in done.items():
        sums: dict[str, float] = {}
        for key in keys:
            stats = json.loads(pq.read_schema(chunks.path(key)).metadata[CHUNK_STATS])
            for stat, value in {**stats, **chunks.timings(key)}.items():
                sums[stat] = sums.get(stat, 0) + value
        gen_s, wall_s = sums.pop("generate_s", 0.0), sums.pop("wall_s", 0.0)
        by_source[name] = {k: int(v) for k, v in sums.items()}
        timings[name] = {
            "wall_s": round(wall_s, 3),
            "generate_s": round(gen_s, 3),
            "tokens_per_s": round(sums.get("tokens", 0) / gen_s, 1) if gen_s else 0.0,
        }
    return StageResult(
        counts={
            "prompts": n_prompts,
            "samples": sum(c.get("samples", 0) for c in by_source.values()),
            "chunks": total,
            "by_source": by_source,
        },
        timings={"by_source": timings},
    )
