"""Fingerprints see the weights: a model rebuilt in place at the same path is not a cache hit."""

import os

from fusechat.config import FusechatConfig
from fusechat.sample.stage import stage_config
from fusechat.store import model_identity


def test_model_identity_changes_when_files_change(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = model_identity(str(tmp_path))
    assert model_identity(str(tmp_path)) == before
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_identity(str(tmp_path)) != before
    assert model_identity("org/hub-model") == {"id": "org/hub-model"}


def test_sample_fingerprint_config_includes_source_weights(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a")
    cfg = FusechatConfig.model_validate(
        {
            "name": "t",
            "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "d", "fields": {"prompt": "q"}}]},
            "sources": [{"name": "s", "model": str(model)}],
        }
    )
    first = stage_config(cfg)
    (model / "model.safetensors").write_bytes(b"b")
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert stage_config(cfg) != first
