"""Scores follow the samples' per-source parts, so that a source added to (or changed in) a samples version is the
only one scored again.

A samples version made of parts (`fusechat.sample.parts`) holds one file per chunk of each part; its scores are cut
per file (`shard_size` rows at a time) and each score chunk is named after what it scores: the part's fingerprint,
the samples file, the range (`<part>-<file>-<n>`). A scores version made with the same scoring settings (the stage's
config: reward model identity, routes, verifiers, shard size) that already holds a chunk of that name scored exactly
those rows of those prompts (the part's fingerprint covers the prompts version), so the chunk is hard-linked instead
of scored, once it matches its version's manifest (size and rows: a damaged one is scored again); like any chunk
found done, it is then checked for the rows of its range (`score_chunks`). Samples versions without parts (made by
hand) are cut in row ranges of the whole version, as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fusechat.shards import ChunkDir, chunk_ranges
from fusechat.store import RunStore, Version, file_problem


def chunk_plan(samples: Version, files: list, starts: list[int], total: int, shard_size: int):
    """(row ranges, chunk keys) over the samples version's rows (files in sorted order, `starts` their first rows)."""
    parts = samples.manifest.get("parts") or {}
    owner = {}
    for f in files:
        for source, part in parts.items():
            if re.fullmatch(rf"{re.escape(source)}-\d+", f.stem):
                owner[f] = part["fingerprint"][:12]
    if not parts or len(owner) < len(files):
        ranges = chunk_ranges(total, shard_size) or [(0, 0)]
        return ranges, [f"chunk-{i:06d}" for i in range(len(ranges))]
    ranges, keys = [], []
    bounds = [*starts[1:], total]
    for f, start, end in zip(files, starts, bounds, strict=True):
        for j, (lo, hi) in enumerate(chunk_ranges(end - start, shard_size)):
            ranges.append((start + lo, start + hi))
            keys.append(f"{owner[f]}-{f.stem}-{j:04d}")
    return ranges, keys


def reuse_scored(store: RunStore, config: Any, keys: list[str], chunks: ChunkDir, log: Callable[[str], None]) -> int:
    """Link the chunks that a scores version with the same settings already holds; returns how many."""
    from fusechat.sample.parts import link_files

    if not keys or keys[0].startswith("chunk-"):
        return 0
    same = json.loads(json.dumps(config, default=str))
    donors = [v for v in store.versions("scores") if v.manifest.get("config") == same]
    found, origin = [], set()
    for key in keys:
        if chunks.done(key):
            continue
        for v in reversed(donors):
            f = v.data / f"{key}.parquet"
            files = v.manifest.get("files")  # None: a version made before manifests listed files
            if f.exists() and (
                files is None or file_problem(f, files.get(f"data/{key}.parquet", {"bytes": -1})) is None
            ):
                found.append(f)
                origin.add(v.ref)
                break
    if found:
        link_files(found, chunks.data)
        log(f"scores: {len(found)} of {len(keys)} chunks cached from {', '.join(sorted(origin))}")
    return len(found)
