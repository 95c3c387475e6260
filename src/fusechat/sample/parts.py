"""Per-source parts of a samples version: one source's answers to one prompts version, keyed by that source's own
settings and model identity, so that adding a source, or changing one, samples only that source.

A part lives in `samples/parts/<source>-<fingerprint>/`: `part.json` (what it is) and `data/` with one Parquet file
per finished chunk (`fusechat.shards.ChunkDir`: a file that exists is complete; `--shard` jobs fill it together). A
part is complete when every chunk of its plan exists. A samples version (`samples/vNNN/data/`) holds hard links to
the chunk files of its parts (copies where the filesystem has no hard links), so `score` and `build` read one folder
as before, and deleting an old version or part never touches another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat.config import SourceModel
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
        """Make the part's folder and `part.json` (once; concurrent jobs may both try)."""
        (self.path / "data").mkdir(parents=True, exist_ok=True)
        if not (self.path / "part.json").exists():
            write_json_atomic(self.path / "part.json", {"source": self.source, "fingerprint": self.fingerprint, **info})

    def reset(self) -> None:
        """Drop the part's files (`--force`); versions that link them keep their own links."""
        if self.path.exists():
            trash = self.path.with_name(f".trash-{self.path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(self.path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def open_part(store: RunStore, source: SourceModel, fingerprint: str, plan: list[tuple[str, list[int]]]) -> Part:
    root = store.stage_dir("samples") / PARTS
    return Part(source.name, fingerprint, root / f"{source.name}-{fingerprint[:16]}", plan)


def link_files(files: list[Path], data: Path) -> None:
    """Hard-link `files` into `data` (a copy where links are not possible); a file already there is kept."""
    data.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = data / f.name
        if target.exists():
            continue
        try:
            os.link(f, target)
        except FileExistsError:
            continue
        except OSError:
            tmp = data / f".{f.name}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copy2(f, tmp)
            os.replace(tmp, target)


def reused_from(store: RunStore, source: str, fingerprint: str) -> str | None:
    """The first complete samples version that already held this part, if any."""
    for v in store.versions("samples"):
        if (v.manifest.get("parts") or {}).get(source, {}).get("fingerprint") == fingerprint:
            return v.name
    return None


def incomplete_parts(store: RunStore) -> list[tuple[str, str]]:
    """(part folder, chunks done/planned) of every part not yet complete, for `fusechat status`."""
    root = store.stage_dir("samples") / PARTS
    found = []
    for path in sorted(root.glob("*/part.json")) if root.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        done = len(list((path.parent / "data").glob("*.parquet")))
        if done < info.get("chunks", 0):
            found.append((f"{PARTS}/{path.parent.name}", f"{done}/{info['chunks']}"))
    return found
