"""A samples version written by hand, for tests of `score` and `build` on chosen answers (no sampling needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusechat.store import RunStore, StageResult, Version, run_stage


def sample_row(prompt_id: str, source: str, k: int, text: str) -> dict[str, Any]:
    """One response in the samples layout (a character count stands in for its tokens)."""
    return {
        "prompt_id": prompt_id,
        "source": source,
        "sample_index": k,
        "text": text,
        "num_tokens": len(text),
        "finish_reason": "stop",
    }


def write_samples(store: RunStore, prompts: Version, rows: list[dict[str, Any]], files: int = 1) -> Version:
    """A complete samples version of `rows`, split over `files` Parquet files (a.parquet, b.parquet, ...)."""

    def body(out: Path) -> StageResult:
        (out / "data").mkdir()
        for i in range(files):
            part = rows[i * len(rows) // files : (i + 1) * len(rows) // files]
            pq.write_table(pa.Table.from_pylist(part), out / "data" / f"{'abcdefgh'[i]}.parquet")
        return StageResult(counts={"samples": len(rows)})

    return run_stage(store, "samples", {"hand": True}, {"prompts": prompts}, body, log=lambda _: None)
