"""`fusechat score`: reward every sampled response and verify math answers and code, per the domain's route.

Core (pure): `score_rows` takes sample rows joined with their prompts and a set of scorer functions, and returns
score rows plus per-scorer timings. Shell: `run_score` checks everything it can before any model loads (input
versions, reward-model config, references of verified domains), then scores chunks of the samples version in a
resumable partial version (`fusechat.shards`), `--shard I/N` taking every N-th chunk.

Row verdict: the scorers' verdicts in route order, e.g. `reward:ok,math:correct` or `reward:truncated,code:timeout`;
code verdicts name the step that failed (`code:syntax_error`, `code:undefined_name`, `code:fail`, see `sandbox.py`).
The reward model's own: `ok`, `truncated` (the response's tail was cut to fit `max_length`), `prompt_too_long` (the
prompt alone fills the window: reward null), `error` / `out_of_memory` (the row failed alone: reward null).
No single row fails a chunk: a scorer call that raises is retried one row at a time, and a row that still raises
gets `<scorer>:error`; only when every row of the call fails does the chunk fail (a broken scorer, not a row).
`exact` (short answers equal to the reference, see `exact.py`) counts as a verifier like math.
`correct` is the verifiers' result: False if any says no (wrong, no answer, fail, timeout), True if all say yes,
null if no verifier ran or one could not decide (no reference, sandbox error). A prompt of a math (code) domain
without a reference answer (tests) gets `math:no_reference` (`code:no_reference`) and `correct` null; a verified
domain in which no prompt has a reference is a config mistake and stops the stage before it starts.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.config import FusechatConfig, ScoreConfig
from fusechat.errors import UserError, first_line
from fusechat.prompts import read_prompts
from fusechat.shards import ChunkDir, ShardSpec, chunk_ranges
from fusechat.store import RunStore, StageResult, Version, run_stage

SCORES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("source", pa.string()),
        ("sample_index", pa.int64()),
        ("reward", pa.float64()),
        ("correct", pa.bool_()),
        ("verdict", pa.string()),
        ("domain", pa.string()),
        ("truncated", pa.bool_()),  # the conversation exceeded the reward model's max_length: it saw part or none
        ("reward_tokens", pa.int64()),
    ]
)
SAMPLE_COLUMNS = ["prompt_id", "source", "sample_index", "text"]
MATH_OK = {"correct": True, "wrong": False, "no_answer": False, "timeout": False}
# The other code verdicts (no_tests, bad_tests, error) decide nothing: `correct` stays null.
CODE_OK = {"pass": True, "fail": False, "timeout": False, "syntax_error": False, "undefined_name": False}


# --------------------------------------------------------------------------------------------- pure core
@dataclass
class Scorers:
    """The scorer functions a chunk needs; each takes a list and returns a list of the same length."""

    # conversations -> rewards, truncated flags, tokens scored, the reward model's verdicts
    reward: Callable[[list[list[dict[str, str]]]], tuple[list, list, list, list[str]]] | None = None
    math: Callable[[list[tuple[str, str]]], list[str]] | None = None
    code: Callable[[list[tuple[str, Any]]], list[str]] | None = None
    exact: Callable[[list[tuple[str, str]]], list[str]] | None = None


def route_for(score: ScoreConfig, domain: str) -> list[str]:
    return list(score.routes.get(domain, score.default_route))


def combine(verdicts: dict[str, str]) -> bool | None:
    """`correct` from the verifiers' verdicts (see the module docstring)."""
    said = [
        CODE_OK.get(v) if name == "code" else MATH_OK.get(v)
        for name, v in verdicts.items()
        if name in ("math", "code", "exact")
    ]
    if not said:
        return None
    if False in said:
        return False
    return True if all(s is True for s in said) else None


def score_rows(
    rows: Sequence[dict[str, Any]],
    score: ScoreConfig,
    scorers: Scorers,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Sample rows (with `domain`, `messages`, `reference` of their prompt) -> score rows, timings per scorer."""
    routes = [route_for(score, r["domain"]) for r in rows]
    verdicts: list[dict[str, str]] = [{} for _ in rows]
    out = [
        {
            "prompt_id": r["prompt_id"],
            "source": r["source"],
            "sample_index": r["sample_index"],
            "reward": None,
            "correct": None,
            "domain": r["domain"],
            "truncated": None,
            "reward_tokens": None,
        }
        for r in rows
    ]
    timings: dict[str, dict[str, float]] = {}

    def run(name: str, key: str | None, fn: Callable | None, make: Callable[[dict[str, Any]], Any]) -> None:
        wanted = [i for i, route in enumerate(routes) if name in route]
        todo = []
        for i in wanted:
            ref = rows[i]["reference"] or {}
            if key is not None and ref.get(key) is None:
                verdicts[i][name] = "no_reference"
            else:
                todo.append(i)
        if not todo:
            return
        if fn is None:
            raise RuntimeError(f"no {name} scorer for a route that needs it")
        started = time.perf_counter()
        items = [make(rows[i]) for i in todo]
        failed = (None, None, None, "error") if name == "reward" else "error"
        try:
            results = fn(items)
        except UserError:
            raise
        except Exception as e:
            results = one_at_a_time(fn, items, e, failed, [rows[i] for i in todo], name, log)
        timings[name] = {"responses": len(todo), "seconds": time.perf_counter() - started}
        for i, result in zip(todo, results, strict=True):
            if name == "reward":
                reward, truncated, n_tokens, verdict = result
                out[i].update(reward=reward, truncated=truncated, reward_tokens=n_tokens)
                verdicts[i][name] = verdict
            else:
                verdicts[i][name] = result

    def reward_fn(items):
        return list(zip(*scorers.reward(items), strict=True))

    run(
        "reward",
        None,
        reward_fn if scorers.reward else None,
        lambda r: [*r["messages"], {"role": "assistant", "content": r["text"]}],
    )
    run("math", "answer", scorers.math, lambda r: (r["text"], str(r["reference"]["answer"])))
    run("code", "tests", scorers.code, lambda r: (r["text"], r["reference"]["tests"]))
    run("exact", "answer", scorers.exact, lambda r: (r["text"], str(r["reference"]["answer"])))
    for i, row in enumerate(out):
        order = [name for name in routes[i] if name in verdicts[i]]
        row["verdict"] = ",".join(f"{name}:{verdicts[i][name]}" for name in order)
        row["correct"] = combine(verdicts[i])
    return out, timings


def one_at_a_time(
    fn: Callable[[list], list],
    items: list,
    error: Exception,
    failed: Any,
    rows: Sequence[dict[str, Any]],
    name: str,
    log: Callable[[str], None] | None,
) -> list:
    """`fn` over each item alone after it raised `error` over all of them; an item that raises alone gets
    `failed`. Raises `error` when every item fails (the scorer is broken, not a row)."""
    results, n_failed = [], 0
    for item, row in zip(items, rows, strict=True):
        try:
            results.extend(fn([item]))
        except UserError:
            raise
        except Exception as e:
            n_failed += 1
            results.append(failed)
            if log:
                log(
                    f"{name}: row (prompt_id={row['prompt_id']}, source={row['source']}, "
                    f"sample_index={row['sample_index']}) failed alone, verdict {name}:error: "
                    f"{type(e).__name__}: {first_line(e)}"
                )
    if n_failed == len(items) > 1:
        raise error
    return results


# --------------------------------------------------------------------------------------------- reading inputs
class SampleRows:
    """The rows of a samples version, read a range at a time (the texts of 3M samples do not fit in memory)."""

    def __init__(self, version: Version):
        self.files = sorted(version.data.glob("*.parquet"))
        if not self.files:
            raise UserError(f"{version.path}: no Parquet files under data/")
        self.starts, total = [], 0
        for f in self.files:
            meta = pq.ParquetFile(f)
            missing = [c for c in SAMPLE_COLUMNS if c not in meta.schema_arrow.names]
            if missing:
                raise UserError(f"{f}: not a samples file (missing column(s) {', '.join(missing)})")
            self.starts.append(total)
            total += meta.metadata.num_rows
        self.total = total

    def read(self, start: int, end: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for f, first in zip(self.files, self.starts, strict=True):
            n = pq.ParquetFile(f).metadata.num_rows
            lo, hi = max(start, first), min(end, first + n)
            if lo < hi:
                rows.extend(pq.read_table(f, columns=SAMPLE_COLUMNS).slice(lo - first, hi - lo).to_pylist())
        return rows


class PromptIndex:
    """domain, messages and parsed reference of each prompt, by prompt_id."""

    def __init__(self, version: Version):
        self.table = read_prompts(version, columns=["prompt_id", "domain", "messages", "reference"])
        self.row_of = {pid: i for i, pid in enumerate(self.table.column("prompt_id").to_pylist())}

    def attach(self, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        try:
            idx = [self.row_of[r["prompt_id"]] for r in rows]
        except KeyError as e:
            raise UserError(f"{where}: sample of prompt {e.args[0]} not in the prompts version it came from") from None
        info = self.table.take(idx).to_pylist()
        for r, p in zip(rows, info, strict=True):
            r.update(
                domain=p["domain"],
                messages=p["messages"],
                reference=json.loads(p["reference"]) if p["reference"] else None,
                text=r["text"] or "",
            )
        return rows

    def check_references(self, score: ScoreConfig) -> None:
        """A domain routed to a verifier needs references; none at all means the field mapping is missing."""
        domains = self.table.column("domain").to_pylist()
        refs = self.table.column("reference").to_pylist()
        for domain in sorted(set(domains)):
            route = route_for(score, domain)
            for scorer, key, field in (
                ("math", "answer", "answer"),
                ("code", "tests", "tests"),
                ("exact", "answer", "answer"),
            ):
                if scorer not in route:
                    continue
                has = sum(
                    1
                    for d, r in zip(domains, refs, strict=True)
                    if d == domain and r and json.loads(r).get(key) is not None
                )
                if has == 0:
                    raise UserError(
                        f"score.routes.{domain}: routed to the {scorer} verifier, but none of its prompts "
                        f"has a reference {key} (map one with prompts.sources[].fields.{field}"
                        + (", or make them with prompts.sources[].code_tests)" if scorer == "code" else ")")
                    )


# --------------------------------------------------------------------------------------------- shell
def stage_config(cfg: FusechatConfig) -> dict[str, Any]:
    """What decides the scores (batch sizes and worker counts do not: they change only the speed)."""
    from fusechat.score.reward_model import identity
    from fusechat.score.sandbox import isolation

    routes_code = any("code" in route for route in [cfg.score.default_route, *cfg.score.routes.values()])
    score = cfg.score.model_dump(mode="json")
    if score["reward_model"]:
        for speed_only in ("batch_size", "batch_tokens", "workers"):
            score["reward_model"].pop(speed_only)
    score["math"].pop("workers")
    score["code"].pop("workers")
    return {
        "score": score,
        "reward_model": identity(cfg.score.reward_model) if cfg.score.reward_model else None,
        "sandbox": isolation(cfg.score.code) if routes_code else None,
    }


def needs_reward(cfg: FusechatConfig, domains: set[str]) -> str | None:
    return next((d for d in sorted(domains) if "reward" in route_for(cfg.score, d)), None)


def run_score(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    shard: ShardSpec = ShardSpec(),
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
) -> Version | None:
    """Score a samples version. Returns the scores version, or None when other shards still have chunks to do."""
    pinned = pinned or {}
    samples = store.resolve("samples", pinned.get("samples"))
    prompts = store.resolve("prompts", samples.manifest.get("inputs", {}).get("prompts") or pinned.get("prompts"))
    sample_rows = SampleRows(samples)
    if sample_rows.total == 0:
        raise UserError(f"{samples.path}: {samples.ref} holds no samples to score")
    index = PromptIndex(prompts)
    index.check_references(cfg.score)
    domains = set(index.table.column("domain").to_pylist())
    if any("code" in route_for(cfg.score, d) for d in domains):
        from fusechat.score.sandbox import require_isolation

        require_isolation(cfg.score.code)  # before any model loads: refuse code routes the machine cannot isolate
    domain = needs_reward(cfg, domains)
    if domain is not None:
        if cfg.score.reward_model is None:
            raise UserError(f"score.reward_model: not set, but the route of domain {domain!r} includes 'reward'")
        from fusechat.score.reward_model import check_reward_model

        check_reward_model(cfg.score.reward_model)

    from fusechat.score.reuse import chunk_plan, reuse_scored

    config = stage_config(cfg)
    plan = chunk_plan(samples, sample_rows.files, sample_rows.starts, sample_rows.total, cfg.score.shard_size)

    def body(partial: Path) -> StageResult:
        chunks = ChunkDir(partial)
        if not force:  # chunks of the same samples files scored the same way: linked, not scored again
            reuse_scored(store, config, plan[1], chunks, log)
        return score_chunks(
            cfg, chunks, sample_rows, index, shard, samples, log, progress, prompts, domain is not None, plan
        )

    return run_stage(
        store,
        "scores",
        config,
        {"samples": samples, "prompts": prompts},
        body,
        force=force,
        resumable=True,
        job=f"shard-{shard.index}of{shard.count}" if shard.count > 1 else None,
        log=log,
    )


def score_chunks(
    cfg: FusechatConfig,
    chunks: ChunkDir,
    sample_rows: SampleRows,
    index: PromptIndex,
    shard: ShardSpec,
    samples: Version,
    log: Callable[[str], None],
    progress: Callable[[int, int], None] | None,
    prompts: Version | None = None,
    needs_reward: bool = True,
    plan: tuple[list[tuple[int, int]], list[str]] | None = None,
) -> StageResult:
    """Score this shard's chunks of `plan` (row ranges and chunk keys; default: ranges of `shard_size` rows). A
    chunk found done (from an earlier attempt, or linked from an earlier scores version) must hold its range's rows,
    else it is redone."""
    ranges = chunk_ranges(sample_rows.total, cfg.score.shard_size)
    ranges, keys = plan or (ranges, [f"chunk-{i:06d}" for i in range(len(ranges))])
    rows_of = {key: end - start for key, (start, end) in zip(keys, ranges, strict=True)}
    chunks.drop_broken(
        keys,
        lambda key, meta: None if meta.num_rows == rows_of[key] else f"{meta.num_rows} rows, expected {rows_of[key]}",
        log,
    )
    mine = [i for i in range(len(ranges)) if shard.owns(i)]
    todo = [i for i in mine if not chunks.done(keys[i])]
    total = sum(ranges[i][1] - ranges[i][0] for i in mine)
    done = total - sum(ranges[i][1] - ranges[i][0] for i in todo)
    if progress:
        progress(done, total)
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} chunks already scored")

    def finished(i: int) -> None:
        nonlocal done
        done += ranges[i][1] - ranges[i][0]
        chunks.write_progress(rows_done=done, rows_total=total, shard=f"{shard.index}/{shard.count}")
        if progress:
            progress(done, total)

    devices = ["cpu"]
    if needs_reward and todo:
        from fusechat.workers import worker_devices

        devices = worker_devices(shard, cfg.score.reward_model.workers, os.environ)[: len(todo)]
        if devices != ["cpu"]:
            log(f"scoring on {', '.join(devices)}")
    if len(devices) == 1:
        score_chunk_list(cfg, chunks, sample_rows, index, samples, ranges, todo, devices[0], log, finished, keys)
    else:
        from fusechat.workers import run_workers

        k = len(devices)
        # the verifiers' process counts and the CPU threads are the machine's: each worker gets its share
        share = cfg.model_copy(deep=True)
        share.score.math.workers = max(1, cfg.score.math.workers // k)
        share.score.code.workers = max(1, cfg.score.code.workers // k)
        threads = max(1, (os.cpu_count() or 1) // k)
        jobs = [
            (share, chunks.root, samples, prompts, ranges, todo[w::k], device, threads, keys)
            for w, device in enumerate(devices)
        ]
        names = [f"scoring worker on {d}" for d in devices]
        run_workers(
            score_in_worker, jobs, names, lambda kind, payload: finished(payload) if kind == "chunk" else log(payload)
        )
    missing = len(keys) - len(chunks.finished(keys))
    if missing:
        log(f"shard {shard.index}/{shard.count} done; {missing} chunk(s) left to other shards")
        return StageResult(complete=False)
    chunks.clean_temps()
    return summarize(chunks, keys)


def score_chunk_list(
    cfg: FusechatConfig,
    chunks: ChunkDir,
    sample_rows: SampleRows,
    index: PromptIndex,
    samples: Version,
    ranges: list[tuple[int, int]],
    todo: list[int],
    device: str,
    log: Callable[[str], None],
    finished: Callable[[int], None],
    keys: list[str] | None = None,
) -> None:
    """Score the chunks numbered `todo` (named `keys[i]`), each written as soon as it is done."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # nothing of this process lands on another job's GPU 0
    live = LiveScorers(cfg.score, device, log)
    try:
        for i in todo:
            start, end = ranges[i]
            rows = index.attach(sample_rows.read(start, end), f"{samples.path} rows {start}-{end}")
            scored, timings = score_rows(rows, cfg.score, live.for_rows(rows), log)
            table = pa.Table.from_pylist(scored, schema=SCORES_SCHEMA)
            worker = {"host": socket.gethostname(), "pid": os.getpid(), "device": device}
            chunks.write(keys[i] if keys else f"chunk-{i:06d}", table, {"scorers": timings, "worker": worker})
            finished(i)
    finally:
        live.close()


def score_in_worker(
    cfg: FusechatConfig,
    partial: Path,
    samples: Version,
    prompts: Version,
    ranges: list[tuple[int, int]],
    todo: list[int],
    device: str,
    threads: int,
    keys: list[str] | None = None,
    *,
    emit: Callable[[str, Any], None],
) -> None:
    """One scoring process of `fusechat score` (see `fusechat.workers`)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    index = PromptIndex(prompts)
    score_chunk_list(
        cfg,
        ChunkDir(partial),
        SampleRows(samples),
        index,
        samples,
        ranges,
        todo,
        device,
        lambda message: emit("log", message),
        lambda i: emit("chunk", i),
        keys,
    )


def summarize(chunks: ChunkDir, keys: list[str]) -> StageResult:
    table = chunks.read(keys, columns=["domain", "verdict", "reward", "truncated"])
    verdicts: Counter = Counter()
    for v in table.column("verdict").to_pylist():
        verdicts.update(v.split(",") if v else [])
    per_scorer: dict[str, dict[str, float]] = {}
    per_worker: Counter = Counter()
    for key in keys:
        side = chunks.timings(key)
        if "worker" in side:
            w = side["worker"]
            per_worker[f"{w['host']}:{w['pid']} {w['device']}"] += pq.read_metadata(chunks.path(key)).num_rows
        for name, t in side.get("scorers", {}).items():
            acc = per_scorer.setdefault(name, {"responses": 0, "seconds": 0.0})
            acc["responses"] += t["responses"]
            acc["seconds"] += t["seconds"]
    throughput = {
        name: {
            "responses": int(t["responses"]),
            "seconds": round(t["seconds"], 3),
            "responses_per_s": round(t["responses"] / t["seconds"], 2) if t["seconds"] else None,
        }
        for name, t in sorted(per_scorer.items())
    }
    return StageResult(
        counts={
            "responses": table.num_rows,
            "by_domain": dict(sorted(Counter(table.column("domain").to_pylist()).items())),
            "by_verdict": dict(sorted(verdicts.items())),
            "reward_null": table.column("reward").null_count,
            "truncated": sum(1 for t in table.column("truncated").to_pylist() if t),
        },
        timings={"scorers": throughput, "workers": dict(sorted(per_worker.items()))},
    )


class LiveScorers:
    """The heavy scorers, loaded on first need and kept for the whole job (model, verifier pool)."""

    def __init__(self, score: ScoreConfig, device: str | None = None, log: Callable[[str], None] | None = None):
        self.score = score
        self.device = device
        self.log = log
        self.reward_model = None
        self.math_checker = None

    def for_rows(self, rows: list[dict[str, Any]]) -> Scorers:
        names = {name for r in rows for name in route_for(self.score, r["domain"])}
        return Scorers(
            reward=self._reward if "reward" in names else None,
            math=self._math if "math" in names else None,
            code=self._code if "code" in names else None,
            exact=self._exact if "exact" in names else None,
        )

    def _reward(self, conversations):
        if self.reward_model is None:
            from fusechat.score.reward_model import RewardModel

            self.reward_model = RewardModel(self.score.reward_model, self.device)
        s = self.reward_model.score(conversations)
        if s.errors and self.log:
            i, what = next(iter(s.errors.items()))
            self.log(f"reward: {len(s.errors)} row(s) of a chunk not scored; first: {s.verdicts[i]}, {what}")
        return s.rewards, s.truncated, s.num_tokens, s.verdicts

    def _math(self, items):
        if self.math_checker is None:
            from fusechat.score.math_check import MathChecker

            self.math_checker = MathChecker(self.score.math.timeout_s, self.score.math.workers)
        return self.math_checker.check_many(items)

    @staticmethod
    def _exact(items):
        from fusechat.score.exact import check_exact

        return [check_exact(text, answer).removeprefix("exact:") for text, answer in items]

    def _code(self, items):
        from fusechat.score.sandbox import check_code_many

        return check_code_many(items, self.score.code)

    def close(self) -> None:
        if self.math_checker is not None:
            self.math_checker.close()
