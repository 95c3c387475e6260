"""Versioned stage directories: `<workdir>/<run>/<stage>/vNNN/` with `manifest.json` and `data/`.

A version is built in a hidden partial directory and renamed to `vNNN` only when complete, under a lock, so a
listed version is always complete and two writers never get the same number. Resumable stages (sample, score,
sft, dpo) key their partial directory by fingerprint: a re-run, or another machine working on other shards, finds
it and continues. A stage whose fingerprint matches a complete version is a cache hit and does no work.

The manifest lists every file of the version with its size (and a Parquet file's rows); a stage reading a version
checks them first (`check`), so a lost or truncated file is an error naming it, never a silently smaller input.
One job per stage, job key (`--shard`, `--source`, machine rank) and run directory at a time (`job_lock`); jobs
working in one partial directory hold a shared lock on it, so `--force` and `fusechat clean` never remove a
directory a live job fills. Data files are fsynced before the rename, and the version takes the permissions of
the umask (the temporary directories and some writers make files private to their owner).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fusechat import __version__
from fusechat.errors import UserError

# Directory name of each stage's versions. The CLI verbs differ for three of them (sample, score, build).
STAGES = ("prompts", "samples", "scores", "datasets", "sft", "dpo", "eval")
# The command that makes each stage's versions, where its name differs.
MAKERS = {"samples": "sample", "scores": "score", "datasets": "build"}
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


def write_json_atomic(path: Path, data: Any, *, durable: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, e.g. some network mounts)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(path: Path, what: str = "workdir") -> Path:
    """`mkdir -p` with a one-line error naming the config key when a parent is a file or not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise UserError(f"{what}: {blocker} is a file, not a directory") from None
    except OSError as e:
        raise UserError(f"{what}: cannot create {path}: {e.strerror or e}") from None
    return path


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
    def scan(self, stage: str) -> tuple[list[Version], list[tuple[Path, str]]]:
        """Complete versions, oldest first, and the version directories whose manifest is broken (with why)."""
        d = self.stage_dir(stage)
        if not d.is_dir():
            return [], []
        found, broken = [], []
        for p in d.iterdir():
            m = VERSION_RE.match(p.name)
            if not m or not p.is_dir():
                continue
            manifest, problem = _read_manifest(p)
            if problem is None:
                found.append((int(m.group(1)), Version(stage, p.name, p, manifest)))
            else:
                broken.append((p / "manifest.json", problem))
        return [v for _, v in sorted(found, key=lambda t: t[0])], sorted(broken)

    def versions(self, stage: str) -> list[Version]:
        """Complete versions, oldest first. A version directory with a broken manifest is an error naming it: it
        must not vanish (a silent redo) nor let an older version stand in for it."""
        found, broken = self.scan(stage)
        if broken:
            path, problem = broken[0]
            raise UserError(
                f"{path}: {problem}; restore the file, or remove {path.parent} if the version is not needed"
            )
        return found

    def check(self, version: Version) -> Version:
        """The version's files against its manifest: each listed file there with its size (a Parquet file also
        with its rows), and no Parquet file the manifest does not list. Versions written before the manifest
        listed files are not checked."""
        listed = version.manifest.get("files")
        if listed is None:
            return version
        for rel, info in listed.items():
            problem = file_problem(version.path / rel, info)
            if problem:
                maker = MAKERS.get(version.stage, version.stage)
                raise UserError(
                    f"{version.path / rel}: {problem} ({version.ref} is damaged; `fusechat {maker} --force` makes "
                    "it again)"
                )
        for f in version.path.rglob("*.parquet"):
            rel = f.relative_to(version.path).as_posix()
            if rel not in listed and not any(part.startswith(".") for part in Path(rel).parts):
                raise UserError(f"{f}: not part of {version.ref} (its manifest does not list it); remove it")
        return version

    def partials(self, stage: str) -> list[Path]:
        d = self.stage_dir(stage)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.name.startswith((".partial-", ".tmp-")) and p.is_dir())

    def latest(self, stage: str) -> Version | None:
        vs = self.versions(stage)
        return vs[-1] if vs else None

    def find(self, stage: str, fp: str) -> Version | None:
        for v in reversed(self.versions(stage)):
            if v.fingerprint == fp:
                return v
        return None

    def named(self, stage: str, name: str) -> Version | None:
        return next((v for v in self.versions(stage) if v.name == name), None)

    def resolve(self, stage: str, pinned: str | None = None) -> Version:
        """The pinned version (`v003` or `3`), else the latest complete one, checked against its manifest; a
        clear error otherwise."""
        if pinned:
            name = pinned if pinned.startswith("v") else f"v{int(pinned):03d}" if pinned.isdigit() else pinned
            v = self.named(stage, name)
            if v is not None:
                return self.check(v)
            p = self.stage_dir(stage) / name
            state = "is incomplete" if p.is_dir() else "does not exist"
            raise UserError(f"--input {stage}={pinned}: {p} {state}")
        v = self.latest(stage)
        if v is None:
            raise UserError(f"no complete {stage} version in {self.root}; run the stage that makes it first")
        return self.check(v)

    # ------------------------------------------------------------------ writing
    def partial_dir(self, stage: str, fp: str | None, *, redo_after: str | None = None) -> Path:
        """A shared, resumable partial directory for `fp`, or a private temporary one. `redo_after` (a forced
        redo of complete version vNNN) gives the redo its own directory, which shard jobs of the redo share."""
        d = ensure_dir(self.stage_dir(stage))
        if fp is not None:
            p = d / (f".partial-{fp[:16]}" + (f"-after-{redo_after}" if redo_after else ""))
            p.mkdir(exist_ok=True)
            return p
        self._remove_dead_temps(d)
        p = Path(tempfile.mkdtemp(prefix=f".tmp-{socket.gethostname()}-{os.getpid()}-", dir=d))
        p.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        return p

    @contextmanager
    def job_lock(self, stage: str, job: str | None = None) -> Iterator[None]:
        """One process per stage, job key and run directory: a second one is an error naming the holder. The
        folders it had to create are removed again when the stage fails and leaves them empty."""
        d = self.stage_dir(stage)
        created = [p for p in [d, *d.parents] if not p.exists()]
        ensure_dir(d)
        try:
            with self._job_lock(d, stage, job):
                yield
        except BaseException:
            for p in created:  # deepest first; stops at the first that is not empty
                try:
                    p.rmdir()
                except OSError:
                    break
            raise

    @contextmanager
    def _job_lock(self, d: Path, stage: str, job: str | None) -> Iterator[None]:
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", job or "all")
        lock = _try_lock(d / f".lock-job-{key}", exclusive=True, wait_s=0.5)
        if lock is None:
            holder = _holder(d / f".lock-job-{key}")
            what = f"another {stage} job" + (f" ({job})" if job else "")
            raise UserError(f"{what} is already running on {self.root}: {holder}; wait for it or stop it")
        _write_holder(lock)
        try:
            yield
        finally:
            _release(lock, d / f".lock-job-{key}")

    @contextmanager
    def using(self, partial: Path) -> Iterator[None]:
        """Hold a shared lock on `partial` while working in it (`busy` tells `--force` and `clean` it is live)."""
        path = partial.parent / f".lock-{partial.name}"
        lock = _try_lock(path, exclusive=False)
        if lock is None:  # `clean` or a forced redo is removing it right now
            raise UserError(f"{partial} is being removed by another fusechat process; re-run in a moment")
        _write_holder(lock)
        try:
            yield
        finally:
            _release(lock, path)

    def busy(self, partial: Path) -> str | None:
        """Who works in `partial` (pid, host, command), or None when no live job holds it."""
        path = partial.parent / f".lock-{partial.name}"
        if not path.exists():
            return None
        lock = _try_lock(path, exclusive=True, wait_s=0.2)
        if lock is None:
            return _holder(path)
        _release(lock, path)
        return None

    def discard(self, partial: Path) -> bool:
        """Remove `partial` unless a live job works in it; returns whether it was removed."""
        path = partial.parent / f".lock-{partial.name}"
        lock = _try_lock(path, exclusive=True, wait_s=0.2)
        if lock is None:
            return False
        try:
            shutil.rmtree(partial, ignore_errors=True)
        finally:
            _release(lock, path)
        return True

    def commit(self, stage: str, partial: Path, manifest: dict[str, Any], redoing: str | None = None) -> Version:
        """Rename `partial` to the next free `vNNN`, with its manifest (listing its files). If another job of the
        same work already committed (shard jobs finishing together; a sibling that links its parts' files may
        have recreated the folder), return that version: a version of this fingerprint other than `redoing`, the
        one a forced run makes again."""
        d = self.stage_dir(stage)
        with _locked(d / ".lock"):
            done = self.find(stage, manifest["fingerprint"])
            if done is not None and done.name != redoing:
                shutil.rmtree(partial, ignore_errors=True)
                return done
            if not partial.exists():
                raise RuntimeError(f"{partial} vanished before commit")
            manifest = {**manifest, "files": seal(partial)}
            taken = [int(m.group(1)) for p in d.iterdir() if (m := VERSION_RE.match(p.name))]
            n = max(taken, default=0) + 1
            while True:
                name = f"v{n:03d}"
                manifest = {**manifest, "version": name, "status": "complete"}
                write_json_atomic(partial / "manifest.json", manifest, durable=True)
                try:
                    os.rename(partial, d / name)  # fails if the name exists and is not empty
                    break
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    n += 1
            fsync_dir(d)
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
    job: str | None = None,
    log: Callable[[str], None] = print,
) -> Version | None:
    """The shell every stage shares: job lock, cache check, partial directory, body, manifest, atomic commit.

    `job` names the part of the work this process does when several jobs fill one version together (`--shard`,
    `--source`, a machine rank); one process per stage and job runs at a time. `force` starts over: a forced
    job does not reuse the chunks or checkpoints of an earlier attempt (shard jobs of one forced redo share
    theirs). Returns the complete version, or None when a resumable body reports that parts are still missing."""
    fp = fingerprint(stage, config, inputs)
    with store.job_lock(stage, job):
        cached = store.find(stage, fp)
        if cached is not None and not force:
            store.check(cached)
            log(f"cached: {cached.ref}")
            return cached
        partial = _fresh_partial(store, stage, fp, cached, force, job, log) if resumable else None
        partial = partial or store.partial_dir(stage, None)
        started = time.time()
        with store.using(partial):
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
            version = store.commit(stage, partial, manifest, redoing=cached.name if cached is not None else None)
    log(f"wrote: {version.ref}")
    return version


def _fresh_partial(
    store: RunStore, stage: str, fp: str, cached: Version | None, force: bool, job: str | None, log
) -> Path:
    """The resumable partial directory of `fp`. Forced: a redo of the newest complete version gets its own
    directory; a forced single job removes what an earlier attempt left there (unless a live job works in it)."""
    redo_after = cached.name if force and cached is not None else None
    partial = store.partial_dir(stage, fp, redo_after=redo_after)
    if not force or job is not None:
        if force and redo_after is None:
            raise UserError(
                f"--force with a job part ({job}): there is no complete {stage} version to redo, and the jobs "
                f"could not agree on starting {partial.name} over; run them without --force to continue it, or "
                "remove it first with `fusechat clean`"
            )
        return partial
    if any(partial.iterdir()):
        if not store.discard(partial):
            holder = store.busy(partial) or "another process"
            raise UserError(f"--force: {partial} is in use by {holder}; wait for it or stop it")
        log(f"--force: removed the earlier attempt {partial.name}")
        partial = store.partial_dir(stage, fp, redo_after=redo_after)
    return partial


def seal(partial: Path) -> dict[str, dict[str, int]]:
    """Every file of a finished partial directory with its size (and a Parquet file's rows), each fsynced and
    given the permissions of the umask; hidden leftovers (temp files of killed writers) are removed."""
    files: dict[str, dict[str, int]] = {}
    dir_mode, file_mode = 0o777 & ~current_umask(), 0o666 & ~current_umask()
    for root, dirs, names in os.walk(partial):
        here = Path(root)
        for name in [n for n in dirs if n.startswith(".")]:
            shutil.rmtree(here / name, ignore_errors=True)
            dirs.remove(name)
        _chmod(here, dir_mode)
        for name in sorted(names):
            f = here / name
            if name.startswith("."):
                f.unlink(missing_ok=True)
                continue
            if f.is_symlink():
                continue
            _chmod(f, file_mode)
            fsync_file(f)
            rel = f.relative_to(partial).as_posix()
            if rel == "manifest.json":
                continue
            info = {"bytes": f.stat().st_size}
            if name.endswith(".parquet"):
                info["rows"] = _parquet_rows(f)
            files[rel] = info
        fsync_dir(here)
    return dict(sorted(files.items()))


def _chmod(path: Path, mode: int) -> None:
    """Best effort: a shard job of another user in the group may own the file."""
    try:
        os.chmod(path, mode)
    except PermissionError:
        pass


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def file_problem(path: Path, info: dict[str, int]) -> str | None:
    """Why a listed file does not match its manifest entry, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size != info.get("bytes", size):
        return f"{size} bytes, the manifest says {info['bytes']} (truncated or replaced)"
    if "rows" in info:
        try:
            rows = _parquet_rows(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            return f"not a readable Parquet file ({type(e).__name__})"
        if rows != info["rows"]:
            return f"{rows} rows, the manifest says {info['rows']}"
    return None


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a complete version, else (None, what is wrong with its manifest.json)."""
    f = path / "manifest.json"
    try:
        manifest = json.loads(f.read_text())
    except FileNotFoundError:
        return None, "missing (a version directory without its manifest)"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), str):
        return None, "not a fusechat manifest (no fingerprint)"
    if manifest.get("status") != "complete":
        return None, f"status {manifest.get('status')!r}, expected 'complete'"
    return manifest, None


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


def _try_lock(path: Path, *, exclusive: bool, wait_s: float = 2.0):
    """An open file holding a flock on `path` (created if needed), or None when another process still holds a
    conflicting one after `wait_s` (a releasing holder converts its lock for an instant). Lock files are removed
    on release, so after locking, check that the path still names the file locked (else retry)."""
    deadline = time.monotonic() + wait_s
    while True:
        fh = open(path, "a+")  # noqa: SIM115 - held until _release
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        except OSError as e:  # a filesystem without locks (e.g. Lustre mounted without -o flock): run unguarded
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                fh.close()
                raise
            return fh
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()


def _write_holder(fh) -> None:
    """Who holds the lock, for the message of the next process that wants it."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["fusechat", *sys.argv[1:]]) if sys.argv and "fusechat" in sys.argv[0] else "",
    }
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(info))
    fh.flush()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    command = f" ({info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}{command}"


def _release(fh, path: Path) -> None:
    """Unlock; the last holder removes the lock file."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts a shared lock: succeeds only for the last one
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            os.unlink(path)
    except (BlockingIOError, OSError):
        pass
    finally:
        fh.close()
