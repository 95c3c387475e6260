"""Versioned stage directories: `<workdir>/<run>/<stage>/vNNN/` with `manifest.json` and `data/`.

A version is built in a hidden partial directory and renamed to `vNNN` only when complete, under a lock, so a
listed version is always complete and two writers never get the same number. Resumable stages (sample, score)
key their partial directory by fingerprint: a re-run, or another machine working on other shards, finds it and
continues. A stage whose fingerprint matches a complete version is a cache hit and does no work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fusechat import __version__
from fusechat.errors import UserError

# Directory name of each stage's versions. The CLI verbs differ for three of them (sample, score, build).
STAGES = ("prompts", "samples", "scores", "datasets", "sft", "dpo", "eval")
# Bump when the on-disk format of any stage changes: old versions then no longer match as cache hits.
STORE_FORMAT = 1
VERSION_RE = re.compile(r"^v(\d{3,})$")


def fingerprint(stage: str, config: Any, inputs: dict[str, Version]) -> str:
    payload = {
        "stage": stage,
        "format": STORE_FORMAT,
        "config": config,
        "inputs": {name: v.fingerprint for name, v in sorted(inputs.items())},
    }
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def model_identity(path_or_id: str) -> dict[str, Any]:
    """What a fingerprint must see of a model: for a local directory, every file's name, size and mtime (cheap
    even for 140 GB of weights, and it changes when the model is rebuilt in place); for a hub id, the id."""
    p = Path(path_or_id).expanduser()
    if not p.exists():
        return {"id": path_or_id}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {"path": str(p), "files": h.hexdigest()[:16]}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Version:
    stage: str
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.name}"


@dataclass
class StageResult:
    """What a stage body returns. `complete=False` leaves the partial version for a later run (shards missing)."""

    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = True


class RunStore:
    """All stage versions of one run (`<workdir>/<name>`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.root / stage

    # ------------------------------------------------------------------ reading
    def versions(self, stage: str) -> list[Version]:
        """Complete versions, oldest first."""
        d = self.stage_dir(stage)
        if not d.is_dir():
            return []
        found = []
        for p in d.iterdir():
            m = VERSION_RE.match(p.name)
            if not m or not p.is_dir():
                continue
            manifest = _read_manifest(p)
            if manifest is not None and manifest.get("status") == "complete":
                found.append((int(m.group(1)), Version(stage, p.name, p, manifest)))
        return [v for _, v in sorted(found, key=lambda t: t[0])]

    def partials(self, stage: str) -> list[Path]:
        d = self.stage_dir(stage)
        return sorted(p for p in d.iterdir() if p.name.startswith((".partial-", ".tmp-"))) if d.is_dir() else []

    def latest(self, stage: str) -> Version | None:
        vs = self.versions(stage)
        return vs[-1] if vs else None

    def find(self, stage: str, fp: str) -> Version | None:
        for v in reversed(self.versions(stage)):
            if v.fingerprint == fp:
                return v
        return None

    def resolve(self, stage: str, pinned: str | None = None) -> Version:
        """The pinned version (`v003` or `3`), else the latest complete one; a clear error otherwise."""
        if pinned:
            name = pinned if pinned.startswith("v") else f"v{int(pinned):03d}" if pinned.isdigit() else pinned
            for v in self.versions(stage):
                if v.name == name:
                    return v
            p = self.stage_dir(stage) / name
            state = "is incomplete" if p.is_dir() else "does not exist"
            raise UserError(f"--input {stage}={pinned}: {p} {state}")
        v = self.latest(stage)
        if v is None:
            raise UserError(f"no complete {stage} version in {self.root}; run the stage that makes it first")
        return v

    # ------------------------------------------------------------------ writing
    def partial_dir(self, stage: str, fp: str | None) -> Path:
        """A shared, resumable partial directory for `fp`, or a private temporary one."""
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        if fp is not None:
            p = d / f".partial-{fp[:16]}"
            p.mkdir(exist_ok=True)
            return p
        self._remove_dead_temps(d)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{socket.gethostname()}-{os.getpid()}-", dir=d))

    def commit(self, stage: str, partial: Path, manifest: dict[str, Any]) -> Version:
        """Rename `partial` to the next free `vNNN`, with its manifest. If another process already committed this
        partial directory (shard jobs finishing together), return that version."""
        d = self.stage_dir(stage)
        with _locked(d / ".lock"):
            if not partial.exists():
                done = self.find(stage, manifest["fingerprint"])
                if done is None:
                    raise RuntimeError(f"{partial} vanished before commit")
                return done
            taken = [int(m.group(1)) for p in d.iterdir() if (m := VERSION_RE.match(p.name))]
            n = max(taken, default=0) + 1
            while True:
                name = f"v{n:03d}"
                manifest = {**manifest, "version": name, "status": "complete"}
                write_json_atomic(partial / "manifest.json", manifest)
                try:
                    os.rename(partial, d / name)  # fails if the name exists and is not empty
                    break
                except OSError:
                    n += 1
        return Version(stage, name, d / name, manifest)

    @staticmethod
    def _remove_dead_temps(d: Path) -> None:
        """Private temp dirs of crashed processes on this host (name carries host and pid)."""
        host = socket.gethostname()
        for p in d.glob(f".tmp-{host}-*"):
            try:
                pid = int(p.name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def run_stage(
    store: RunStore,
    stage: str,
    config: Any,
    inputs: dict[str, Version],
    body: Callable[[Path], StageResult],
    *,
    force: bool = False,
    resumable: bool = False,
    log: Callable[[str], None] = print,
) -> Version | None:
    """The shell every stage shares: cache check, partial directory, body, manifest, atomic commit.

    Returns the complete version, or None when a resumable body reports that parts are still missing."""
    fp = fingerprint(stage, config, inputs)
    if not force:
        cached = store.find(stage, fp)
        if cached is not None:
            log(f"cached: {cached.ref}")
            return cached
    partial = store.partial_dir(stage, fp if resumable else None)
    started = time.time()
    try:
        result = body(partial)
    except BaseException:
        if not resumable:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if not result.complete:
        return None
    manifest = {
        "stage": stage,
        "version": None,
        "status": "complete",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fingerprint": fp,
        "inputs": {name: v.name for name, v in inputs.items()},
        "config": config,
        "counts": result.counts,
        "timings": {"wall_s": round(time.time() - started, 3), **result.timings},
        "fusechat_version": __version__,
        **result.extra,
    }
    version = store.commit(stage, partial, manifest)
    log(f"wrote: {version.ref}")
    return version


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
