"""`fusechat prompts`: ingest every configured prompt source into one versioned table.

Core (pure): `record_to_row` maps one raw record to a prompts row (or a drop reason); `assign_splits` splits the
prompt ids of one group into sft/dpo by ratio, deterministically from the seed. Shell: `run_prompts` streams the
sources, writes a spill file, then the final Parquet with the split column.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.code_prompts import OUTCOME_KEY, tests_for, with_code_tests
from fusechat.config import FieldMap, FusechatConfig, PromptSource
from fusechat.errors import UserError, first_line
from fusechat.store import RunStore, StageResult, Version, run_stage

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
WRITE_BATCH = 10_000


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
    if fields.system is not None:
        system = get_path(record, fields.system)
        if isinstance(system, str) and system.strip():
            messages = [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]
    return messages


def record_to_row(record: dict[str, Any], source: PromptSource) -> dict[str, Any] | str:
    """A prompts row (without `split`), or the reason the record is dropped ("empty", "excluded", and for
    `code_tests` sources the reasons of `fusechat.code_tests.DROP_REASONS`). A record that does not fit the field
    mapping raises ValueError / KeyError."""
    for column, values in source.exclude.items():
        if get_path(record, column) in values:
            return "excluded"
    messages = record_to_messages(record, source.fields)
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return "empty"
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
    seen: set[str] = set()
    groups: dict[tuple[str, float], list[str]] = defaultdict(list)
    per_source: dict[str, Counter] = {}
    buffer: list[dict[str, Any]] = []

    with pq.ParquetWriter(spill_path, spill_schema) as spill:
        for i, source in enumerate(cfg.prompts.sources):
            where = f"prompts.sources[{i}]"
            counts: Counter = Counter()
            per_source[source.name] = counts
            group = (source.domain, cfg.prompts.ratio_for(source))
            for location, record in with_code_tests(iter_records(source, where), source, cfg.score.code, where):
                counts["read"] += 1
                try:
                    row = record_to_row(record, source)
                except KeyError as e:
                    raise UserError(f"{location}: missing field {e.args[0]!r} (mapped by {where}.fields)") from None
                except ValueError as e:
                    raise UserError(f"{location}: {e}") from None
                if isinstance(row, str):
                    counts[f"dropped_{row}"] += 1
                    continue
                if row["prompt_id"] in seen:
                    counts["dropped_duplicate"] += 1
                    continue
                seen.add(row["prompt_id"])
                groups[group].append(row["prompt_id"])
                buffer.append(row)
                counts["kept"] += 1
                if len(buffer) >= WRITE_BATCH:
                    spill.write_table(pa.Table.from_pylist(buffer, schema=spill_schema))
                    buffer.clear()
                if progress and counts["read"] % 1000 == 0:
                    progress(source.name, counts["read"])
                if source.limit is not None and counts["kept"] >= source.limit:
                    break
            if progress:
                progress(source.name, counts["read"])
            if not counts["read"]:
                raise UserError(f"{where}.path: {source.path}: no records (an empty file or dataset split)")
        if buffer:
            spill.write_table(pa.Table.from_pylist(buffer, schema=spill_schema))

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
    return StageResult(
        counts={
            "prompts": total,
            "by_domain": {d: dict(c) for d, c in sorted(by_domain.items())},
            "by_source": {s: dict(c) for s, c in per_source.items()},
        },
        timings={"ingest_s": round(time.time() - started, 3)},
    )


def read_prompts(version: Version, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(version.data / "prompts.parquet", columns=columns)
