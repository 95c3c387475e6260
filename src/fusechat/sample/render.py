"""Prompts to token ids with each source's own chat template, and the ids that end its turn.

The template output is tokenized with `add_special_tokens=False`: templates such as Llama-3's emit BOS
themselves, and a tokenizer that adds one too gives the double-BOS prompt that silently costs quality.
"""

from __future__ import annotations

from typing import Any

from fusechat.config import SourceModel
from fusechat.errors import UserError
from fusechat.tokenizers import template_override


def with_system(messages: list[dict[str, str]], system_prompt: str | None, policy: str) -> list[dict[str, str]]:
    """Apply a source's system-prompt settings. The config's `system_prompt` is a default: a prompt that has its
    own system turn keeps it. `merge` folds system text into the first user turn (Gemma-2 rejects system turns),
    `drop` removes it."""
    msgs = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if policy == "keep":
        return msgs
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"].strip())
    rest = [m for m in msgs if m["role"] != "system"]
    if policy == "merge" and system:
        first_user = next(i for i, m in enumerate(rest) if m["role"] == "user")
        rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
    return rest


def chat_template(source: SourceModel, tokenizer: Any, where: str) -> str:
    """The config's template (a .jinja file or an inline template), else the tokenizer's own."""
    override = template_override(source.chat_template, f"{where}.chat_template")
    if override is not None:
        return override
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}.model ({source.name}): the tokenizer of {source.model} has no chat template; "
            f"set {where}.chat_template to a .jinja file or an inline template"
        )
    return tokenizer.chat_template


def render_ids(tokenizer: Any, messages: list[dict[str, str]], template: str) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(model: str, tokenizer: Any) -> list[int]:
    """End-of-turn ids: `generation_config.json`'s eos ids (Llama-3 lists `<|eot_id|>` there) and the tokenizer's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
