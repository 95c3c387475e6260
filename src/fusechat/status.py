"""`fusechat status`: every stage's versions, counts, lineage, and how far unfinished ones are."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from fusechat.store import STAGES, RunStore


def summarize_counts(counts: dict[str, Any]) -> str:
    """Top-level scalar counts, e.g. `prompts=1200 rows=...`; nested breakdowns stay in the manifest."""
    parts = [f"{k}={v}" for k, v in counts.items() if isinstance(v, int | float | str)]
    return " ".join(parts)


def partial_summary(path) -> str:
    """Resumable stages keep `progress.json` in their partial directory (e.g. shards done / total)."""
    try:
        progress = json.loads((path / "progress.json").read_text())
    except (OSError, ValueError):
        return "in progress (or interrupted)"
    return " ".join(f"{k}={v}" for k, v in progress.items())


def parts_summary(manifest: dict[str, Any]) -> str:
    """A samples version's parts: which were reused from an earlier version (cached) and which it sampled."""
    parts = manifest.get("parts") or {}
    return " ".join(
        f"{name}=cached({p['reused_from']})" if p.get("reused_from") else f"{name}=sampled" for name, p in parts.items()
    )


def status_table(store: RunStore) -> Table:
    table = Table(title=f"fusechat run: {store.root}", show_lines=False)
    for col in ("stage", "version", "status", "created", "counts", "inputs", "fingerprint"):
        table.add_column(col, overflow="fold")
    for stage in STAGES:
        versions = store.versions(stage)
        partials = store.partials(stage) if store.stage_dir(stage).is_dir() else []
        if not versions and not partials:
            table.add_row(stage, "-", "[dim]none[/dim]", "", "", "", "")
            continue
        for v in versions:
            m = v.manifest
            inputs = ", ".join(f"{k}/{n}" for k, n in (m.get("inputs") or {}).items())
            counts = summarize_counts(m.get("counts") or {})
            if m.get("parts"):
                counts += f" parts: {parts_summary(m)}"
            table.add_row(
                stage, v.name, "[green]complete[/green]", m.get("created_at", ""), counts, inputs, v.fingerprint[:12]
            )
        for p in partials:
            table.add_row(stage, p.name, "[yellow]partial[/yellow]", "", partial_summary(p), "", "")
        if stage == "samples":
            from fusechat.sample.parts import incomplete_parts

            for name, progress in incomplete_parts(store):
                table.add_row(stage, name, "[yellow]partial[/yellow]", "", f"chunks={progress}", "", "")
    return table
