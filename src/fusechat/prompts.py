"""`fusechat prompts`: ingest every configured prompt source into one versioned table.

Core (pure): `record_to_prompt` maps one raw record to its prompt turns (or a drop reason: excluded by a column,
empty, code or math by `fusechat.topics`), `record_to_row` to a prompts row; `assign_splits` splits the prompt ids
of one group into sft/dpo by ratio, deterministically from the seed; `fusechat.subset` draws a source's seeded
(stratified) sample. Shell: `run_prompts` streams each source through the sample into a spill file, then writes the
final Parquet with the split column, and `responses.parquet` with the answers of sources that map `fields.response`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusechat import subset, topics
from fusechat.code_prompts import OUTCOME_KEY, tests_for, with_code_tests
from fusechat.config import FieldMap, FusechatConfig, PromptSource
from fusechat.errors import UserError, first_line
from fusechat.store import RunStore, StageResult, Version, run_stage
from fusechat.subset import Reservoir
from fusechat.topics import topic_of

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("domain", pa.string()),
        ("split", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("reference", pa.string()),
        ("origin", pa.string()),
    ]
)
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "bot": "assistant",
}
RESPONSES_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("origin", pa.string()), ("response_index", pa.int32()), ("text", pa.string())]
)
ANSWERS_SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string())])  # a source's answers while it is read
RESPONSES_FILE = "responses.parquet"  # beside data/, in the version directory
WRITE_BATCH = 10_000
KEY, STRATUM = "__fusechat_key__", "__fusechat_stratum__"  # carried on a record between sampling and its row


# --------------------------------------------------------------------------------------------- pure core
def normalize_text(text: str) -> str:
    return " ".join(text.split())


def prompt_id(domain: str, messages: list[dict[str, str]]) -> str:
    """Stable across machines: a hash of the domain and the whitespace-normalised turns."""
    canon = json.dumps([[m["role"], normalize_text(m["content"])] for m in messages], ensure_ascii=False)
    return hashlib.sha256(f"{domain}\n{canon}".encode()).hexdigest()[:20]


def get_path(record: Any, dotted: str) -> Any:
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict):
            if part not in node:
                raise KeyError(dotted)
            node = node[part]
        elif isinstance(node, list | tuple) and part.lstrip("-").isdigit():
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def record_to_messages(record: dict[str, Any], fields: FieldMap) -> list[dict[str, str]]:
    """The prompt turns of a record: user/system turns, trailing assistant turns removed. Raises ValueError."""
    if fields.messages is not None:
        raw = get_path(record, fields.messages)
        if not isinstance(raw, list | tuple):
            raise ValueError(f"column {fields.messages!r} is not a list of messages")
        messages = []
        for m in raw:
            if not isinstance(m, dict):
                raise ValueError(f"column {fields.messages!r} holds a non-message item")
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role not in ROLE_ALIASES or not isinstance(content, str):
                raise ValueError(f"column {fields.messages!r}: message without a known role and text content")
            messages.append({"role": ROLE_ALIASES[role], "content": content})
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    else:
        columns = [fields.prompt] if isinstance(fields.prompt, str) else list(fields.prompt or [])
        parts = []
        for col in columns:
            value = get_path(record, col)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"column {col!r} is not text")
            if value.strip():
                parts.append(value.strip())
        messages = [{"role": "user", "content": "\n\n".join(parts)}]
        if fields.turn_markers:
            messages = split_turns(messages[0]["content"], fields.turn_markers)
    if fields.system is not None:
        system = get_path(record, fields.system)
        if isinstance(system, str) and system.strip():
            messages = [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
    return messages


def split_turns(text: str, markers: dict[str, str]) -> list[dict[str, str]]:
    """A text holding several turns, each after its role's marker (HelpSteer2: `{user turn 1}\\n<extra_id_1>Assistant
    \\n{assistant turn 1}\\n<extra_id_1>User\\n{user turn 2}`), as messages; the text before the first marker is a
    user turn. Trailing assistant turns are removed (the prompt is what the sources answer)."""
    role_of = {marker: role for role, marker in markers.items()}
    parts = re.split("(" + "|".join(map(re.escape, sorted(role_of, key=len, reverse=True))) + ")", text)
    turns = [("user", parts[0]), *zip((role_of[m] for m in parts[1::2]), parts[2::2], strict=True)]
    messages = [{"role": role, "content": content.strip()} for role, content in turns if content.strip()]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def record_to_prompt(record: dict[str, Any], source: PromptSource) -> list[dict[str, str]] | str:
    """A record's prompt turns, or why it is dropped: "excluded" (a value listed in `exclude`), "empty", "code" or
    "math" (`exclude_topics`, by `fusechat.topics`). Raises ValueError / KeyError for a record that does not fit the
    field mapping."""
    for column, values in source.exclude.items():
        if get_path(record, column) in values:
            return "excluded"
    messages = record_to_messages(record, source.fields)
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return "empty"
    if source.exclude_topics:
        topic = topic_of(messages, source.exclude_topics)
        if topic is not None:
            return topic
    return messages


def record_to_row(record: dict[str, Any], source: PromptSource) -> dict[str, Any] | str:
    """A prompts row (without `split`), or the reason the record is dropped (those of `record_to_prompt`, and for
    `code_tests` sources the reasons of `fusechat.code_tests.DROP_REASONS`). A record that does not fit the field
    mapping raises ValueError / KeyError."""
    messages = record_to_prompt(record, source)
    if isinstance(messages, str):
        return messages
    reference = {}
    for key in ("answer", "tests"):
        col = getattr(source.fields, key)
        if col is not None:
            value = get_path(record, col)
            if value is not None:
                reference[key] = value
    if source.code_tests is not None:
        tests = record.get(OUTCOME_KEY) or tests_for(record, source, messages[-1]["content"])
        if isinstance(tests, str):
            return tests
        reference["tests"] = tests.tests
        if source.code_tests.function_hint and not all(m in messages[-1]["content"] for m in tests.mentions):
            messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{tests.hint}"}
    return {
        "prompt_id": prompt_id(source.domain, messages),
        "domain": source.domain,
        "messages": messages,
        "reference": json.dumps(reference, ensure_ascii=False, default=str) if reference else None,
        "origin": source.name,
    }


def assign_splits(ids: list[str], sft_ratio: float, seed: int) -> dict[str, str]:
    """Exactly round(ratio * n) ids go to sft: those ranking first by a seeded hash. Independent of input order
    and of the machine."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_sft = round(sft_ratio * len(ranked))
    return {pid: ("sft" if rank < n_sft else "dpo") for rank, pid in enumerate(ranked)}


# --------------------------------------------------------------------------------------------- reading sources
def iter_records(source: PromptSource, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for every record of a source, streamed. `location` names the file and line/row."""
    path = Path(source.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix == ".parquet":
            yield from _iter_parquet(path)
        else:
            raise UserError(f"{where}.path: {path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet)")
    elif path.is_dir():
        yield from _iter_dataset_dir(path, source, where)
    elif source.path.endswith((".jsonl", ".json", ".parquet")) or source.path.startswith((".", "/", "~")):
        raise UserError(f"{where}.path: {source.path}: file not found")
    else:
        yield from _iter_hub(source, where)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _utf8(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            yield f"{path}:{lineno}", record


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(_utf8(path.read_bytes(), str(path)))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"{path}: row {i}: expected a JSON object")
        yield f"{path}: row {i}", record


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: row {row}: unreadable Parquet data ({first_line(e)})") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def _iter_dataset_dir(path: Path, source: PromptSource, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise UserError(f"{where}.split: {path} has no split {source.split!r} (has {', '.join(ds)})")
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(str(path), source.subset, split=source.split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        raise UserError(f"{where}.path: cannot load dataset directory {path}: {first_line(e)}") from None
    for i, record in enumerate(ds):
        yield f"{path}: row {i}", record


def _iter_hub(source: PromptSource, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.path, source.subset, split=source.split, revision=source.revision, streaming=True
        )
        it = iter(ds)
        first = next(it, None)
    except Exception as e:
        raise UserError(
            f"{where} ({source.name}): cannot load hub dataset {source.path!r} (offline, or not found): {first_line(e)}"
        ) from None
    if first is None:
        return
    yield f"{source.path}: row 0", first
    for i, record in enumerate(it, 1):
        yield f"{source.path}: row {i}", record


def source_identity(source: PromptSource) -> dict[str, Any]:
    """What the fingerprint must see of a source's data: a content hash for local files, the id and revision
    for hub datasets (the hub revision pins content)."""
    path = Path(source.path).expanduser()
    if path.is_file():
        return {"sha256": _file_sha256(path)}
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(_file_sha256(f).encode())
        return {"sha256": h.hexdigest()}
    return {"hub": source.path, "revision": source.revision}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- shell
def stage_config(cfg: FusechatConfig) -> dict[str, Any]:
    config = {
        "seed": cfg.seed,
        "prompts": cfg.prompts.model_dump(mode="json"),
        "data": {s.name: source_identity(s) for s in cfg.prompts.sources},
        "rules": {"subset": subset.VERSION, "topics": topics.VERSION},
    }
    if any(s.code_tests is not None for s in cfg.prompts.sources):
        from fusechat.code_prompts import identity

        config["code_tests"] = identity(cfg.score.code)
    return config


def run_prompts(
    cfg: FusechatConfig,
    store: RunStore,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int], None] | None = None,
) -> Version:
    if not cfg.prompts.sources:
        raise UserError("prompts.sources: empty; list at least one prompt dataset")

    def body(out: Path) -> StageResult:
        return build_prompts(cfg, out, progress=progress)

    version = run_stage(store, "prompts", stage_config(cfg), {}, body, force=force, log=log)
    assert version is not None
    for name, counts in version.manifest["counts"].get("by_source", {}).items():
        if not counts.get("kept"):
            drops = ", ".join(
                f"{k.removeprefix('dropped_')}={v}" for k, v in counts.items() if k.startswith("dropped_")
            )
            log(f"WARNING: prompt source {name!r} kept no prompts of {counts.get('read', 0)} read ({drops or 'none'})")
    return version


def build_prompts(cfg: FusechatConfig, out: Path, progress: Callable[[str, int], None] | None = None) -> StageResult:
    started = time.time()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    spill_path = out / "spill.parquet"
    spill_schema = PROMPTS_SCHEMA.remove(PROMPTS_SCHEMA.get_field_index("split"))
    written: set[str] = set()
    groups: dict[tuple[str, float], list[str]] = defaultdict(list)
    per_source: dict[str, Counter] = {}
    strata: dict[str, dict[str, dict[str, int]]] = {}
    with_responses = any(s.fields.response for s in cfg.prompts.sources)
    responses = pq.ParquetWriter(out / RESPONSES_FILE, RESPONSES_SCHEMA) if with_responses else None
    try:
        with pq.ParquetWriter(spill_path, spill_schema) as spill:
            for i, source in enumerate(cfg.prompts.sources):
                counts: Counter = Counter()
                per_source[source.name] = counts
                group = (source.domain, cfg.prompts.ratio_for(source))
                sampled = sample_source(cfg, i, out, counts, written, progress)
                if not counts["read"]:
                    raise UserError(
                        f"prompts.sources[{i}].path: {source.path}: no records (an empty file or dataset split)"
                    )
                if source.stratify is not None:
                    strata[source.name] = sampled.strata
                key_to_id: dict[str, str] = {}
                late_duplicates = 0
                for batch in sampled.rows():
                    keep = []
                    for key, row in zip(
                        batch.column("key").to_pylist(), batch.drop_columns(["key"]).to_pylist(), strict=True
                    ):
                        if row["prompt_id"] in written:  # the same prompt came from an earlier source
                            counts["dropped_duplicate"] += 1
                            late_duplicates += 1
                            continue
                        written.add(row["prompt_id"])
                        groups[group].append(row["prompt_id"])
                        key_to_id[key] = row["prompt_id"]
                        keep.append(row)
                    counts["kept"] += len(keep)
                    spill.write_table(pa.Table.from_pylist(keep, schema=spill_schema))
                if source.limit is not None:
                    offered = sum(v["available"] for v in sampled.strata.values())
                    over = offered - counts["kept"] - late_duplicates - sum(counts[k] for k in sampled.late_drops)
                    if over:
                        counts["dropped_over_limit"] = over
                if responses is not None and source.fields.response:
                    counts["responses"] = sampled.write_responses(responses, key_to_id, source, cfg.seed)
                sampled.close()
    finally:
        if responses is not None:
            responses.close()

    split_of: dict[str, str] = {}
    for (_, ratio), ids in groups.items():
        split_of.update(assign_splits(ids, ratio, cfg.seed))

    by_domain: dict[str, Counter] = defaultdict(Counter)
    with pq.ParquetWriter(data / "prompts.parquet", PROMPTS_SCHEMA) as writer:
        for batch in pq.ParquetFile(spill_path).iter_batches(batch_size=WRITE_BATCH):
            ids = batch.column("prompt_id").to_pylist()
            splits = [split_of[pid] for pid in ids]
            for dom, sp in zip(batch.column("domain").to_pylist(), splits, strict=True):
                by_domain[dom][sp] += 1
            table = pa.Table.from_batches([batch]).append_column("split", pa.array(splits, pa.string()))
            writer.write_table(table.select(PROMPTS_SCHEMA.names).cast(PROMPTS_SCHEMA))
    spill_path.unlink()

    total = sum(sum(c.values()) for c in by_domain.values())
    if not total:
        drops = "; ".join(
            f"{name}: " + ", ".join(f"{k.removeprefix('dropped_')}={v}" for k, v in c.items() if k != "read")
            for name, c in per_source.items()
        )
        raise UserError(f"prompts.sources: no prompt kept from any source ({drops})")
    counts_out: dict[str, Any] = {
        "prompts": total,
        "by_domain": {d: dict(c) for d, c in sorted(by_domain.items())},
        "by_source": {s: {"read": c["read"], "kept": c["kept"], **c} for s, c in per_source.items()},
    }
    if strata:
        counts_out["strata"] = strata
    return StageResult(counts=counts_out, timings={"ingest_s": round(time.time() - started, 3)})


class SampledSource:
    """One source after `sample_source`: its candidates' rows (and answers) in spill files, the sample's row
    numbers, and per stratum the distinct prompts available and kept."""

    def __init__(self, candidates: Path, answers: Path | None, rows: list[int], strata: dict, late_drops: set[str]):
        self.candidates, self.answers = candidates, answers
        self.selected = np.asarray(rows, dtype=np.int64)
        self.strata = strata
        self.late_drops = late_drops  # drop reasons counted after the sample's first cut (code tests)

    def rows(self) -> Iterator[pa.Table]:
        """The sampled rows (with their sampling `key`), in read order, a batch at a time."""
        start = 0
        for batch in pq.ParquetFile(self.candidates).iter_batches(batch_size=WRITE_BATCH):
            local = self.selected[(self.selected >= start) & (self.selected < start + batch.num_rows)] - start
            start += batch.num_rows
            if len(local):
                yield pa.Table.from_batches([batch]).take(local)

    def write_responses(self, writer: pq.ParquetWriter, key_to_id: dict[str, str], source: PromptSource, seed: int):
        """The sampled prompts' answers: distinct texts, at most `max_responses` per prompt, in a seeded order that
        does not depend on the file's. Returns how many were written."""
        texts: dict[str, set[str]] = defaultdict(set)
        if self.answers is not None:
            wanted = pa.array(list(key_to_id), pa.string())
            for batch in pq.ParquetFile(self.answers).iter_batches(batch_size=WRITE_BATCH):
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.is_in(table.column("key"), value_set=wanted))
                for key, text in zip(table.column("key").to_pylist(), table.column("text").to_pylist(), strict=True):
                    texts[key].add(text)
        rows = []
        for key, pid in key_to_id.items():
            ranked = sorted(texts.get(key, ()), key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).digest())
            rows.extend(
                {"prompt_id": pid, "origin": source.name, "response_index": j, "text": text}
                for j, text in enumerate(ranked[: source.max_responses])
            )
        for start in range(0, len(rows), WRITE_BATCH):
            writer.write_table(pa.Table.from_pylist(rows[start : start + WRITE_BATCH], schema=RESPONSES_SCHEMA))
        return len(rows)

    def close(self) -> None:
        self.candidates.unlink(missing_ok=True)
        if self.answers is not None:
            self.answers.unlink(missing_ok=True)


def sample_source(
    cfg: FusechatConfig,
    i: int,
    out: Path,
    counts: Counter,
    earlier: set[str],
    progress: Callable[[str, int], None] | None,
) -> SampledSource:
    """Stream source `i` through its seeded sample (`fusechat.subset`): rows are mapped, excluded, deduplicated and
    ranked first; only a row that may still be in the sample is tested (code) and spilled, with its answers when the
    source maps `fields.response`. `earlier`: prompt ids of the sources before it (their duplicates are dropped)."""
    source = cfg.prompts.sources[i]
    where = f"prompts.sources[{i}]"
    reservoir = Reservoir(source.limit, cfg.seed)
    seen: set[str] = set()
    schema = PROMPTS_SCHEMA.remove(PROMPTS_SCHEMA.get_field_index("split")).append(pa.field("key", pa.string()))
    answers_path = out / f"answers-{i}.parquet" if source.fields.response else None
    answers = pq.ParquetWriter(answers_path, ANSWERS_SCHEMA) if answers_path else None
    answer_buffer: list[dict[str, str]] = []

    def keep_answer(key: str, record: dict[str, Any]) -> None:
        text = get_path(record, source.fields.response)
        if text is not None and not isinstance(text, str):
            raise ValueError(f"column {source.fields.response!r} (fields.response) is not text")
        if text and text.strip():
            answer_buffer.append({"key": key, "text": text})
        if len(answer_buffer) >= WRITE_BATCH:
            answers.write_table(pa.Table.from_pylist(answer_buffer, schema=ANSWERS_SCHEMA))
            answer_buffer.clear()

    def candidates() -> Iterator[tuple[str, dict[str, Any]]]:
        for location, record in iter_records(source, where):
            counts["read"] += 1
            if progress and counts["read"] % 1000 == 0:
                progress(source.name, counts["read"])
            mapped = "fields"
            try:
                messages = record_to_prompt(record, source)
                if isinstance(messages, str):
                    counts[f"dropped_{messages}"] += 1
                    continue
                key = prompt_id(source.domain, messages)
                if key in earlier:
                    counts["dropped_duplicate"] += 1
                    continue
                if key in seen:
                    if answers is None:
                        counts["dropped_duplicate"] += 1
                    else:  # another answer to a prompt already read (OpenMathInstruct-2: one row per solution)
                        counts["more_responses"] += 1
                        if key in reservoir.live:
                            keep_answer(key, record)
                    continue
                seen.add(key)
                mapped = "stratify"
                stratum = _stratum(record, source)
                mapped = "fields"
                if not reservoir.offer(key, stratum):
                    continue
                if answers is not None:
                    keep_answer(key, record)
            except KeyError as e:
                raise UserError(f"{location}: missing field {e.args[0]!r} (mapped by {where}.{mapped})") from None
            except ValueError as e:
                raise UserError(f"{location}: {e}") from None
            yield location, {**record, KEY: key, STRATUM: stratum}

    n_rows, buffer = 0, []
    late: set[str] = set()
    candidates_path = out / f"candidates-{i}.parquet"
    with pq.ParquetWriter(candidates_path, schema) as spill:
        for location, record in with_code_tests(candidates(), source, cfg.score.code, where):
            key, stratum = record[KEY], record[STRATUM]
            try:
                row = record_to_row(record, source)
            except KeyError as e:
                raise UserError(f"{location}: missing field {e.args[0]!r} (mapped by {where}.fields)") from None
            except ValueError as e:
                raise UserError(f"{location}: {e}") from None
            if isinstance(row, str):
                counts[f"dropped_{row}"] += 1
                late.add(f"dropped_{row}")
                reservoir.reject(key)
                continue
            buffer.append({**row, "key": key})
            reservoir.add(key, stratum, n_rows)
            n_rows += 1
            if len(buffer) >= WRITE_BATCH:
                spill.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer.clear()
        if buffer:
            spill.write_table(pa.Table.from_pylist(buffer, schema=schema))
    if answers is not None:
        if answer_buffer:
            answers.write_table(pa.Table.from_pylist(answer_buffer, schema=ANSWERS_SCHEMA))
        answers.close()
    if progress:
        progress(source.name, counts["read"])
    rows, strata = reservoir.sample()
    return SampledSource(candidates_path, answers_path, rows, strata, late)


def _stratum(record: dict[str, Any], source: PromptSource) -> str | None:
    if source.stratify is None:
        return None
    value = get_path(record, source.stratify)
    return value if isinstance(value, str) else json.dumps(value, default=str)


def read_responses(version: Version) -> pa.Table | None:
    """The answers kept from sources that map `fields.response` (None when no source does)."""
    path = version.path / RESPONSES_FILE
    return pq.read_table(path) if path.exists() else None


def read_prompts(version: Version, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(version.data / "prompts.parquet", columns=columns)
