"""Loading tokenizers the way they were saved.

transformers 5 replaces a fast tokenizer saved by `tokenizers` with `Qwen2Tokenizer` (a different pre-tokenizer,
different ids) for `model_type: qwen2` directories; `load_tokenizer` keeps the saved one.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusechat.errors import UserError


def template_override(value: str | None, key: str) -> str | None:
    """A config's `chat_template`: an inline Jinja template, or a file holding one (None: use the tokenizer's)."""
    if value is None or "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: {value}: file not found (give a .jinja file or an inline template)")
    return path.read_text()


def load_tokenizer(path: str | Path, **kwargs):
    """AutoTokenizer, except that a fast tokenizer saved by `tokenizers` is loaded as such."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").exists():
        config_file = path / "tokenizer_config.json"
        cfg = json.loads(config_file.read_text()) if config_file.exists() else {}
        if cfg.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
