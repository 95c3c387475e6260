"""The reward model: score (prompt messages + response) with a one-output sequence classifier, in batches.

Any `AutoModelForSequenceClassification` with one output, or a custom head returning `.score` (ArmoRM; needs
`trust_remote_code: true`). Each conversation is rendered with the reward model's own chat template (or the
config's override) and tokenised without special tokens: the template writes BOS itself, so no second BOS.

Batching must not change a score. Sequences are grouped by length and padded on an explicit side; position ids
come from the attention mask, so left padding shifts nothing; the model pools on the last non-pad token (found
through `pad_token_id`), so a sequence that contains the pad id itself is scored alone, unpadded. Sequences
over `max_length` are cut and flagged. On out-of-memory the batch is halved and retried.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat.config import RewardModelConfig
from fusechat.errors import UserError, first_line
from fusechat.tokenizers import template_override

KEY = "score.reward_model"


# --------------------------------------------------------------------------------------------- pure core
def length_batches(lengths: Sequence[int], batch_size: int, alone: Sequence[bool] = ()) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows up at once).
    Indices flagged in `alone` get a batch of their own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    singles = [[i] for i in order if alone and alone[i]]
    rest = [i for i in order if not (alone and alone[i])]
    return [rest[s : s + batch_size] for s in range(0, len(rest), batch_size)] + singles


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """input_ids, attention_mask, position_ids (0.. over the real tokens, whichever side the pads are on)."""
    width = max(len(s) for s in seqs)
    ids, mask, pos = [], [], []
    for s in seqs:
        n = width - len(s)
        real = list(range(len(s)))
        left = side == "left"
        ids.append([pad_id] * n + list(s) if left else list(s) + [pad_id] * n)
        mask.append([0] * n + [1] * len(s) if left else [1] * len(s) + [0] * n)
        pos.append([0] * n + real if left else real + [0] * n)
    return ids, mask, pos


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate" in str(e).lower())
    )


def score_batches(
    forward: Callable[[list[int]], list[float]],
    batches: list[list[int]],
    n: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[float], int]:
    """Run `forward(indices) -> scores` over the batches; on out-of-memory halve the batch, retry, and keep the
    smaller size for the rest. Returns the scores in index order and how many times it halved."""
    scores: list[float] = [float("nan")] * n
    queue = deque(batches)
    cap = max((len(b) for b in batches), default=1)
    halvings = 0
    while queue:
        batch = queue.popleft()
        if len(batch) > cap:
            queue.appendleft(batch[cap:])
            batch = batch[:cap]
        try:
            values = forward(batch)
        except Exception as e:
            if not is_out_of_memory(e) or len(batch) == 1:
                raise
            _free_cache()
            cap = len(batch) // 2
            halvings += 1
            queue.appendleft(batch)
            continue
        for i, v in zip(batch, values, strict=True):
            scores[i] = v
        if on_batch:
            on_batch(len(batch))
    return scores, halvings


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- checks (no model)
def check_reward_model(rm: RewardModelConfig) -> dict[str, Any]:
    """Fail early, before any weights load: the path exists or is a cached hub id, and the model has one
    output (or a trusted custom head). Returns the model's config.json as a dict."""
    from transformers import AutoConfig

    looks_local = rm.path.startswith((".", "/", "~")) or Path(rm.path).expanduser().exists()
    if looks_local and not Path(rm.path).expanduser().is_dir():
        raise UserError(f"{KEY}.path: {rm.path}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(
            str(Path(rm.path).expanduser()) if looks_local else rm.path, trust_remote_code=rm.trust_remote_code
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"{KEY}.trust_remote_code: {rm.path} ships its own model code; set it to true if you trust that code"
            ) from None
        raise UserError(f"{KEY}.path: cannot load {rm.path}: {first_line(e)}") from None
    except OSError as e:
        raise UserError(
            f"{KEY}.path: cannot load {rm.path} (not found, or not cached while offline): {first_line(e)}"
        ) from None
    auto_map = getattr(config, "auto_map", None) or {}
    custom = "AutoModelForSequenceClassification" in auto_map
    if custom and not rm.trust_remote_code:
        raise UserError(
            f"{KEY}.trust_remote_code: {rm.path} has a custom reward head; set it to true if you trust its code"
        )
    archs = getattr(config, "architectures", None) or []
    if not custom:
        if archs and not any(a.endswith(("ForSequenceClassification", "ForRewardModel")) for a in archs):
            raise UserError(f"{KEY}.path: {rm.path} is a {archs[0]}, not a sequence-classification reward model")
        if config.num_labels != 1:
            raise UserError(
                f"{KEY}.path: {rm.path} has {config.num_labels} outputs (num_labels); a reward model "
                "must have exactly one"
            )
    return config.to_dict()


# --------------------------------------------------------------------------------------------- the model
@dataclass
class Scored:
    rewards: list[float]
    truncated: list[bool]
    num_tokens: list[int]


class RewardModel:
    """A loaded reward model with its tokenizer, scoring conversations in padded, length-grouped batches."""

    def __init__(self, rm: RewardModelConfig, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from fusechat.tokenizers import load_tokenizer

        check_reward_model(rm)
        self.cfg = rm
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = str(Path(rm.path).expanduser()) if Path(rm.path).expanduser().exists() else rm.path
        self.tokenizer = load_tokenizer(path, trust_remote_code=rm.trust_remote_code)
        template = template_override(rm.chat_template, f"{KEY}.chat_template")
        if template is not None:
            self.tokenizer.chat_template = template
        if not self.tokenizer.chat_template:
            raise UserError(f"{KEY}.chat_template: {rm.path} has no chat template; set one")
        dtype = "auto" if rm.dtype == "auto" else getattr(torch, rm.dtype)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=rm.trust_remote_code
            )
            .to(self.device)
            .eval()
        )
        text_config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        )
        pad_id = text_config.pad_token_id
        if pad_id is None:  # the model cannot find the last token of a padded row without one
            pad_id = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
            text_config.pad_token_id = pad_id
        self.pad_id = int(pad_id)
        limit = getattr(text_config, "max_position_embeddings", None)
        self.max_length = min(rm.max_length, limit) if limit else rm.max_length
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters

    def encode(self, conversations: Sequence[list[dict[str, str]]]) -> tuple[list[list[int]], list[bool]]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        truncated = [len(s) > self.max_length for s in ids]
        return [s[: self.max_length] for s in ids], truncated

    def forward(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        import torch

        ids, mask, pos = pad(seqs, self.pad_id, self.cfg.padding_side)
        inputs = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }
        if self._takes_positions:
            inputs["position_ids"] = torch.tensor(pos, device=self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        value = getattr(out, "score", None)
        if value is None:
            value = out.logits
        value = value.float()
        if value.dim() == 2 and value.shape[-1] == 1:
            value = value[:, 0]
        if value.dim() != 1:
            raise UserError(
                f"{KEY}.path: {self.cfg.path} returns scores of shape {tuple(value.shape)}; "
                "expected one value per sequence"
            )
        return value.cpu().tolist()

    def score(
        self,
        conversations: Sequence[list[dict[str, str]]],
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Scored:
        seqs, truncated = self.encode(conversations)
        alone = [self.pad_id in s for s in seqs]
        batches = length_batches([len(s) for s in seqs], batch_size or self.cfg.batch_size, alone)
        rewards, _ = score_batches(lambda idx: self.forward([seqs[i] for i in idx]), batches, len(seqs), on_batch)
        return Scored(rewards, truncated, [len(s) for s in seqs])


def conversation(messages: list[dict[str, str]], response: str) -> list[dict[str, str]]:
    return [
        *({"role": m["role"], "content": m["content"]} for m in messages),
        {"role": "assistant", "content": response},
    ]


def identity(rm: RewardModelConfig) -> dict[str, Any]:
    """What the scores' fingerprint must see of the reward model: its files and the template override."""
    from fusechat.store import model_identity

    template = template_override(rm.chat_template, f"{KEY}.chat_template")
    digest = hashlib.sha256(template.encode()).hexdigest()[:16] if template is not None else None
    return {**model_identity(rm.path), "chat_template": digest}
