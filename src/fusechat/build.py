"""`fusechat build`: the SFT and DPO training sets from a scored samples version.

Reads like a recipe: resolve the inputs (scores, then the samples and prompts it was made from), read ids and
scores of every response (no texts kept: a text is read only to flag it empty), match scores to samples, `select`
winners, read the texts of the winners only, write `sft/` and `dpo/` in TRL's conversational formats and
`stats.json`. Memory holds ids, scores and the kept texts, never all texts.

Length (`build.max_length`, the target's tokens of prompt + response): a response that does not fit is excluded
before choosing, so the next-best acceptable one wins (`select_fitting`); with `build.over_length: truncate` it
stays a candidate and is cut to fit when selected, as the paper's trainer did. Only the responses in contention
are measured (the winners, and the pairs that could replace a kept one), each by a cheap upper bound first and
tokenized only when the bound does not settle it (`fusechat.lengths`).
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
from fusechat.lengths import TargetLengths
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
SELF_CHECK = 256  # candidates tokenized to check the length bound before it is trusted

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
    lengths = target_lengths(cfg)
    if lengths is None:
        log("note: build.max_length is null, so no length filter")

    def body(out: Path) -> StageResult:
        result = build_datasets(cfg, inputs, out, lengths, progress or (lambda *a: None), log)
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
    lengths: TargetLengths | None,
    progress: Progress,
    log: Callable[[str], None] = print,
) -> StageResult:
    timings: dict[str, float] = {}
    started = time.time()
    prompts = read_prompts(inputs["prompts"], columns=["prompt_id", "domain", "split", "messages", "origin"])
    candidates, where = read_candidates(
        inputs, prompts.column("prompt_id").combine_chunks(), need_empty=cfg.build.drop_empty, progress=progress
    )
    timings["read_scores_s"] = round(time.time() - started, 3)

    started = time.time()
    fit = Fitting(cfg, lengths, prompts, candidates, where, progress, log)
    selection = fit.select()
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
    lengths_seen = {"sft": [], "dpo": []}
    (out / "sft").mkdir(parents=True)
    (out / "dpo").mkdir(parents=True)
    sft, dpo = selection.sft, selection.dpo
    total = sft.num_rows + dpo.num_rows
    with pq.ParquetWriter(out / "sft" / "train.parquet", SFT_SCHEMA) as writer:
        for start in range(0, sft.num_rows, WRITE_CHUNK):
            part = sft.slice(start, WRITE_CHUNK)
            turns = messages.take(codes_in(part.column("prompt_id"), prompts.column("prompt_id"))).to_pylist()
            row = part.column("row").to_numpy()
            answer, n_tok, keep, cut = fit.fitted(row, turns, text_of(part.column("row")))
            post["sft"]["too_long"] += int((~keep).sum())
            _tally(post_by_domain["sft"], part.column("domain"), ~keep, "too_long")
            fit.cut["sft"] += int(cut.sum())
            lengths_seen["sft"].append(n_tok[keep])
            idx = np.flatnonzero(keep)
            convs = [[*turns[i], {"role": "assistant", "content": answer[i]}] for i in idx]
            table = (
                part.take(idx)
                .drop_columns(["row"])
                .append_column("messages", pa.array(convs, pa.list_(MESSAGE)))
                .append_column("num_tokens", pa.array(n_tok[keep], pa.int32(), mask=n_tok[keep] < 0))
            )
            writer.write_table(table.select(SFT_SCHEMA.names).cast(SFT_SCHEMA))
            progress("writing", start + part.num_rows, total)
    with pq.ParquetWriter(out / "dpo" / "train.parquet", DPO_SCHEMA) as writer:
        for start in range(0, dpo.num_rows, WRITE_CHUNK):
            part = dpo.slice(start, WRITE_CHUNK)
            turns = messages.take(codes_in(part.column("prompt_id"), prompts.column("prompt_id"))).to_pylist()
            chosen, c_tok, c_keep, c_cut = fit.fitted(
                part.column("chosen_row").to_numpy(), turns, text_of(part.column("chosen_row"))
            )
            rejected, r_tok, r_keep, r_cut = fit.fitted(
                part.column("rejected_row").to_numpy(), turns, text_of(part.column("rejected_row"))
            )
            identical = np.array([c == r for c, r in zip(chosen, rejected, strict=True)], dtype=bool)
            fits = c_keep & r_keep
            cut = (c_cut | r_cut) & fits & ~identical
            for reason, mask in (("identical_texts", identical), ("too_long", ~identical & ~fits)):
                post["dpo"][reason] += int(mask.sum())
                _tally(post_by_domain["dpo"], part.column("domain"), mask, reason)
            fit.cut["dpo"] += int(cut.sum())
            keep = ~identical & fits
            idx = np.flatnonzero(keep)
            lengths_seen["dpo"].append(np.maximum(c_tok, r_tok)[keep])
            table = part.take(idx).drop_columns(["chosen_row", "rejected_row"])
            for name, values in (
                ("prompt", [turns[i] for i in idx]),
                ("chosen", [[{"role": "assistant", "content": chosen[i]}] for i in idx]),
                ("rejected", [[{"role": "assistant", "content": rejected[i]}] for i in idx]),
            ):
                table = table.append_column(name, pa.array(values, pa.list_(MESSAGE)))
            for name, n in (("chosen_tokens", c_tok[keep]), ("rejected_tokens", r_tok[keep])):
                table = table.append_column(name, pa.array(n, pa.int32(), mask=n < 0))
            writer.write_table(table.select(DPO_SCHEMA.names).cast(DPO_SCHEMA))
            progress("writing", sft.num_rows + start + part.num_rows, total)
    timings["write_s"] = round(time.time() - started, 3)
    post = {name: Counter({k: v for k, v in c.items() if v}) for name, c in post.items()}

    written = {
        name: pq.read_table(
            out / name / "train.parquet",
            columns=["prompt_id", "domain", "source"] + (["margin"] if name == "dpo" else []),
        )
        for name in ("sft", "dpo")
    }
    stats = make_stats(cfg, inputs, prompts, candidates, selection, post, written, lengths_seen, post_by_domain)
    stats["lengths"] = fit.report()
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
        timings={**timings, **{f"length_{k}": v for k, v in fit.timings.items()}},
    )


def _tally(counter: dict[str, Counter], domains: pa.ChunkedArray | pa.Array, mask: np.ndarray, reason: str) -> None:
    """Count the rows of `mask` by domain under `reason`."""
    for domain, n in Counter(np.asarray(domains.to_pylist(), dtype=object)[mask]).items():
        counter[domain][reason] += n


class Fitting:
    """`build.max_length` over one build: which candidates fit, measured lazily (see the module docstring).

    `tokens` holds exact counts where a response was tokenized (-1 elsewhere); `too_long` the responses excluded."""

    def __init__(self, cfg, lengths, prompts, candidates, where, progress, log):
        self.cfg, self.lengths, self.prompts, self.candidates = cfg, lengths, prompts, candidates
        self.where, self.progress, self.log = where, progress, log
        self.max_length = cfg.build.max_length
        n = candidates.num_rows
        self.tokens = np.full(n, -1, dtype=np.int64)
        self.bound = np.full(n, -1, dtype=np.int64)
        self.too_long = np.zeros(n, dtype=bool)
        self.p = codes_in(candidates.column("prompt_id"), prompts.column("prompt_id")) if n else np.zeros(0, np.int64)
        self.prompt_bound: np.ndarray | None = None
        self.rounds = 0
        self.timings: dict[str, float] = {}
        self.cut = {"sft": 0, "dpo": 0}  # truncate mode: rows (pairs) written cut to fit
        self.checked = False  # the bound's self-check ran

    def _time(self, key: str, started: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.time() - started, 3)

    def select(self) -> Selection:
        """The selection with every over-long response excluded (exclude mode), else plain."""
        rules, seed = self.cfg.build, self.cfg.seed
        base = self.prompts.select(["prompt_id", "domain", "split"])
        if self.lengths is None or rules.over_length == "truncate":
            return select(base, self.candidates, rules, seed)
        while True:
            selection = select(base, self.candidates.append_column("too_long", pa.array(self.too_long)), rules, seed)
            new = selection.contenders[self.bound[selection.contenders] < 0]
            if not len(new):
                return selection
            self.rounds += 1
            self.measure(new)
            self.too_long[new] = np.where(self.tokens[new] >= 0, self.tokens[new], self.bound[new]) > self.max_length

    def measure(self, rows: np.ndarray, texts: pa.ChunkedArray | None = None) -> None:
        """Bound `rows` (sorted candidate rows), and tokenize those whose bound exceeds `max_length`."""
        started = time.time()
        if self.prompt_bound is None:
            self.prompt_bound = self.lengths.prompt_bounds(self.prompts.column("messages"))
            self._time("prompt_bounds_s", started)
        started = time.time()
        if texts is None:
            texts = read_texts(
                self.where["files"], self.where["file_no"][rows], self.where["row_no"][rows], self.progress
            )
            self._time("read_s", started)
        if not self.checked:
            self._self_check(rows, texts)
        started = time.time()
        self.bound[rows] = self.lengths.bounds(self.prompt_bound[self.p[rows]], texts)
        self._time("bound_s", started)
        over = np.flatnonzero((self.bound[rows] > self.max_length) & (self.tokens[rows] < 0))
        if len(over):
            started = time.time()
            messages = self.prompts.column("messages")
            turns = messages.take(self.p[rows[over]]).to_pylist()
            convs = [
                [*t, {"role": "assistant", "content": x}]
                for t, x in zip(turns, texts.take(over).to_pylist(), strict=True)
            ]
            self.tokens[rows[over]] = self.lengths.count(convs)
            self._time("tokenize_s", started)

    def fitted(
        self, rows: np.ndarray, turns: list, texts: list[str]
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """For selected rows: the text to write (cut to fit in truncate mode), its tokens (exact, or -1 when only
        bounded), whether it is kept, whether it was cut."""
        n = len(rows)
        keep, cut = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        if self.lengths is None or not n:
            return texts, np.full(n, -1, dtype=np.int64), keep, cut
        todo = rows[self.bound[rows] < 0]
        if len(todo):  # truncate mode (exclude mode measured every selected row already)
            order = np.argsort(todo)
            pos = np.flatnonzero(self.bound[rows] < 0)[order]
            self.measure(todo[order], pa.chunked_array([pa.array([texts[i] for i in pos], pa.string())]))
        tokens = self.tokens[rows].copy()
        over = np.flatnonzero(np.where(tokens >= 0, tokens, self.bound[rows]) > self.max_length)
        texts = list(texts)
        for i in over:
            fitted = (
                self.lengths.truncate(turns[i], texts[i], self.max_length)
                if self.cfg.build.over_length == "truncate"
                else None
            )
            if fitted is None:
                keep[i] = False
            else:
                texts[i], tokens[i] = fitted
                cut[i] = True
        return texts, tokens, keep, cut

    def _self_check(self, rows: np.ndarray, texts: pa.ChunkedArray) -> None:
        """The bound against exact counts on a seeded sample of the first rows measured, before it is trusted."""
        self.checked = True
        pick = np.sort(
            np.random.default_rng(self.cfg.seed).choice(len(rows), size=min(len(rows), SELF_CHECK), replace=False)
        )
        turns = self.prompts.column("messages").take(self.p[rows[pick]])
        self.lengths.self_check(turns, texts.take(pick).to_pylist(), self.log)

    def report(self) -> dict[str, Any]:
        if self.lengths is None:
            return {"max_length": None}
        return {
            "max_length": self.max_length,
            "over_length": self.cfg.build.over_length,
            "bound": ("byte-level BPE pairs" if self.lengths.merges is not None else "bytes")
            if self.lengths.trusted
            else "none (self-check failed)",
            "rounds": self.rounds,
            "bounded": int((self.bound >= 0).sum()),
            "tokenized": int((self.tokens >= 0).sum()),
            "excluded_too_long": int(self.too_long.sum()),
            "truncated": self.cut,
        }


def target_lengths(cfg: FusechatConfig) -> TargetLengths | None:
    """The target's tokenizer and chat template, as the trainers will see them (None without a length limit)."""
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
    return TargetLengths(tok)


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
    has_identical = {f: "identical_samples" in pq.read_schema(f).names for f in s_files}
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    total = sum(pq.read_metadata(f).num_rows for f in s_files)
    done = 0
    for file_no, f in enumerate(s_files):
        row_no = 0
        columns = list(sample_cols) + (["identical_samples"] if has_identical[f] else [])
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH, columns=columns):
            p, s, idx = _key_columns(batch, prompt_ids, sources, f, inputs["prompts"], add_sources=True, row0=row_no)
            parts["identical"].append(
                _bool(batch.column("identical_samples")) if has_identical[f] else np.zeros(batch.num_rows, dtype=bool)
            )
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
            "identical_samples": pa.array(sp["identical"], pa.bool_()),
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
    "too_long": "responses are longer than build.max_length in the target's tokens (or, for a prompt, the prompt alone)",
    "identical_samples": "each source repeated one text in all its samples of the prompt (samples manifest: "
    "identical_prompts; a seeding or chat-template problem)",
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
