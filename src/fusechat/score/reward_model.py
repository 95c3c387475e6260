"""The reward model: score (prompt messages + response) with a reward head, in batches.

Three kinds: any `AutoModelForSequenceClassification` with one output (e.g. Skywork-Reward); the ArmoRM layout
(`LlamaForRewardModelWithGating`), loaded natively by `fusechat.score.armorm` whatever `trust_remote_code` says
(its own remote code does not import on transformers 5); or another custom head returning `.score`
(`trust_remote_code: true`). Each conversation is rendered with the reward model's own chat template (or the
config's override) and tokenised without special tokens: the template writes BOS itself, so no second BOS.

Truncation keeps the prompt: a conversation over `max_length` loses the tail of its response, never the prompt or
the assistant header; one whose prompt and header alone leave no room for the response is not scored (verdict
`prompt_too_long`).

Batching must not change a score. Sequences are sorted by length and packed, longest first, into batches of at most
`batch_tokens` padded tokens (and `batch_size` rows), padded on an explicit side; position ids come from the
attention mask, so left padding shifts nothing. A classifier that pools on the last non-pad token (found through
`pad_token_id`) scores a sequence containing the pad id alone, unpadded; ArmoRM pools through the attention mask.
On out-of-memory the token budget is halved and the batch retried. A batch that raises anything else is retried one
row at a time, and a row that still raises gets a verdict (`error`, `out_of_memory`) instead of failing its chunk,
unless no row of the call could be scored at all: that is a broken model or device, not a row, and it raises.
The head (the last linear layer, or ArmoRM's regression, gating and transform) runs in float32 unless
`head_dtype: model`: in bf16 a reward of 8 is rounded to a multiple of 1/16.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat.config import RewardModelConfig
from fusechat.errors import UserError, first_line
from fusechat.tokenizers import template_override

KEY = "score.reward_model"


# --------------------------------------------------------------------------------------------- pure core
def token_batches(
    lengths: Sequence[int], batch_tokens: int, max_rows: int, alone: Sequence[bool] = ()
) -> list[list[int]]:
    """Indices sorted by length, longest first (an out-of-memory shows up at once), packed into batches of at most
    `batch_tokens` padded tokens and `max_rows` rows; a sequence longer than the budget goes alone. Indices flagged
    in `alone` get a batch of their own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if alone and alone[i]:
            continue
        if current and ((len(current) + 1) * lengths[current[0]] > batch_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches + [[i] for i in order if alone and alone[i]]


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
    lengths: Sequence[int],
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[float | None], dict[int, BaseException], int]:
    """Run `forward(indices) -> scores` over the batches. On out-of-memory halve the padded-token budget, retry,
    and keep the smaller budget for the rest; on any other error retry the batch's rows one at a time. Returns the
    scores in index order (None where a row failed alone), each failed row's exception, and how many times it
    halved."""
    scores: list[float | None] = [None] * len(lengths)
    failures: dict[int, BaseException] = {}
    queue = deque(batches)
    cap: int | None = None  # padded tokens per forward, once an out-of-memory has set one
    halvings = 0
    while queue:
        batch = queue.popleft()
        width = max(lengths[i] for i in batch)
        if cap is not None and len(batch) > 1 and len(batch) * width > cap:
            keep = max(1, cap // width)
            queue.appendleft(batch[keep:])
            batch = batch[:keep]
        try:
            values = forward(batch)
        except Exception as e:
            oom = is_out_of_memory(e)
            if oom:
                _free_cache()
            if len(batch) > 1:
                if oom:
                    cap = len(batch) * width // 2
                    halvings += 1
                    queue.appendleft(batch)
                else:  # one row may be at fault: each alone
                    queue.extendleft([i] for i in reversed(batch))
                continue
            failures[batch[0]] = e
            values = [None]
        for i, v in zip(batch, values, strict=True):
            scores[i] = v
        if on_batch:
            on_batch(len(batch))
    return scores, failures, halvings


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- checks (no model)
def check_reward_model(rm: RewardModelConfig) -> dict[str, Any]:
    """Fail early, before any weights load: the path exists or is a cached hub id, and the model has one
    output, the ArmoRM layout, or a trusted custom head. Returns the model's config.json as a dict."""
    from transformers import AutoConfig

    from fusechat.score.armorm import is_armorm

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
    if is_armorm(config.to_dict()):  # its auto_map points at code that cannot run here; ours replaces it
        if config.model_type != "llama":
            raise UserError(
                f"{KEY}.path: {rm.path} is a LlamaForRewardModelWithGating of model_type {config.model_type}"
            )
        return config.to_dict()
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
SCORED = ("ok", "truncated")  # encode verdicts of rows that go to the model


@dataclass
class Encoded:
    ids: list[list[int]]  # what the model sees (empty when not scored)
    verdicts: list[str]  # ok, truncated, prompt_too_long, error (the template could not render it)
    lengths: list[int | None]  # tokens of the whole conversation (None: not rendered)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class Scored:
    rewards: list[float | None]
    truncated: list[bool | None]  # the conversation exceeded max_length (the model saw part of it, or none)
    num_tokens: list[int | None]  # tokens the model scored
    verdicts: list[str]  # ok, truncated, prompt_too_long, error, out_of_memory
    errors: dict[int, str] = field(default_factory=dict)  # row -> what went wrong


class RewardModel:
    """A loaded reward model with its tokenizer, scoring conversations in padded, length-sorted batches."""

    def __init__(self, rm: RewardModelConfig, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from fusechat.score import armorm
        from fusechat.tokenizers import load_tokenizer

        config = check_reward_model(rm)
        self.cfg = rm
        self.armorm = armorm.is_armorm(config)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = str(Path(rm.path).expanduser()) if Path(rm.path).expanduser().exists() else rm.path
        self.tokenizer = load_tokenizer(path, trust_remote_code=rm.trust_remote_code and not self.armorm)
        template = template_override(rm.chat_template, f"{KEY}.chat_template")
        if template is not None:
            self.tokenizer.chat_template = template
        if not self.tokenizer.chat_template:
            raise UserError(f"{KEY}.chat_template: {rm.path} has no chat template; set one")
        dtype = "auto" if rm.dtype == "auto" else getattr(torch, rm.dtype)
        if self.armorm:
            model = armorm.load(path, dtype, head_in_float32=rm.head_dtype == "float32", tokenizer=self.tokenizer)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=rm.trust_remote_code
            )
            if rm.head_dtype == "float32":
                float32_head(model)
        self.model = model.to(self.device).eval()
        text_config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        )
        pad_id = text_config.pad_token_id
        fallback = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        if self.armorm:  # pools through the attention mask: any id inside the vocabulary pads
            if pad_id is None or not 0 <= pad_id < text_config.vocab_size:
                pad_id = fallback
        elif pad_id is None:  # the model cannot find the last token of a padded row without one
            pad_id = fallback
            text_config.pad_token_id = pad_id
        self.pad_id = int(pad_id)
        limit = getattr(text_config, "max_position_embeddings", None)
        self.max_length = min(rm.max_length, limit) if limit else rm.max_length
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        if self.armorm:
            self._check_gating_pattern()

    def _check_gating_pattern(self) -> None:
        import torch

        from fusechat.score.armorm import GATING_TEXT, gating_positions

        probe = conversation([{"role": "user", "content": "hi"}], "hello")
        ids = self.encode([probe]).ids[0]
        try:
            gating_positions(torch.tensor([ids]), torch.ones(1, len(ids)), self.model.gating_pattern)
        except ValueError:
            raise UserError(
                f"{KEY}.chat_template: {self.cfg.path} is an ArmoRM, which gates on the assistant header "
                f"{GATING_TEXT!r}; its chat template does not produce it"
            ) from None

    def encode(self, conversations: Sequence[list[dict[str, str]]]) -> Encoded:
        texts, errors = [], {}
        for i, c in enumerate(conversations):
            try:
                texts.append(self.tokenizer.apply_chat_template(c, tokenize=False))
            except Exception as e:  # jinja raises its own types, e.g. a template that rejects a role
                errors[i] = f"chat template: {first_line(e)}"
                texts.append("")
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        out = Encoded([], [], [], errors)
        for i, (c, s) in enumerate(zip(conversations, ids, strict=True)):
            prompt = self._prompt_tokens(c, i, errors) if i not in errors and len(s) > self.max_length else 0
            if i in errors:
                seq, verdict, n = [], "error", None
            elif len(s) <= self.max_length:
                seq, verdict, n = s, "ok", len(s)
            elif prompt >= self.max_length:
                seq, verdict, n = [], "prompt_too_long", len(s)
            else:
                seq, verdict, n = s[: self.max_length], "truncated", len(s)
            out.ids.append(seq)
            out.verdicts.append(verdict)
            out.lengths.append(n)
        return out

    def _prompt_tokens(self, conv: list[dict[str, str]], i: int, errors: dict[int, str]) -> int:
        """Tokens of everything before the response: the prompt turns and the assistant header."""
        try:
            text = self.tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that wants the conversation to end with an assistant turn
            errors[i] = f"chat template (prompt alone): {first_line(e)}"
            return 0
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

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
        enc = self.encode(conversations)
        n = len(conversations)
        todo = [i for i in range(n) if enc.verdicts[i] in SCORED]
        seqs = [enc.ids[i] for i in todo]
        # pooling on the pad id would stop early at a pad id inside the text: such a sequence goes unpadded
        alone = [not self.armorm and self.pad_id in s for s in seqs]
        lengths = [len(s) for s in seqs]
        batches = token_batches(lengths, self.cfg.batch_tokens, batch_size or self.cfg.batch_size, alone)
        values, failures, _ = score_batches(
            lambda idx: self.forward([seqs[j] for j in idx]), batches, lengths, on_batch
        )
        unscored = len(failures) + len(enc.errors)
        if unscored > 1 and len(failures) == len(todo):  # nothing scored: the model, device or template is broken
            if failures:
                raise next(iter(failures.values()))
            raise UserError(f"{KEY}.chat_template: cannot render any conversation: {next(iter(enc.errors.values()))}")
        rewards: list[float | None] = [None] * n
        scored_tokens: list[int | None] = [None] * n
        verdicts, errors = list(enc.verdicts), dict(enc.errors)
        for j, i in enumerate(todo):
            rewards[i] = values[j]
            if j in failures:
                verdicts[i] = "out_of_memory" if is_out_of_memory(failures[j]) else "error"
                errors[i] = f"{type(failures[j]).__name__}: {first_line(failures[j])}"
            else:
                scored_tokens[i] = lengths[j]
        truncated = [None if m is None else m > self.max_length for m in enc.lengths]
        return Scored(rewards, truncated, scored_tokens, verdicts, errors)


def float32_head(model) -> None:
    """Run a sequence classifier's output layer (`score`, one linear map) in float32."""
    import torch

    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
        head.float()
        head.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))


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
