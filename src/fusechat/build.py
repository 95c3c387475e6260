"""`fusechat build`: the SFT and DPO training sets from a scored samples version.

Reads like a recipe: resolve the inputs (scores, then the samples and prompts it was made from), read ids and
scores of every response (no texts kept: a text is read only to flag it empty), match scores to samples, `select`
winners, read the texts of the winners only, render them with the target's chat template to drop what exceeds
`build.max_length`, write `sft/` and `dpo/` in TRL's conversational formats and `stats.json`. Memory holds ids,
scores and the kept texts, never all texts.

Length and identical-text filters run after selection (they need texts): a winner over `max_length` is dropped
and counted, not replaced by the runner-up, because measuring every response in target tokens would mean
tokenizing all texts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusechat.config import FusechatConfig
from fusechat.errors import UserError
from fusechat.prompts import MESSAGE, read_prompts
from fusechat.selection import Selection, codes_in, dictionary_codes, select
from fusechat.store import RunStore, StageResult, Version, model_identity, run_stage, write_json_atomic

SFT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("domain", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("source", pa.string()),
        ("reward", pa.float64()),
        ("sample_index", pa.int32()),
        ("num_tokens", pa.int32()),
    ]
)
DPO_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("chosen", pa.list_(MESSAGE)),
        ("rejected", pa.list_(MESSAGE)),
        ("source", pa.string()),
        ("chosen_reward", pa.float64()),
        ("rejected_reward", pa.float64()),
        ("margin", pa.float64()),
        ("chosen_index", pa.int32()),
        ("rejected_index", pa.int32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
)
INPUTS = ("prompts", "samples", "scores")
READ_BATCH = 65_536
WRITE_CHUNK = 2_048

Progress = Callable[[str, int, int], None]  # phase, done, total


# --------------------------------------------------------------------------------------------- inputs
def resolve_inputs(store: RunStore, pinned: dict[str, str]) -> dict[str, Version]:
    """The pinned (or latest) scores version, and the samples and prompts versions it was made from unless
    those are pinned too."""
    unknown = sorted(set(pinned) - set(INPUTS))
    if unknown:
        raise UserError(f"--input {unknown[0]}=...: build reads {', '.join(INPUTS)}")
    scores = store.resolve("scores", pinned.get("scores"))
    samples = _upstream(store, scores, "samples", pinned)
    prompts = _upstream(store, samples, "prompts", pinned)
    return {"prompts": prompts, "samples": samples, "scores": scores}


def _upstream(store: RunStore, version: Version, stage: str, pinned: dict[str, str]) -> Version:
    if stage in pinned:
        return store.resolve(stage, pinned[stage])
    name = (version.manifest.get("inputs") or {}).get(stage)
    if name is None:
        return store.resolve(stage)
    v = store.named(stage, name)
    if v is not None:
        return store.check(v)
    raise UserError(
        f"{version.ref} was made from {stage}/{name}, which is not a complete version in "
        f"{store.root}; pin one with --input {stage}=vNNN"
    )


def stage_config(cfg: FusechatConfig) -> dict[str, Any]:
    config: dict[str, Any] = {"seed": cfg.seed, "build": cfg.build.model_dump(mode="json")}
    if cfg.build.max_length is not None:
        from fusechat.train.stage import chat_template

        template = chat_template(cfg)
        config["target"] = {
            **model_identity(cfg.target.path),
            "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        }
    return config


def check_config(cfg: FusechatConfig) -> None:
    if cfg.build.max_length is not None and cfg.target is None:
        raise UserError(
            "build.max_length counts tokens of the target tokenizer, but the config has no "
            "target.path; set one, or build.max_length: null"
        )
    low, high = cfg.build.margin
    if not 0 <= low <= high:
        raise UserError(f"build.margin: expected [low, high] with 0 <= low <= high, got [{low}, {high}]")


# --------------------------------------------------------------------------------------------- shell
def run_build(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    pinned: dict[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> Version:
    check_config(cfg)
    inputs = resolve_inputs(store, pinned or {})
    count_tokens = token_counter(cfg)
    if count_tokens is None:
        log("note: build.max_length is null, so no length filter")

    def body(out: Path) -> StageResult:
        result = build_datasets(cfg, inputs, out, count_tokens, progress or (lambda *a: None))
        if not result.counts["sft_rows"] and not result.counts["dpo_pairs"]:
            warnings = json.loads((out / "stats.json").read_text()).get("warnings") or ["see the drop counts"]
            raise UserError(f"build: {inputs['scores'].ref} yields no SFT row and no DPO pair: {warnings[0]}")
        return result

    version = run_stage(store, "datasets", stage_config(cfg), inputs, body, force=force, log=log)
    assert version is not None
    stats = version.path / "stats.json"
    for warning in json.loads(stats.read_text()).get("warnings", []) if stats.exists() else []:
        log(f"WARNING: {warning}")
    return version


def build_datasets(
    cfg: FusechatConfig,
    inputs: dict[str, Version],
    out: Path,
    count_tokens: Callable[[list], np.ndarray] | None,
    progress: Progress,
) -> StageResult:
    timings: dict[str, float] = {}
    started = time.time()
    prompts = read_prompts(inputs["prompts"], columns=["prompt_id", "domain", "split", "messages", "origin"])
    candidates, where = read_candidates(
        inputs, prompts.column("prompt_id").combine_chunks(), need_empty=cfg.build.drop_empty, progress=progress
    )
    timings["read_scores_s"] = round(time.time() - started, 3)

    started = time.time()
    selection = select(prompts.select(["prompt_id", "domain", "split"]), candidates, cfg.build, cfg.seed)
    timings["select_s"] = round(time.time() - started, 3)

    started = time.time()
    rows = np.unique(
        np.concatenate(
            [
                selection.sft.column("row").to_numpy(),
                selection.dpo.column("chosen_row").to_numpy(),
                selection.dpo.column("rejected_row").to_numpy(),
            ]
        )
    )
    texts = read_texts(where["files"], where["file_no"][rows], where["row_no"][rows], progress)
    timings["read_texts_s"] = round(time.time() - started, 3)

    started = time.time()

    def text_of(r: pa.ChunkedArray | pa.Array) -> list[str]:
        return texts.take(np.searchsorted(rows, r.to_numpy())).to_pylist()

    messages = prompts.column("messages")
    post = {"sft": Counter(), "dpo": Counter()}
    post_by_domain: dict[str, dict[str, Counter]] = {"sft": defaultdict(Counter), "dpo": defaultdict(Counter)}
    lengths = {"sft": [], "dpo": []}
    (out / "sft").mkdir(parents=True)
    (out / "dpo").mkdir(parents=True)
    sft, dpo = selection.sft, selection.dpo
    total = sft.num_rows + dpo.num_rows
    with pq.ParquetWriter(out / "sft" / "train.parquet", SFT_SCHEMA) as writer:
        for start in range(0, sft.num_rows, WRITE_CHUNK):
            part = sft.slice(start, WRITE_CHUNK)
            turns = messages.take(codes_in(part.column("prompt_id"), prompts.column("prompt_id"))).to_pylist()
            convs = [
                [*t, {"role": "assistant", "content": x}]
                for t, x in zip(turns, text_of(part.column("row")), strict=True)
            ]
            n_tok = _count(count_tokens, convs)
            keep = _fits(n_tok, cfg.build.max_length)
            post["sft"]["too_long"] += int((~keep).sum())
            _tally(post_by_domain["sft"], part.column("domain"), ~keep, "too_long")
            lengths["sft"].append(n_tok[keep])
            idx = np.flatnonzero(keep)
            table = (
                part.take(idx)
                .drop_columns(["row"])
                .append_column("messages", pa.array([convs[i] for i in idx], pa.list_(MESSAGE)))
                .append_column("num_tokens", pa.array(n_tok[keep], pa.int32()))
            )
            writer.write_table(table.select(SFT_SCHEMA.names).cast(SFT_SCHEMA))
            progress("writing", start + part.num_rows, total)
    with pq.ParquetWriter(out / "dpo" / "train.parquet", DPO_SCHEMA) as writer:
        for start in range(0, dpo.num_rows, WRITE_CHUNK):
            part = dpo.slice(start, WRITE_CHUNK)
            turns = messages.take(codes_in(part.column("prompt_id"), prompts.column("prompt_id"))).to_pylist()
            chosen, rejected = text_of(part.column("chosen_row")), text_of(part.column("rejected_row"))
            identical = np.array([c == r for c, r in zip(chosen, rejected, strict=True)], dtype=bool)
            c_tok = _count(
                count_tokens, [[*t, {"role": "assistant", "content": c}] for t, c in zip(turns, chosen, strict=True)]
            )
            r_tok = _count(
                count_tokens, [[*t, {"role": "assistant", "content": r}] for t, r in zip(turns, rejected, strict=True)]
            )
            fits = _fits(np.maximum(c_tok, r_tok), cfg.build.max_length)
            post["dpo"]["identical_texts"] += int(identical.sum())
            post["dpo"]["too_long"] += int((~identical & ~fits).sum())
            _tally(post_by_domain["dpo"], part.column("domain"), identical, "identical_texts")
            _tally(post_by_domain["dpo"], part.column("domain"), ~identical & ~fits, "too_long")
            keep = ~identical & fits
            idx = np.flatnonzero(keep)
            lengths["dpo"].append(np.maximum(c_tok, r_tok)[keep])
            table = part.take(idx).drop_columns(["chosen_row", "rejected_row"])
            for name, values in (
                ("prompt", [turns[i] for i in idx]),
                ("chosen", [[{"role": "assistant", "content": chosen[i]}] for i in idx]),
                ("rejected", [[{"role": "assistant", "content": rejected[i]}] for i in idx]),
            ):
                table = table.append_column(name, pa.array(values, pa.list_(MESSAGE)))
            table = table.append_column("chosen_tokens", pa.array(c_tok[keep], pa.int32()))
            table = table.append_column("rejected_tokens", pa.array(r_tok[keep], pa.int32()))
            writer.write_table(table.select(DPO_SCHEMA.names).cast(DPO_SCHEMA))
            progress("writing", sft.num_rows + start + part.num_rows, total)
    timings["write_s"] = round(time.time() - started, 3)

    written = {
        name: pq.read_table(
            out / name / "train.parquet",
            columns=["prompt_id", "domain", "source"] + (["margin"] if name == "dpo" else []),
        )
        for name in ("sft", "dpo")
    }
    stats = make_stats(cfg, inputs, prompts, candidates, selection, post, written, lengths, post_by_domain)
    write_json_atomic(out / "stats.json", stats)
    return StageResult(
        counts={
            "sft_rows": stats["sft"]["rows"],
            "dpo_pairs": stats["dpo"]["pairs"],
            "responses": candidates.num_rows,
            "by_domain": {
                d: {"sft": stats["sft"]["by_domain"].get(d, 0), "dpo": stats["dpo"]["by_domain"].get(d, 0)}
                for d in sorted(set(prompts.column("domain").to_pylist()))
            },
        },
        timings=timings,
    )


def _tally(counter: dict[str, Counter], domains: pa.ChunkedArray | pa.Array, mask: np.ndarray, reason: str) -> None:
    """Count the rows of `mask` by domain under `reason`."""
    for domain, n in Counter(np.asarray(domains.to_pylist(), dtype=object)[mask]).items():
        counter[domain][reason] += n


def _count(count_tokens: Callable[[list], np.ndarray] | None, convs: list) -> np.ndarray:
    if count_tokens is None or not convs:
        return np.full(len(convs), -1, dtype=np.int64)  # not measured
    return count_tokens(convs)


def _fits(n_tokens: np.ndarray, max_length: int | None) -> np.ndarray:
    return np.ones(len(n_tokens), dtype=bool) if max_length is None else n_tokens <= max_length


def token_counter(cfg: FusechatConfig) -> Callable[[list], np.ndarray] | None:
    """Tokens of each conversation rendered with the target's chat template, as the trainers will see them."""
    if cfg.build.max_length is None:
        return None
    from fusechat.train.stage import chat_template
    from fusechat.train.worker import load_target_tokenizer

    try:
        tok = load_target_tokenizer(cfg.target.path, chat_template(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"target.path: cannot load a tokenizer from {cfg.target.path} ({e})") from None
    if not tok.chat_template:
        raise UserError(f"target.path: {cfg.target.path} has no chat template; set target.chat_template")

    def count(convs: list) -> np.ndarray:
        try:
            rendered = tok.apply_chat_template(convs, tokenize=False)
        except Exception as e:  # jinja raises its own types, e.g. a template that rejects system turns
            raise UserError(f"target chat template cannot render a build row: {e}") from None
        ids = tok(rendered, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    return count


# --------------------------------------------------------------------------------------------- reading
def _files(version: Version, columns: tuple[str, ...]) -> list[Path]:
    files = sorted(version.data.glob("*.parquet"))
    if not files:
        raise UserError(f"{version.data}: no Parquet files; is {version.ref} complete?")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(f"{f}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")
    return files


def read_candidates(
    inputs: dict[str, Version], prompt_ids: pa.Array, *, need_empty: bool, progress: Progress
) -> tuple[pa.Table, dict[str, Any]]:
    """One row per response, in samples-file order: ids (prompt and source dictionary-encoded), reward,
    correct, truncated, empty; plus where each response's text lives (file, row). Scores must match samples
    one to one."""
    samples, scores = inputs["samples"], inputs["scores"]
    sources: dict[str, int] = {}
    sample_cols = ("prompt_id", "source", "sample_index", "finish_reason") + (("text",) if need_empty else ())
    s_files = _files(samples, sample_cols)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    total = sum(pq.read_metadata(f).num_rows for f in s_files)
    done = 0
    for file_no, f in enumerate(s_files):
        row_no = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH, columns=list(sample_cols)):
            p, s, idx = _key_columns(batch, prompt_ids, sources, f, inputs["prompts"], add_sources=True, row0=row_no)
            parts["p"].append(p)
            parts["s"].append(s)
            parts["idx"].append(idx)
            parts["truncated"].append(_bool(pc.equal(batch.column("finish_reason"), "length")))
            if need_empty:
                text = batch.column("text")
                empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
                parts["empty"].append(_bool(empty) | _bool(text.is_null()))
            parts["file_no"].append(np.full(batch.num_rows, file_no, dtype=np.int32))
            parts["row_no"].append(np.arange(row_no, row_no + batch.num_rows, dtype=np.int64))
            row_no += batch.num_rows
            done += batch.num_rows
            progress("reading samples", done, total)
    if not parts:
        raise UserError(f"{samples.data}: {samples.ref} holds no responses")
    sp = {k: np.concatenate(v) for k, v in parts.items()}
    n = len(sp["p"])

    parts = defaultdict(list)
    c_files = _files(scores, ("prompt_id", "source", "sample_index", "reward", "correct"))
    total = sum(pq.read_metadata(f).num_rows for f in c_files)
    done = 0
    for file_no, f in enumerate(c_files):
        row_no = 0
        # `truncated`: the reward model saw only part of the response (absent from hand-made scores)
        has_flag = "truncated" in pq.read_schema(f).names
        columns = ["prompt_id", "source", "sample_index", "reward", "correct"] + (["truncated"] if has_flag else [])
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH, columns=columns):
            p, s, idx = _key_columns(batch, prompt_ids, sources, f, inputs["prompts"], add_sources=False, row0=row_no)
            reward = batch.column("reward").cast(pa.float64())
            correct = batch.column("correct").cast(pa.bool_())
            parts["p"].append(p)
            parts["s"].append(s)
            parts["idx"].append(idx)
            parts["reward"].append(reward.fill_null(np.nan).to_numpy(zero_copy_only=False))
            parts["reward_null"].append(_bool(reward.is_null()))
            parts["correct"].append(
                np.where(_bool(correct.is_null()), -1, _bool(correct.fill_null(False))).astype(np.int8)
            )
            parts["reward_truncated"].append(
                _bool(batch.column("truncated")) if has_flag else np.zeros(batch.num_rows, dtype=bool)
            )
            parts["file_no"].append(np.full(batch.num_rows, file_no, dtype=np.int32))
            parts["row_no"].append(np.arange(row_no, row_no + batch.num_rows, dtype=np.int64))
            row_no += batch.num_rows
            done += batch.num_rows
            progress("reading scores", done, total)
    if not parts:
        raise UserError(f"{scores.data}: {scores.ref} holds no scores")
    sc = {k: np.concatenate(v) for k, v in parts.items()}

    # Match on one int64 key per response.
    n_sources = max(len(sources), 1)
    width = int(max(sp["idx"].max(), sc["idx"].max())) + 1
    s_key = (sp["p"] * n_sources + sp["s"]) * width + sp["idx"]
    order = np.argsort(s_key, kind="stable")
    sorted_key = s_key[order]
    dup = np.flatnonzero(sorted_key[1:] == sorted_key[:-1])
    if len(dup):
        i = order[dup[0] + 1]
        raise UserError(
            f"{s_files[sp['file_no'][i]]}: row {sp['row_no'][i]}: duplicate response "
            f"{_describe(sp, i, prompt_ids, sources)} in {samples.ref}"
        )
    c_key = (sc["p"] * n_sources + sc["s"]) * width + sc["idx"]
    pos = np.minimum(np.searchsorted(sorted_key, c_key), n - 1)
    found = sorted_key[pos] == c_key
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise UserError(
            f"{c_files[sc['file_no'][i]]}: row {sc['row_no'][i]}: score for "
            f"{_describe(sc, i, prompt_ids, sources)}, which is not a response of {samples.ref}; "
            f"{scores.ref} was not made from these samples"
        )
    target = order[pos]
    hits = np.bincount(target, minlength=n)
    if (hits > 1).any():
        i = int(np.flatnonzero(target == np.flatnonzero(hits > 1)[0])[1])
        raise UserError(
            f"{c_files[sc['file_no'][i]]}: row {sc['row_no'][i]}: second score for "
            f"{_describe(sc, i, prompt_ids, sources)} in {scores.ref}"
        )
    if (hits == 0).any():
        i = int(np.flatnonzero(hits == 0)[0])
        raise UserError(
            f"{scores.ref} has no score for {int((hits == 0).sum())} of {n} responses of "
            f"{samples.ref} (first: {_describe(sp, i, prompt_ids, sources)}); score them, or pin "
            f"--input samples=... to the version the scores were made from"
        )
    reward = np.full(n, np.nan)
    reward[target] = sc["reward"]
    reward_null = np.zeros(n, dtype=bool)
    reward_null[target] = sc["reward_null"]
    correct = np.full(n, -1, dtype=np.int8)
    correct[target] = sc["correct"]
    reward_truncated = np.zeros(n, dtype=bool)
    reward_truncated[target] = sc["reward_truncated"]

    source_names = pa.array(sorted(sources, key=sources.get), pa.string())
    table = pa.table(
        {
            "prompt_id": pa.DictionaryArray.from_arrays(pa.array(sp["p"], pa.int32()), prompt_ids),
            "source": pa.DictionaryArray.from_arrays(pa.array(sp["s"], pa.int32()), source_names),
            "sample_index": pa.array(sp["idx"], pa.int32()),
            "reward": pa.array(reward, pa.float64(), mask=reward_null),
            "correct": pa.array(correct == 1, pa.bool_(), mask=correct < 0),
            "truncated": pa.array(sp["truncated"], pa.bool_()),
            "empty": pa.array(sp["empty"] if need_empty else np.zeros(n, dtype=bool), pa.bool_()),
            "reward_truncated": pa.array(reward_truncated, pa.bool_()),
        }
    )
    return table, {"files": s_files, "file_no": sp["file_no"], "row_no": sp["row_no"]}


def _key_columns(
    batch: pa.RecordBatch,
    prompt_ids: pa.Array,
    sources: dict[str, int],
    f: Path,
    prompts: Version,
    *,
    add_sources: bool,
    row0: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = codes_in(batch.column("prompt_id"), prompt_ids)
    if (p < 0).any():
        i = int(np.flatnonzero(p < 0)[0])
        raise UserError(
            f"{f}: row {row0 + i}: prompt_id {batch.column('prompt_id')[i].as_py()!r} is not in {prompts.ref}"
        )
    source = batch.column("source")
    if add_sources:
        for name in pc.unique(source).to_pylist():
            if name is None:
                raise UserError(f"{f}: a row has no source")
            sources.setdefault(name, len(sources))
    s = codes_in(source, pa.array(sorted(sources, key=sources.get), pa.string()))
    if (s < 0).any():
        i = int(np.flatnonzero(s < 0)[0])
        raise UserError(f"{f}: row {row0 + i}: source {source[i].as_py()!r} has no responses in the samples")
    idx = batch.column("sample_index")
    if idx.null_count or (len(idx) and pc.min(idx).as_py() < 0):
        raise UserError(f"{f}: sample_index must be a non-negative integer in every row")
    return p, s, idx.to_numpy(zero_copy_only=False).astype(np.int64)


def _bool(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return array.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def _describe(part: dict[str, np.ndarray], i: int, prompt_ids: pa.Array, sources: dict[str, int]) -> str:
    names = sorted(sources, key=sources.get)
    return (
        f"(prompt_id={prompt_ids[int(part['p'][i])].as_py()}, source={names[int(part['s'][i])]}, "
        f"sample_index={int(part['idx'][i])})"
    )


def read_texts(files: list[Path], file_no: np.ndarray, row_no: np.ndarray, progress: Progress) -> pa.ChunkedArray:
    """The `text` of the given responses (sorted by file, then row), reading only the row groups that hold them."""
    chunks = []
    for k, f in enumerate(files):
        rows = row_no[file_no == k]
        if not len(rows):
            continue
        pf = pq.ParquetFile(f)
        bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        group = np.searchsorted(bounds, rows, side="right") - 1
        for g in np.unique(group):
            local = rows[group == g] - bounds[g]
            chunks.append(pf.read_row_group(int(g), columns=["text"]).column("text").take(local))
        progress("reading kept texts", k + 1, len(files))
    return pa.chunked_array(chunks, pa.string()) if chunks else pa.chunked_array([], pa.string())


# --------------------------------------------------------------------------------------------- stats
def make_stats(
    cfg: FusechatConfig,
    inputs: dict[str, Version],
    prompts: pa.Table,
    candidates: pa.Table,
    selection: Selection,
    post: dict[str, Counter],
    written: dict[str, pa.Table],
    lengths: dict[str, list[np.ndarray]],
    post_by_domain: dict[str, dict[str, Counter]],
) -> dict[str, Any]:
    """What was kept and dropped, by domain and source: deterministic (no timings), so equal builds give equal
    files. Drops count prompts, except `too_long` and `identical_texts`, which count selected rows / pairs.
    `domains` has every count per domain and per source model; `warnings` names each domain (or split of one)
    that yields nothing, with the likely cause."""
    n_responses = candidates.num_rows
    splits = Counter(zip(prompts.column("split").to_pylist(), prompts.column("domain").to_pylist(), strict=True))
    low, high = cfg.build.margin
    margins = written["dpo"].column("margin").to_numpy()
    edges = np.linspace(low, high, 11)
    cand = selection.candidate_margins
    out: dict[str, Any] = {
        "inputs": {name: v.name for name, v in inputs.items()},
        "responses": {"total": n_responses, "excluded": dict(sorted(selection.excluded.items()))},
        "verified_domains": selection.verified,
        "max_length": cfg.build.max_length,
    }
    for name in ("sft", "dpo"):
        table = written[name]
        domains, sources = table.column("domain").to_pylist(), table.column("source").to_pylist()
        by_domain_source: dict[str, Counter] = defaultdict(Counter)
        for dom, src in zip(domains, sources, strict=True):
            by_domain_source[dom][src] += 1
        measured = np.concatenate(lengths[name]) if lengths[name] else np.zeros(0)
        out[name] = {
            "prompts": sum(n for (split, _), n in splits.items() if split == name),
            "prompts_by_domain": dict(sorted((d, n) for (split, d), n in splits.items() if split == name)),
            ("rows" if name == "sft" else "pairs"): table.num_rows,
            "by_domain": dict(sorted(Counter(domains).items())),
            "by_source": dict(sorted(Counter(sources).items())),
            "by_domain_source": {d: dict(sorted(c.items())) for d, c in sorted(by_domain_source.items())},
            "dropped": dict(sorted((selection.dropped[name] + post[name]).items())),
            "tokens": quantiles(measured[measured >= 0]),
        }
    out["dpo"]["margin"] = {
        "band": [low, high],
        "rule": cfg.build.pair_source_rule,
        "kept": quantiles(margins),
        "candidates": quantiles(cand),
        "histogram": {
            "edges": [round(float(e), 6) for e in edges],
            "kept": np.histogram(margins, bins=edges)[0].tolist(),
            "candidates": np.histogram(cand, bins=edges)[0].tolist(),
            "candidates_below": int((cand < low).sum()),
            "candidates_above": int((cand > high).sum()),
        },
    }
    out["domains"] = domain_stats(prompts, candidates, selection, written, post_by_domain)
    out["warnings"] = empty_domain_warnings(out["domains"], cfg)
    return out


def domain_stats(
    prompts: pa.Table,
    candidates: pa.Table,
    selection: Selection,
    written: dict[str, pa.Table],
    post_by_domain: dict[str, dict[str, Counter]],
) -> dict[str, Any]:
    """Per domain, and per source model within it: prompts (per split; for a source: those it answered),
    candidates (responses), acceptable responses (may be chosen), SFT rows, DPO pairs, and every drop reason with
    its count: responses excluded, prompts dropped (per split), selected rows dropped after selection. Per prompt
    dataset (`origin`) within a domain: prompts, SFT rows, DPO pairs, prompts dropped."""
    prompt_domain = np.asarray(prompts.column("domain").to_pylist(), dtype=object)
    prompt_split = np.asarray(prompts.column("split").to_pylist(), dtype=object)
    p = codes_in(candidates.column("prompt_id"), prompts.column("prompt_id"))
    s, source_names = dictionary_codes(candidates.column("source"))
    row_domain = prompt_domain[p] if len(p) else np.zeros(0, dtype=object)
    wins = {
        name: Counter(zip(t.column("domain").to_pylist(), t.column("source").to_pylist(), strict=True))
        for name, t in written.items()
    }

    origin = np.asarray(prompts.column("origin").to_pylist(), dtype=object)
    row_of = {name: codes_in(t.column("prompt_id"), prompts.column("prompt_id")) for name, t in written.items()}

    def reasons(values: np.ndarray) -> dict[str, int]:
        return dict(sorted((k, v) for k, v in Counter(values.tolist()).items() if k))

    out: dict[str, Any] = {}
    for domain in sorted(set(prompt_domain.tolist())):
        in_domain, rows = prompt_domain == domain, row_domain == domain
        by_source = {}
        for k, source in enumerate(source_names.to_pylist()):
            mine = rows & (s == k)
            if mine.any():
                by_source[source] = {
                    "prompts": int(len(np.unique(p[mine]))),
                    "candidates": int(mine.sum()),
                    "acceptable": int(selection.acceptable[mine].sum()),
                    "sft_rows": wins["sft"][(domain, source)],
                    "dpo_pairs": wins["dpo"][(domain, source)],
                    "excluded_responses": reasons(selection.excluded_reason[mine]),
                }
        out[domain] = {
            "prompts": {split: int((in_domain & (prompt_split == split)).sum()) for split in ("sft", "dpo")},
            "candidates": int(rows.sum()),
            "acceptable": int(selection.acceptable[rows].sum()),
            "sft_rows": sum(n for (d, _), n in wins["sft"].items() if d == domain),
            "dpo_pairs": sum(n for (d, _), n in wins["dpo"].items() if d == domain),
            "excluded_responses": reasons(selection.excluded_reason[rows]),
            "dropped_prompts": {
                split: reasons(selection.dropped_reason[in_domain & (prompt_split == split)])
                for split in ("sft", "dpo")
            },
            "dropped_rows": {
                split: dict(sorted(post_by_domain[split].get(domain, {}).items())) for split in post_by_domain
            },
            "by_source": by_source,
            "by_origin": {
                o: {
                    "prompts": {
                        s: int((in_domain & (origin == o) & (prompt_split == s)).sum()) for s in ("sft", "dpo")
                    },
                    "sft_rows": int((origin[row_of["sft"]] == o).sum()),
                    "dpo_pairs": int((origin[row_of["dpo"]] == o).sum()),
                    "dropped_prompts": reasons(selection.dropped_reason[in_domain & (origin == o)]),
                }
                for o in sorted(set(origin[in_domain].tolist()))
            },
        }
    return out


CAUSES = {
    "unverified": "no response has a verifier verdict (code without tests, math without an answer: see the scores' "
    "verdicts, e.g. code:no_reference, and prompts.sources[].code_tests / fields, score.routes)",
    "truncated": "responses were cut at max_tokens (raise sources[].sampling.max_tokens, or build.drop_truncated: false)",
    "null_reward": "responses have no reward (the domain's score.routes lacks reward)",
    "nan_reward": "the reward model returned NaN",
    "empty": "responses are empty",
    "no_samples": "no source model answered its prompts (sources[].samples)",
    "no_usable_response": "no usable response (null reward, truncated or empty)",
    "no_acceptable_response": "no response passed verification (see the scores' verdicts, e.g. code:fail)",
    "no_rejected_response": "every response passed verification, so DPO has nothing to reject",
    "no_same_source_pair": "no source has both a chosen and a rejected response",
    "margin_below_band": "every same-source reward gap is below build.margin",
    "margin_above_band": "every same-source reward gap is above build.margin",
    "margin_outside_band": "no same-source reward gap is inside build.margin",
    "sft_only_domain": "it is in build.sft_only_domains",
    "too_long": "the selected rows exceed build.max_length",
    "identical_texts": "chosen and rejected texts are identical",
}


def empty_domain_warnings(domains: dict[str, Any], cfg: FusechatConfig) -> list[str]:
    """One line per domain that yields no rows (or per split of one that yields none), with the likely cause:
    the reason that dropped or excluded the most."""
    warnings = []
    for name, d in domains.items():
        n_prompts = sum(d["prompts"].values())
        if d["sft_rows"] + d["dpo_pairs"] == 0 and n_prompts:
            warnings.append(
                f"domain {name!r} yields 0 SFT rows and 0 DPO pairs from {n_prompts} prompts "
                f"({d['candidates']} responses, {d['acceptable']} acceptable): {_likely_cause(d, ('sft', 'dpo'))}"
            )
            continue
        for split, kept, label in (("sft", "sft_rows", "SFT rows"), ("dpo", "dpo_pairs", "DPO pairs")):
            if d["prompts"][split] and not d[kept] and not (split == "dpo" and name in cfg.build.sft_only_domains):
                warnings.append(
                    f"domain {name!r} yields 0 {label} from {d['prompts'][split]} {split} prompts: "
                    f"{_likely_cause(d, (split,))}"
                )
    return warnings


def _likely_cause(d: dict[str, Any], splits: tuple[str, ...]) -> str:
    if d["candidates"] == 0:
        return CAUSES["no_samples"]
    if d["acceptable"] == 0:
        excluded = d["excluded_responses"]
        if sum(excluded.values()) < d["candidates"]:
            return CAUSES["no_acceptable_response"]
        top = max(excluded, key=excluded.get)
        return f"{excluded[top]} of {d['candidates']} responses excluded as {top}: {CAUSES.get(top, top)}"
    dropped: Counter = Counter()
    for split in splits:
        dropped.update(d["dropped_prompts"][split])
        dropped.update(d["dropped_rows"].get(split, {}))
    if not dropped:
        return "no prompts in this split"
    top = max(sorted(dropped), key=dropped.get)
    return f"{dropped[top]} dropped as {top}: {CAUSES.get(top, top)}"


def quantiles(values: np.ndarray) -> dict[str, float | int]:
    if len(values) == 0:
        return {"count": 0}
    q = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("min", "p10", "p25", "median", "p75", "p90", "max")
    return {
        "count": int(len(values)),
        **{k: round(float(v), 6) for k, v in zip(names, q, strict=True)},
        "mean": round(float(np.mean(values)), 6),
    }


def stats_tables(stats: dict[str, Any]) -> list:
    """The stats as rich tables: per domain and source model what went in and what came out, every drop reason
    by domain, the DPO margins."""
    from rich.table import Table

    sft, dpo = stats["sft"], stats["dpo"]
    domains = stats.get("domains", {})
    by_domain = Table(title="datasets by domain and source (prompts: sft / dpo; for a source: answered)")
    for col in ("domain", "source", "prompts", "responses", "acceptable", "sft rows", "dpo pairs", "excluded"):
        by_domain.add_column(col, justify="left" if col in ("domain", "source", "excluded") else "right")

    def excluded(counts: dict[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in counts.items())

    for name, d in domains.items():
        by_domain.add_row(
            f"[bold]{name}",
            "[bold]all",
            f"{d['prompts']['sft']} / {d['prompts']['dpo']}",
            str(d["candidates"]),
            str(d["acceptable"]),
            str(d["sft_rows"]),
            str(d["dpo_pairs"]),
            excluded(d["excluded_responses"]),
        )
        for source, c in d["by_source"].items():
            by_domain.add_row(
                "",
                source,
                str(c["prompts"]),
                str(c["candidates"]),
                str(c["acceptable"]),
                str(c["sft_rows"]),
                str(c["dpo_pairs"]),
                excluded(c["excluded_responses"]),
            )
    by_domain.add_row(
        "[bold]total",
        "",
        f"{sft['prompts']} / {dpo['prompts']}",
        str(stats["responses"]["total"]),
        "",
        str(sft["rows"]),
        str(dpo["pairs"]),
        excluded(stats["responses"]["excluded"]),
    )

    origins = Table(title="datasets by prompt dataset (prompts: sft / dpo)")
    for col in ("domain", "prompt dataset", "prompts", "sft rows", "dpo pairs", "dropped prompts"):
        origins.add_column(col, justify="left" if col in ("domain", "prompt dataset", "dropped prompts") else "right")
    for name, d in domains.items():
        for origin, o in d.get("by_origin", {}).items():
            origins.add_row(
                name,
                origin,
                f"{o['prompts']['sft']} / {o['prompts']['dpo']}",
                str(o["sft_rows"]),
                str(o["dpo_pairs"]),
                excluded(o["dropped_prompts"]),
            )

    drops = Table(title="dropped by domain: prompts per split, selected rows (too_long, identical_texts), responses")
    for col in ("domain", "reason", "sft", "dpo", "responses"):
        drops.add_column(col, justify="left" if col in ("domain", "reason") else "right")
    for name, d in domains.items():
        split_drops = {split: Counter(d["dropped_prompts"][split]) for split in ("sft", "dpo")}
        for split, counts in d["dropped_rows"].items():
            split_drops[split].update(counts)
        for reason in sorted(set(split_drops["sft"]) | set(split_drops["dpo"])):
            drops.add_row(
                name, reason, str(split_drops["sft"].get(reason, "")), str(split_drops["dpo"].get(reason, "")), ""
            )
        for reason, n in d["excluded_responses"].items():
            drops.add_row(name, reason, "", "", str(n))

    m = dpo["margin"]["kept"]
    margin = Table(title=f"dpo margins (band {dpo['margin']['band']}, rule {dpo['margin']['rule']})")
    for col in ("pairs", "count", "min", "p10", "median", "p90", "max"):
        margin.add_column(col, justify="right")
    for label, q in (("kept", m), ("all same-source", dpo["margin"]["candidates"])):
        margin.add_row(label, *(str(q.get(k, "")) for k in ("count", "min", "p10", "median", "p90", "max")))
    return [by_domain, origins, drops, margin]
