"""Per-source parts of a samples version: one source's answers to one prompts version, keyed by that source's own
settings and model identity, so that adding a source, or changing one, samples only that source.

A part lives in `samples/parts/<source>-<fingerprint>/`: `part.json` (what it is) and `data/` with one Parquet file
per finished chunk (`fusechat.shards.ChunkDir`: written durably, so a file that exists is complete, and checked
before a run trusts it; `--shard` jobs fill it together). A part is complete when every chunk of its plan exists. A
job filling a part holds a shared lock on it (`RunStore.using`), so `--force` and `fusechat clean` leave it alone. A
samples version (`samples/vNNN/data/`) holds hard links to the chunk files of its parts (copies where the filesystem
has no hard links), listed with their sizes and rows in its manifest, so `score` and `build` read one folder as
before, and deleting an old version or part never touches another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat.config import SourceModel
from fusechat.errors import UserError
from fusechat.shards import ChunkDir
from fusechat.store import RunStore, Version, model_identity, write_json_atomic

FORMAT = 1  # bump when a part's content for the same settings changes (e.g. the rows a chunk holds)
PARTS = "parts"


def part_fingerprint(source: SourceModel, seed: int, prompts: Version) -> str:
    """What decides one source's samples: its settings, its weights (file sizes and times, or the hub id), the seed,
    and the prompts version. Other sources do not enter."""
    payload = {
        "format": FORMAT,
        "prompts": prompts.fingerprint,
        "seed": seed,
        "source": source.model_dump(mode="json"),
        "model": model_identity(source.model) if source.model else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Part:
    source: str
    fingerprint: str
    path: Path
    plan: list[tuple[str, list[int]]]  # (chunk key, prompt row numbers)

    @property
    def ref(self) -> str:
        return f"samples/{PARTS}/{self.path.name}"

    @property
    def chunks(self) -> ChunkDir:
        return ChunkDir(self.path)

    def keys(self) -> list[str]:
        return [key for key, _ in self.plan]

    def done(self) -> list[str]:
        data = self.path / "data"
        return [k for k in self.keys() if (data / f"{k}.parquet").exists()]

    def complete(self) -> bool:
        return len(self.done()) == len(self.plan)

    def files(self) -> list[Path]:
        return [self.path / "data" / f"{k}.parquet" for k in self.keys()]

    def create(self, info: dict[str, Any]) -> None:
        """Make the part's folder and `part.json` (once, durably; concurrent jobs may both try)."""
        (self.path / "data").mkdir(parents=True, exist_ok=True)
        if read_info(self.path) is None:
            info = {"source": self.source, "fingerprint": self.fingerprint, **info}
            write_json_atomic(self.path / "part.json", info, durable=True)

    def reset(self, store: RunStore, log: Callable[[str], None]) -> None:
        """Drop the part's files (`--force`), unless a live job fills it; versions that link them keep their own
        links."""
        if not self.path.is_dir():
            return
        if not store.discard(self.path):
            holder = store.busy(self.path) or "another process"
            raise UserError(f"--force: {self.ref} is in use by {holder}; wait for it or stop it")
        log(f"--force: removed {self.ref}")


def open_part(store: RunStore, source: SourceModel, fingerprint: str, plan: list[tuple[str, list[int]]]) -> Part:
    root = store.stage_dir("samples") / PARTS
    return Part(source.name, fingerprint, root / f"{source.name}-{fingerprint[:16]}", plan)


def link_files(files: list[Path], data: Path) -> None:
    """Hard-link `files` into `data` (a copy where links are not possible). A file already there is kept when it is
    that file (or its copy); another one (a link to a chunk since redone) is replaced."""
    data.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = data / f.name
        if target.exists() and _same(f, target):
            continue
        tmp = data / f".{f.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copy2(f, tmp)
        os.replace(tmp, target)


def _same(a: Path, b: Path) -> bool:
    """The same file (a hard link), or its copy (copy2 keeps the size and modification time)."""
    sa, sb = a.stat(), b.stat()
    same_file = (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return same_file or (sa.st_size, sa.st_mtime_ns) == (sb.st_size, sb.st_mtime_ns)


def reused_from(store: RunStore, source: str, fingerprint: str) -> str | None:
    """The first complete samples version that already held this part, if any."""
    for v in store.versions("samples"):
        if (v.manifest.get("parts") or {}).get(source, {}).get("fingerprint") == fingerprint:
            return v.name
    return None


def read_info(path: Path) -> dict[str, Any] | None:
    """A part folder's `part.json`, or None when it is missing or damaged."""
    try:
        info = json.loads((path / "part.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def incomplete_parts(store: RunStore) -> list[tuple[Path, str]]:
    """(part folder, chunks done/planned) of every part not yet complete (a job fills it, or one stopped half way),
    for `fusechat status` and `fusechat clean`. A folder without a readable `part.json` counts as incomplete."""
    root = store.stage_dir("samples") / PARTS
    found = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []:
        info = read_info(path)
        done = len(list((path / "data").glob("*.parquet")))
        if info is None:
            found.append((path, f"{done}/? (no part.json)"))
        elif done < info.get("chunks", 0):
            found.append((path, f"{done}/{info['chunks']}"))
    return found
