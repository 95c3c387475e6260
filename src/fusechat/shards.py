"""Chunked, resumable work inside a partial version (used by `sample` and `score`).

Work is cut into named chunks. Each finished chunk is one Parquet file under `data/`, written to a temporary
name and renamed, so a file that exists is complete: a re-run skips it, and a kill at any moment loses at most
the chunk in flight. `--shard I/N` takes every N-th chunk, so independent jobs (a Slurm array on a shared
filesystem) fill one version together without coordination; the version completes when every chunk exists.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.errors import UserError


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

    def write(self, key: str, table: pa.Table) -> None:
        final = self.path(key)
        tmp = self.data / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)

    def write_progress(self, **fields) -> None:
        tmp = self.root / f".progress.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(fields))
        os.replace(tmp, self.root / "progress.json")

    def clean_temps(self) -> None:
        """Drop temp files of chunks killed mid-write (only at commit: a live job may still be writing one)."""
        for p in self.data.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        (self.root / "progress.json").unlink(missing_ok=True)

    def read(self, keys: Iterable[str], columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(self.path(k), columns=columns) for k in keys]
        return pa.concat_tables(tables) if tables else pa.table({})
