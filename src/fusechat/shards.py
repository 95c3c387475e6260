"""Chunked, resumable work inside a partial version (used by `sample` and `score`).

Work is cut into named chunks. Each finished chunk is one Parquet file under `data/`, written to a temporary
name, fsynced and renamed, so a file that exists is complete: a re-run skips it, and a kill at any moment loses
at most the chunk in flight. A re-run first checks the chunks it finds (`drop_broken`: readable, the rows they
should hold), so one damaged by a power loss or a full disk is redone, with a warning, instead of crashing the
run or the stages after it. `--shard I/N` takes every N-th chunk, so independent jobs (a Slurm array on a
shared filesystem) fill one version together without coordination; the version completes when every chunk exists.

Data files hold only what the run computed (same inputs and seed, same bytes); how long a chunk took and which
process ran it go to a side file (`.timings/<chunk>.json`), summed into the manifest at commit and then removed.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.errors import UserError, first_line
from fusechat.store import fsync_dir, fsync_file


@dataclass(frozen=True)
class ShardSpec:
    """`--shard I/N`: this job does chunk c when c % N == I - 1."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> ShardSpec:
        if not text:
            return cls()
        i, sep, n = text.partition("/")
        try:
            spec = cls(int(i), int(n))
        except ValueError:
            spec = None
        if not sep or spec is None or not 1 <= spec.index <= spec.count:
            raise UserError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/8")
        return spec

    def owns(self, chunk_number: int) -> bool:
        return chunk_number % self.count == self.index - 1


def chunk_ranges(n_items: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, n_items)) for start in range(0, n_items, chunk_size)]


class ChunkDir:
    """The `data/` folder of a partial version, one Parquet file per finished chunk."""

    def __init__(self, partial: Path):
        self.root = partial
        self.data = partial / "data"
        self.data.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.data / f"{key}.parquet"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def finished(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.done(k)]

    def write(self, key: str, table: pa.Table, timings: dict[str, Any] | None = None) -> None:
        """The chunk's file, durably (temp file, fsync, rename, fsync of the folder); then its timings beside it,
        best effort (they are not data: a full disk fails on the chunk, not on them)."""
        final = self.path(key)
        tmp = self.data / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            pq.write_table(table, tmp)
            fsync_file(tmp)
            os.replace(tmp, final)
        except OSError as e:  # e.g. a full disk: name the chunk (pyarrow's error does not)
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror or str(e), str(final)) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.data)
        if timings is not None:
            side = self.root / ".timings"
            tmp = side / f".{key}.{uuid.uuid4().hex[:8]}"
            try:
                side.mkdir(exist_ok=True)
                tmp.write_text(json.dumps(timings))
                os.replace(tmp, side / f"{key}.json")
            except OSError:
                tmp.unlink(missing_ok=True)

    def timings(self, key: str) -> dict[str, Any]:
        """What `write` recorded beside the chunk (empty for a chunk written by a version before it did)."""
        try:
            return json.loads((self.root / ".timings" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return {}

    def drop_broken(
        self, keys: Iterable[str], expected: Callable[[str, pq.FileMetaData], str | None], log: Callable[[str], None]
    ) -> list[str]:
        """Check the finished chunks among `keys`: each must be a readable Parquet file and satisfy `expected`
        (which returns what is wrong with its metadata, e.g. a row count, or None). A broken chunk is removed, with
        one line each, so that the run redoes it. Returns the keys removed."""
        removed = []
        for key in keys:
            path = self.path(key)
            if not path.exists():
                continue
            try:
                problem = expected(key, pq.read_metadata(path))
            except Exception as e:  # pyarrow: ArrowInvalid for a truncated or zero-byte file, OSError, ...
                problem = f"unreadable ({type(e).__name__}: {first_line(e)[:80]})"
            if problem:
                log(f"WARNING: chunk {path}: {problem}; redoing it")
                path.unlink(missing_ok=True)
                removed.append(key)
        return removed

    def write_progress(self, **fields) -> None:
        """`progress.json`, for `fusechat status`; best effort (a full disk fails on a chunk, not on this)."""
        tmp = self.root / f".progress.{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(json.dumps(fields))
            os.replace(tmp, self.root / "progress.json")
        except OSError:
            tmp.unlink(missing_ok=True)

    def clean_temps(self) -> None:
        """Drop temp files of chunks killed mid-write (only at commit: a live job may still be writing one); the
        timings side files go at commit, once summed."""
        for p in self.data.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        (self.root / "progress.json").unlink(missing_ok=True)

    def read(self, keys: Iterable[str], columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(self.path(k), columns=columns) for k in keys]
        return pa.concat_tables(tables) if tables else pa.table({})
