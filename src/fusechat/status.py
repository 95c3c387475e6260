"""`fusechat status`: every stage's versions, counts, lineage, and the unfinished (partial) folders and samples parts:
how far each is and whether a live job works in it. `fusechat clean`: remove the ones no job works in."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from fusechat.store import STAGES, RunStore


def summarize_counts(counts: dict[str, Any]) -> str:
    """Top-level scalar counts, e.g. `prompts=1200 rows=...`; nested breakdowns stay in the manifest."""
    parts = [f"{k}={v}" for k, v in counts.items() if isinstance(v, int | float | str)]
    return " ".join(parts)


def partial_summary(path: Path) -> str:
    """Resumable stages keep `progress.json` in their partial directory (e.g. chunks done / total); training keeps
    its Trainer checkpoints."""
    try:
        progress = json.loads((path / "progress.json").read_text())
        return " ".join(f"{k}={v}" for k, v in progress.items())
    except (OSError, ValueError):
        pass
    steps = sorted(
        int(p.name.split("-")[1])
        for p in (path / "checkpoints").glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    )
    if steps:
        return f"last checkpoint: step {steps[-1]}"
    chunks = len(list((path / "data").glob("*.parquet"))) if (path / "data").is_dir() else 0
    return f"{chunks} chunk file(s)" if chunks else ""


def partial_state(store: RunStore, path: Path) -> tuple[str, str]:
    """(`running`, the holder) while a live job works in it, else (`abandoned`, how long since its last write)."""
    holder = store.busy(path)
    if holder is not None:
        return "running", holder
    return "abandoned", f"last write {_age(time.time() - _newest_mtime(path))} ago"


def parts_summary(manifest: dict[str, Any]) -> str:
    """A samples version's parts: which were reused from an earlier version (cached) and which it sampled."""
    parts = manifest.get("parts") or {}
    return " ".join(
        f"{name}=cached({p['reused_from']})" if p.get("reused_from") else f"{name}=sampled" for name, p in parts.items()
    )


def status_table(store: RunStore) -> Table:
    table = Table(title=escape(f"fusechat run: {store.root}"), show_lines=False)
    for col in ("stage", "version", "status", "created", "counts", "inputs", "fingerprint"):  # partial: progress, who
        table.add_column(col, overflow="fold")
    for stage in STAGES:
        versions, broken = store.scan(stage)
        partials = store.partials(stage)
        parts = unfinished_parts(store) if stage == "samples" else []
        if not versions and not partials and not broken and not parts:
            table.add_row(stage, "-", "[dim]none[/dim]", "", "", "", "")
            continue
        for v in versions:
            m = v.manifest
            inputs = ", ".join(f"{k}/{n}" for k, n in (m.get("inputs") or {}).items())
            counts = summarize_counts(m.get("counts") or {})
            if m.get("parts"):
                counts += f" parts: {parts_summary(m)}"
            table.add_row(
                stage,
                v.name,
                "[green]complete[/green]",
                escape(str(m.get("created_at", ""))),
                escape(counts),
                escape(inputs),
                v.fingerprint[:12],
            )
        for manifest, problem in broken:
            table.add_row(stage, manifest.parent.name, "[red]broken[/red]", "", escape(f"manifest.json: {problem}"))
        for p in partials:
            state, detail = partial_state(store, p)
            colour = "yellow" if state == "running" else "red"
            table.add_row(
                stage,
                escape(p.name),
                f"[{colour}]partial, {state}[/{colour}]",
                "",
                escape(partial_summary(p)),
                escape(detail),
            )
        for path, progress in parts:
            state, detail = partial_state(store, path)
            colour = "yellow" if state == "running" else "red"
            name = path.relative_to(store.stage_dir(stage)).as_posix()
            table.add_row(
                stage,
                escape(name),
                f"[{colour}]part, {state}[/{colour}]",
                "",
                f"chunks={escape(progress)}",
                escape(detail),
            )
    return table


def unfinished_parts(store: RunStore) -> list[tuple[Path, str]]:
    """Samples parts not yet complete, with chunks done/planned (`fusechat.sample.parts`)."""
    from fusechat.sample.parts import incomplete_parts

    return incomplete_parts(store)


def abandoned(store: RunStore, stages: list[str] | None = None) -> list[tuple[str, Path]]:
    """Partial folders and unfinished samples parts no live job works in: (stage, path)."""
    found = []
    for stage in stages or STAGES:
        found += [(stage, p) for p in store.partials(stage) if store.busy(p) is None]
        if stage == "samples":
            found += [(stage, p) for p, _ in unfinished_parts(store) if store.busy(p) is None]
    return found


def clean(store: RunStore, stages: list[str] | None = None, dry_run: bool = False) -> list[tuple[str, Path, int]]:
    """Remove the abandoned partial folders (each only if still unclaimed when removed); (stage, path, bytes)."""
    removed = []
    for stage, path in abandoned(store, stages):
        size = _size(path)
        if dry_run or store.discard(path):
            removed.append((stage, path, size))
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            continue
    return newest


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            continue
    return total


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
