"""Precomputed reference log-probs (`dpo.precompute_ref_log_probs: true`) stored with the DPO version that computed
them (`dpo/vNNN/ref_logps.parquet`), so that a beta or learning-rate sweep on the same SFT model and data reads them
instead of running the reference model over the whole set again.

A run looks for the newest dpo version whose `ref_logps.key` matches its own: the reference model's identity, the
datasets version, the chat template and the settings that change the numbers (max_length, truncation, LD-DPO's
alpha, precision). The file also holds a digest of the tokenised pairs it was computed on; a file whose digest
differs from the run's own tokens is not used (the run computes and stores its own)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FILE = "ref_logps.parquet"
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
DIGEST_KEY = b"fusechat.token_digest"
FORMAT = 1


def cache_key(model: Any, datasets_fingerprint: str, trl: dict[str, Any], chat_template: str | None) -> str:
    settings = {k: trl.get(k) for k in ("max_length", "truncation_mode", "ld_alpha", "bf16", "fp16")}
    settings["dtype"] = str((trl.get("model_init_kwargs") or {}).get("dtype"))
    payload = {
        "format": FORMAT,
        "model": model,
        "datasets": datasets_fingerprint,
        "chat_template": chat_template,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def find(store, key: str):
    """The newest dpo version that stored reference log-probs under `key`, or None."""
    for version in reversed(store.versions("dpo")):
        if (version.manifest.get("ref_logps") or {}).get("key") == key and (version.path / FILE).is_file():
            return version
    return None


def token_digest(dataset) -> str:
    """A hash of the tokenised prompt/chosen/rejected ids, in row order (the rows the values belong to)."""
    import numpy as np
    import pyarrow.compute as pc

    h = hashlib.sha256()
    for batch in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=4096):
        for name in TOKEN_COLUMNS:
            col = batch.column(name).combine_chunks()
            h.update(np.asarray(pc.list_value_length(col), dtype=np.int64).tobytes())
            h.update(np.asarray(col.flatten(), dtype=np.int64).tobytes())
    return h.hexdigest()


def attach(path: Path, dataset):
    """`dataset` with the stored columns added, or None when the file is missing or belongs to other tokens."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    table = pq.read_table(path)
    digest = (table.schema.metadata or {}).get(DIGEST_KEY, b"").decode()
    if table.num_rows != len(dataset) or digest != token_digest(dataset):
        return None
    for name in COLUMNS:
        dataset = dataset.add_column(name, table.column(name).to_numpy())
    return dataset


def save(path: Path, dataset) -> None:
    """The reference columns of a dataset TRL precomputed, with the digest of its tokens; written atomically."""
    import pyarrow.parquet as pq

    table = dataset.select_columns(list(COLUMNS)).with_format("arrow")[:]
    table = table.replace_schema_metadata({DIGEST_KEY: token_digest(dataset).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
