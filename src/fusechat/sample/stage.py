"""`fusechat sample`: every source model answers every prompt of its domains k times.

Core (pure): `plan_chunks` cuts each source's prompts into named chunks, `chunk_seed` gives each chunk its own
seed, `completion_rows` turns completions into rows and flags prompts whose k samples are all identical (a seeding
or template bug shows there first), `dataset_rows` takes a dataset source's answers from the prompts version. Shell:
`run_sample` keeps each source's samples in its own part (`fusechat.sample.parts`), keyed by that source's settings
and model: parts already complete are reused (`cached`), the others are filled. It checks every source to fill
before any model loads, then per source loads its engine (one replica per group of GPUs the job has:
`fusechat.sample.replicas`), fills the chunks this job owns (`--shard`), releases the model (`fill_source`), and
commits the version (hard links to its parts' files) once every part is complete. A killed run loses at most the
chunks in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusechat.config import FusechatConfig, SourceModel
from fusechat.errors import UserError, first_line
from fusechat.prompts import read_prompts, read_responses
from fusechat.sample.engines import Completion, check_engine, open_engine
from fusechat.sample.parts import Part, link_files, open_part, part_fingerprint, reused_from
from fusechat.sample.render import chat_template, render_ids, stop_token_ids, with_system
from fusechat.sample.replicas import in_process, replica_plan, run_replicas
from fusechat.shards import ChunkDir, ShardSpec, chunk_ranges
from fusechat.store import RunStore, StageResult, Version, fingerprint, model_identity, run_stage
from fusechat.workers import gpu_count

SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("num_tokens", pa.int32()),  # null for a dataset source's answers
        ("finish_reason", pa.string()),
        ("identical_samples", pa.bool_()),  # this source's k >= 2 samples of this prompt are all the same text
    ]
)
CHUNK_STATS = b"fusechat.chunk"  # Parquet metadata key: per-chunk counts, summed into the manifest

Progress = Callable[[str, int, int, int, float], None]  # source, chunks done, chunks total, tokens, seconds


# --------------------------------------------------------------------------------------------- pure core
def plan_chunks(
    source: SourceModel, domains: list[str], answerable: list[bool] | None = None
) -> list[tuple[str, list[int]]]:
    """(chunk key, prompt row numbers) for the prompts this source answers (k > 0; and `answerable`, for a dataset
    source: the prompts it has answers to), in prompts order."""
    rows = [i for i, d in enumerate(domains) if source.k_for(d) > 0 and (answerable is None or answerable[i])]
    return [
        (f"{source.name}-{n:05d}", rows[start:end])
        for n, (start, end) in enumerate(chunk_ranges(len(rows), source.chunk_size))
    ]


def chunk_seed(seed: int, source: str, chunk_key: str, k: int) -> int:
    """Independent of which job or attempt runs the chunk, so a resumed or sharded run gives the same samples."""
    digest = hashlib.sha256(f"{seed}:{source}:{chunk_key}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def completion_rows(prompt_id: str, source: str, completions: list[Completion], decode) -> list[dict[str, Any]]:
    texts = [decode(c.token_ids) for c in completions]
    return sample_rows(
        prompt_id, source, texts, [len(c.token_ids) for c in completions], [c.finish_reason for c in completions]
    )


def sample_rows(
    prompt_id: str, source: str, texts: list[str], num_tokens: list[int | None], finish: list[str]
) -> list[dict[str, Any]]:
    identical = len(texts) > 1 and len(set(texts)) == 1
    return [
        {
            "prompt_id": prompt_id,
            "source": source,
            "sample_index": j,
            "text": text,
            "num_tokens": n,
            "finish_reason": reason,
            "identical_samples": identical,
        }
        for j, (text, n, reason) in enumerate(zip(texts, num_tokens, finish, strict=True))
    ]


def dataset_rows(source: SourceModel, prompts: list[dict[str, Any]], answers: dict[str, list[str]]) -> list[dict]:
    """A dataset source's samples: the first k kept answers of each prompt (already in a seeded order), as
    finished responses; no model, so no token count."""
    rows = []
    for p in prompts:
        texts = answers.get(p["prompt_id"], [])[: source.k_for(p["domain"])]
        rows.extend(sample_rows(p["prompt_id"], source.name, texts, [None] * len(texts), ["stop"] * len(texts)))
    return rows


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
        "models": {s.name: model_identity(s.model) for s in cfg.sources if s.model},
    }


def answers_by_prompt(prompts_version: Version, source: SourceModel, where: str) -> dict[str, list[str]]:
    """The answers a dataset source draws from: its prompt source's, by prompt id, in their kept order."""
    table = read_responses(prompts_version)
    answers: dict[str, list[str]] = {}
    if table is not None:
        mine = table.filter(pc.equal(table.column("origin"), source.dataset)).sort_by(
            [("prompt_id", "ascending"), ("response_index", "ascending")]
        )
        for pid, text in zip(mine.column("prompt_id").to_pylist(), mine.column("text").to_pylist(), strict=True):
            answers.setdefault(pid, []).append(text)
    if not answers:
        raise UserError(
            f"{where}.dataset ({source.name}): {prompts_version.ref} holds no answers of prompt source "
            f"{source.dataset!r} (map its answer column with prompts.sources[].fields.response)"
        )
    return answers


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
    replicas: list[list[int]] = field(default_factory=lambda: [[]])  # each engine replica's GPUs ([]: CPU)

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
    """Fill this job's chunks of the samples version; return it when complete, else None (other parts missing).
    `force`: sample the selected sources' parts again from scratch (a part a live job fills is an error)."""
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
        store.check(cached)
        log(f"cached: {cached.ref}")
        return cached

    prompts = read_prompts(prompts_version, columns=["prompt_id", "domain", "messages"]).to_pylist()
    domains = [p["domain"] for p in prompts]
    answers = {
        s.name: answers_by_prompt(prompts_version, s, f"sources[{i}]")
        for i, s in enumerate(cfg.sources)
        if s.engine == "dataset"
    }
    parts: dict[str, Part] = {}
    for s in cfg.sources:
        answerable = [p["prompt_id"] in answers[s.name] for p in prompts] if s.name in answers else None
        plan = plan_chunks(s, domains, answerable)
        parts[s.name] = open_part(store, s, part_fingerprint(s, cfg.seed, prompts_version), plan)
    chosen = [(i, s) for i, s in enumerate(cfg.sources) if source in (None, s.name) and parts[s.name].plan]
    if not chosen:
        raise UserError(nothing_to_sample(domains, source))
    for part in parts.values():  # a chunk damaged since it was written (power loss, full disk) is redone
        if part.done():
            part.chunks.drop_broken(part.done(), chunk_check(part.plan), log)
    # --force starts the chosen parts over (forced shard jobs of one redo keep what their sibling jobs wrote)
    redo = [s.name for _, s in chosen if force and (shard.count == 1 or parts[s.name].complete())]
    selected = [(i, s) for i, s in chosen if s.name in redo or not parts[s.name].complete()]
    prepared = {
        s.name: prepare(s, f"sources[{i}]", probe_prompt(prompts, parts[s.name].plan))
        for i, s in selected
        if s.engine != "dataset"
    }
    for prep in prepared.values():  # a source that does not fit on this job's GPUs fails here, before any model loads
        prep.replicas = replica_plan(prep.source, prep.where, shard, os.environ)

    def body(partial: Path) -> StageResult:
        for name in redo:  # under the job lock: never the part another run of this job is filling
            parts[name].reset(store, log)
        for s in cfg.sources:
            part = parts[s.name]
            if part.plan and part.complete():
                log(f"{s.name}: cached ({part.ref}, {len(part.plan)} chunks)")
        version_dir = ChunkDir(partial)

        def report(name: str, done: int, total: int, tokens: int, seconds: float) -> None:
            record_progress(version_dir, parts)  # for `fusechat status`, after every chunk
            if progress:
                progress(name, done, total, tokens, seconds)

        for _, s in selected:
            part = parts[s.name]
            part.create(
                {"prompts": prompts_version.name, "chunks": len(part.plan), "config": s.model_dump(mode="json")}
            )
            todo = [(key, rows) for n, (key, rows) in enumerate(part.plan) if shard.owns(n)]
            pending = [(key, rows) for key, rows in todo if not part.chunks.done(key)]
            if not pending:
                continue
            with store.using(part.path):  # `clean` and a forced redo leave a part alone while a job fills it
                if s.engine == "dataset":
                    fill_from_dataset(s, answers[s.name], prompts, pending, part, log)
                else:
                    fill_source(prepared[s.name], cfg.seed, prompts, pending, part.chunks, len(todo), log, report)
            record_progress(version_dir, parts)
        return finish(store, version_dir, parts, len(prompts), log)

    job = "-".join(
        ([f"source-{source}"] if source else []) + ([f"shard-{shard.index}of{shard.count}"] if shard.count > 1 else [])
    )
    # The version's own folder holds only links to its parts: forcing it matters only to redo a complete version.
    force = force and store.find("samples", fp) is not None
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
    owned: int,
    log: Callable[[str], None],
    progress: Progress | None,
) -> None:
    """Load the source's engine, write each pending chunk of its part (`chunks`), release the model. One replica
    (`prep.replicas`) over the whole job runs here; several, or one on part of the job's GPUs, run in processes of
    their own that share the pending chunks (`fusechat.sample.replicas`)."""
    s = prep.source
    base_seed = s.sampling.seed if s.sampling.seed is not None else seed
    groups = prep.replicas[: len(pending)]
    done, tokens, seconds = owned - len(pending), 0, 0.0
    log(f"{s.name}: loading {s.model} ({s.engine}); {len(pending)} of {owned} chunks to do")
    if progress:
        progress(s.name, done, owned, tokens, seconds)

    def finished(chunk_tokens: int, generate_s: float) -> None:
        nonlocal done, tokens, seconds
        # replicas generate at once: their summed time over their number is the job's rate
        done, tokens, seconds = done + 1, tokens + chunk_tokens, seconds + generate_s / len(groups)
        if progress:
            progress(s.name, done, owned, tokens, seconds)

    tasks = ((key, [prompts[r] for r in rows]) for key, rows in pending)
    if in_process(groups, gpu_count() if groups[0] else 0):
        engine = open_engine(s, prep.stop_ids, prep.pad_id)
        try:
            write_chunks(prep, engine, base_seed, tasks, chunks, finished)
        finally:
            engine.close()
    else:
        run_replicas(prep, base_seed, list(tasks), chunks, groups, log, finished)
    together = f", {len(groups)} replicas together" if len(groups) > 1 else ""
    log(f"{s.name}: {tokens:,} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tok/s{together})")


def write_chunks(
    prep: Prepared,
    engine,
    seed: int,
    tasks: Iterable[tuple[str, list[dict[str, Any]]]],
    chunks: ChunkDir,
    finished: Callable[[int, float], None],
) -> None:
    """Sample and write each (chunk key, prompts) task durably, skipping chunks already written; `finished(tokens,
    generate seconds)` after each. The loop of a single engine and of every replica process."""
    for key, chunk_prompts in tasks:
        if chunks.done(key):  # a concurrent job running the same shard got there first
            continue
        table, timings = sample_chunk(prep, engine, seed, key, chunk_prompts)
        chunks.write(key, table, timings)
        finished(json.loads(table.schema.metadata[CHUNK_STATS])["tokens"], timings["generate_s"])


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
    table = chunk_table(rows, {"skipped_too_long": len(prompts) - len(fits)})
    return table, {"generate_s": round(elapsed, 4), "wall_s": round(time.perf_counter() - chunk_started, 4)}


def chunk_table(rows: list[dict[str, Any]], stats: dict[str, Any]) -> pa.Table:
    """A chunk's rows, with its counts in the file's metadata (summed per source into the manifest)."""
    stats = {
        "prompts": len({r["prompt_id"] for r in rows}),
        **stats,
        "samples": len(rows),
        "tokens": sum(r["num_tokens"] or 0 for r in rows),
        "finish_length": sum(r["finish_reason"] == "length" for r in rows),
        "identical_prompts": len({r["prompt_id"] for r in rows if r["identical_samples"]}),
    }
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    return table.replace_schema_metadata({CHUNK_STATS: json.dumps(stats)})


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


def fill_from_dataset(
    source: SourceModel,
    answers: dict[str, list[str]],
    prompts: list[dict[str, Any]],
    pending: list[tuple[str, list[int]]],
    part: Part,
    log: Callable[[str], None],
) -> None:
    """A dataset source's chunks: the answers its prompt source kept, no model loaded."""
    log(f"{source.name}: answers of prompt source {source.dataset!r}; {len(pending)} chunks to do")
    for key, rows in pending:
        if part.chunks.done(key):  # a concurrent job running the same shard got there first
            continue
        started = time.perf_counter()
        table = chunk_table(dataset_rows(source, [prompts[r] for r in rows], answers), {})
        part.chunks.write(key, table, {"wall_s": round(time.perf_counter() - started, 4)})


def record_progress(version_dir: ChunkDir, parts: dict[str, Part]) -> dict[str, str]:
    """`progress.json` of the version being made (shown by `fusechat status`): chunks done per source."""
    done = {name: len(part.done()) for name, part in parts.items()}
    total = sum(len(part.plan) for part in parts.values())
    fields = {
        "chunks": f"{sum(done.values())}/{total}",
        **{name: f"{done[name]}/{len(part.plan)}" for name, part in parts.items()},
    }
    version_dir.write_progress(**fields)
    return fields


def finish(
    store: RunStore, version_dir: ChunkDir, parts: dict[str, Part], n_prompts: int, log: Callable[[str], None]
) -> StageResult:
    """Complete when every part is: link the parts' files into the version; otherwise say how far it is."""
    fields = record_progress(version_dir, parts)
    if not all(part.complete() for part in parts.values()):
        per_source = ", ".join(f"{name} {fields[name]}" for name in parts)
        log(
            f"samples: {fields['chunks']} chunks done ({per_source}); "
            "the version completes when every source and shard has run"
        )
        return StageResult(complete=False)
    for part in parts.values():
        link_files(part.files(), version_dir.data)
    version_dir.clean_temps()
    by_source: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}
    for name, part in parts.items():
        sums: dict[str, float] = {}
        chunks = part.chunks
        for key, f in zip(part.keys(), part.files(), strict=True):
            stats = json.loads(pq.read_schema(f).metadata[CHUNK_STATS])
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
            "chunks": sum(len(part.plan) for part in parts.values()),
            "by_source": by_source,
        },
        timings={"by_source": timings},
        extra={
            "parts": {
                name: {
                    "path": part.ref,
                    "fingerprint": part.fingerprint,
                    "reused_from": reused_from(store, name, part.fingerprint),
                }
                for name, part in parts.items()
            }
        },
    )
