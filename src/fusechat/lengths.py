"""How long a conversation is in the target's tokens, without tokenizing most of them.

`build` must know, for every response that could be selected, whether prompt + response rendered with the target's
chat template fits `build.max_length`. Tokenizing millions of responses takes hours of CPU, so each gets a cheap
upper bound first, and only responses whose bound exceeds the limit are tokenized (`count`, in worker processes):

- byte-level BPE (Llama-3, Qwen2, GPT-2 style): in BPE's final split no two adjacent single-byte tokens have a merge
  rule (BPE stops only when no adjacent pair merges). Within a pre-token of P bytes with u adjacent byte pairs that
  have no merge rule, that leaves at most (2P + 1 + u) / 3 tokens. Summed over a text: tokens <= (2 bytes +
  pretokens + u) / 3, where `pretokens` is bounded by counting every position a pre-token may start at (whitespace,
  digits, punctuation, a letter after a digit or punctuation, a non-ASCII character) and u counts every pair
  without a merge rule. Computed with numpy over the Arrow buffer of the texts: about a gigabyte a second.
- any other tokenizer (SentencePiece with byte fallback, character level): tokens <= UTF-8 bytes, plus one per
  segment for a SentencePiece word-start marker.

The chat template's own text (the prompt turns, headers, end-of-turn tokens) is bounded the same way once per
prompt, special tokens counting one each. `self_check` compares the bound with exact counts on a sample before it is
trusted; a tokenizer that breaks it (an expanding normalizer, say) is then counted exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SENTINEL = "\x00fusechat-response\x00"
UNBOUNDED = np.iinfo(np.int64).max // 4  # no bound: the conversation must be tokenized
JUNCTION = 2  # pairs and pre-token starts the joins of template text and response may add, per join
POOL_MIN = 4096  # conversations below this are counted in-process

# Byte classes for counting possible pre-token starts.
LETTER, DIGIT, SPACE, OTHER, CONT, LEAD = range(6)
_CLASS = np.full(256, OTHER, dtype=np.uint8)
for _b in range(256):
    c = chr(_b)
    if _b >= 0xC0:
        _CLASS[_b] = LEAD
    elif _b >= 0x80:
        _CLASS[_b] = CONT
    elif c.isascii() and c.isalpha():
        _CLASS[_b] = LETTER
    elif c.isdigit():
        _CLASS[_b] = DIGIT
    elif c.isspace():
        _CLASS[_b] = SPACE
_STARTS = np.isin(np.arange(6), [DIGIT, SPACE, OTHER, LEAD])  # classes whose every byte may start a pre-token


@dataclass
class TextStats:
    """Per text: UTF-8 bytes, possible pre-token starts, adjacent byte pairs without a merge rule."""

    nbytes: np.ndarray
    starts: np.ndarray
    unmerged: np.ndarray


def byte_level_merges(tokenizer: Any) -> np.ndarray | None:
    """For a byte-level BPE tokenizer, a table over byte pairs (b1 << 8 | b2): True where the merge exists. None for
    any other tokenizer (the plain byte bound applies)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or model.get("dropout") or not any(p.get("type") == "ByteLevel" for p in pres):
        return None
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC",):
        return None
    from tokenizers.pre_tokenizers import ByteLevel

    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    assert len(ByteLevel.alphabet()) == 256
    table = np.zeros(1 << 16, dtype=bool)
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if len(left) == 1 and len(right) == 1 and left in byte_of and right in byte_of:
            table[(byte_of[left] << 8) | byte_of[right]] = True
    return table


def _bytes_to_unicode() -> list[str]:
    """GPT-2's map from bytes to printable characters (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def text_stats(texts: pa.Array | pa.ChunkedArray, merges: np.ndarray | None, batch_bytes: int = 1 << 24) -> TextStats:
    """The bound's ingredients for each text (null counts as empty), from the Arrow buffers in batches."""
    if isinstance(texts, pa.ChunkedArray):
        parts = [text_stats(c, merges, batch_bytes) for c in texts.chunks]
        if not parts:
            return TextStats(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
        return TextStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nbytes", "starts", "unmerged")))
    texts = texts.cast(pa.large_string()).fill_null("")
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = (
        np.frombuffer(texts.buffers()[2], dtype=np.uint8) if texts.buffers()[2] is not None else np.zeros(0, np.uint8)
    )
    out = TextStats(np.diff(offsets), np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64))
    i = 0
    while i < len(texts):
        j = int(np.searchsorted(offsets, offsets[i] + batch_bytes, side="right")) - 1
        j = max(j, i + 1)
        lo, hi = offsets[i], offsets[j]
        b = data[lo:hi]
        rel = offsets[i : j + 1] - lo
        cls = _CLASS[b]
        starts = _STARTS[cls]
        if len(b) > 1:
            prev = cls[:-1]
            starts[1:] |= (cls[1:] == LETTER) & (prev != LETTER) & (prev != SPACE)
        first = rel[:-1][np.diff(rel) > 0]
        starts[first] = True
        cs = np.concatenate([[0], np.cumsum(starts, dtype=np.int64)])
        out.starts[i:j] = cs[rel[1:]] - cs[rel[:-1]]
        if merges is None or len(b) < 2:
            unmerged = np.ones(max(len(b) - 1, 0), dtype=bool)
        else:
            unmerged = ~merges[(b[:-1].astype(np.uint16) << 8) | b[1:]]
        cp = np.concatenate([[0], np.cumsum(unmerged, dtype=np.int64)])
        cp = np.append(cp, cp[-1])  # one past the last pair, for an empty last text
        # pairs inside text k: positions rel[k] .. rel[k+1]-2
        end = np.maximum(rel[1:] - 1, rel[:-1])
        out.unmerged[i:j] = cp[end] - cp[rel[:-1]]
        i = j
    return out


class TargetLengths:
    """The target's tokenizer and chat template, for bounding and counting conversation lengths."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.merges = byte_level_merges(tokenizer)
        self.special_tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self.trusted = True  # the bound; False after a failed self-check

    # ------------------------------------------------------------------ bounds
    def prompt_bounds(self, prompts: list[list[dict[str, str]]] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per prompt, an upper bound on the tokens of everything but the response: prompt turns and template. Each
        special token is bounded as one byte of its own (it is one token). `prompts`: message lists, or an Arrow
        column of them (then single user turns are bounded without rendering each: the template's text around
        them is the same for all, once checked on a probe)."""
        if isinstance(prompts, pa.ChunkedArray):
            prompts = prompts.combine_chunks()
        if not isinstance(prompts, pa.Array):
            return self._rendered_bounds(prompts)
        out = np.zeros(len(prompts), dtype=np.int64)
        shape = self._single_turn_shape()
        single = np.zeros(len(prompts), dtype=bool)
        if shape is not None and len(prompts):
            lengths = pc.list_value_length(prompts).fill_null(0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(prompts)
            roles = flat.field("role").to_numpy(zero_copy_only=False)
            offsets = prompts.offsets.to_numpy()[:-1] - prompts.offsets[0].as_py()
            single = lengths == 1
            single[single] = roles[offsets[single]] == "user"
            content = flat.field("content").take(pa.array(offsets[single]))
            s = text_stats(content, self.merges)
            out[single] = shape + self._bound(s.nbytes, s.starts + 2 * JUNCTION, s.unmerged + 2 * JUNCTION, 2)
        rest = np.flatnonzero(~single)
        if len(rest):
            out[rest] = self._rendered_bounds(prompts.take(pa.array(rest)).to_pylist())
        return out

    def _single_turn_shape(self) -> int | None:
        """The bound of the template's own text around a single user turn and the response (None when the template
        does not place the turn's text as it is: such prompts are rendered one by one)."""
        probe = "\x00fusechat-prompt\x00"
        rendered = self.render([{"role": "user", "content": probe}, {"role": "assistant", "content": SENTINEL}])
        loose = self.render([{"role": "user", "content": f" x\n{probe} "}, {"role": "assistant", "content": SENTINEL}])
        if rendered.count(probe) != 1 or rendered.count(SENTINEL) != 1:
            return None
        before, after = rendered.split(probe)
        if loose not in (f"{before} x\n{probe} {after}", f"{before}x\n{probe}{after}"):
            return None
        return int(self._rendered_bounds_of([before + after.replace(SENTINEL, "", 1)])[0])

    def _rendered_bounds(self, prompts: list[list[dict[str, str]]]) -> np.ndarray:
        if not prompts:
            return np.zeros(0, dtype=np.int64)
        convs = [[*messages, {"role": "assistant", "content": SENTINEL}] for messages in prompts]
        rendered = self.tok.apply_chat_template(convs, tokenize=False)
        kept = np.array([r.count(SENTINEL) == 1 for r in rendered])  # else the template rewrote the response
        bounds = self._rendered_bounds_of([r.replace(SENTINEL, "", 1) for r in rendered])
        return np.where(kept, bounds, UNBOUNDED)

    def _rendered_bounds_of(self, texts: list[str]) -> np.ndarray:
        text = pa.array(texts, pa.large_string())
        specials = np.zeros(len(texts), dtype=np.int64)
        for token in self.special_tokens:  # longest first
            specials += pc.count_substring(text, token).to_numpy()
            text = pc.replace_substring(text, token, "\x01")
        s = text_stats(text, self.merges)
        return self._bound(s.nbytes, s.starts, s.unmerged, specials + 1)

    def bounds(self, prompt_bound: np.ndarray, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Upper bounds on the tokens of whole conversations: `prompt_bound` (per row) plus the response's."""
        if not self.trusted:
            return np.full(len(prompt_bound), UNBOUNDED)
        s = text_stats(texts, self.merges)
        return prompt_bound + self._bound(s.nbytes, s.starts + JUNCTION, s.unmerged + JUNCTION, np.ones_like(s.nbytes))

    def _bound(self, nbytes, starts, unmerged, segments) -> np.ndarray:
        if self.merges is None:  # tokens <= bytes, plus a word-start marker per segment
            return (nbytes + segments).astype(np.int64)
        return np.ceil((2 * nbytes + starts + unmerged) / 3).astype(np.int64)

    # ------------------------------------------------------------------ exact
    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def count(self, convs: list[list[dict[str, str]]], workers: int | None = None) -> np.ndarray:
        """Exact tokens of each conversation rendered with the target's template, in worker processes when many."""
        workers = workers or (os.cpu_count() or 1)
        if len(convs) < POOL_MIN or workers < 2:
            return _count(self.tok, convs)
        import multiprocessing

        step = max(256, len(convs) // (workers * 8))
        global _WORKER_TOKENIZER
        _WORKER_TOKENIZER = self.tok  # inherited by the forked workers
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_count_in_worker, [convs[i : i + step] for i in range(0, len(convs), step)]))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def self_check(
        self, prompts: list | pa.Array | pa.ChunkedArray, texts: list[str], log: Callable[[str], None]
    ) -> None:
        """Trust the bound only if it holds on these conversations (a sample of the real ones)."""
        if not texts:
            return
        turns = prompts if isinstance(prompts, list) else prompts.to_pylist()
        exact = self.count([[*p, {"role": "assistant", "content": t}] for p, t in zip(turns, texts, strict=True)])
        bound = self.bounds(self.prompt_bounds(prompts), pa.array(texts, pa.string()))
        if (exact > bound).any():
            self.trusted = False
            log(
                "note: the target tokenizer breaks the length bound on "
                f"{int((exact > bound).sum())} of {len(texts)} sampled responses: every candidate is tokenized"
            )

    def truncate(self, messages: list[dict[str, str]], text: str, max_length: int) -> tuple[str, int] | None:
        """`text` cut at a token boundary so that the conversation fits `max_length` (and its tokens), or None when
        the prompt alone does not fit."""
        room = max_length - int(_count(self.tok, [[*messages, {"role": "assistant", "content": ""}]])[0])
        if room <= 0:
            return None
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        keep = min(room, len(enc["input_ids"]))
        while keep >= 0:
            cut = text[: enc["offset_mapping"][keep - 1][1]] if keep > 0 else ""
            n = int(_count(self.tok, [[*messages, {"role": "assistant", "content": cut}]])[0])
            if n <= max_length:
                return cut, n
            keep -= max(1, n - max_length)
        return None


_WORKER_TOKENIZER: Any = None


def _count_in_worker(convs: list[list[dict[str, str]]]) -> np.ndarray:
    return _count(_WORKER_TOKENIZER, convs)


def _count(tok: Any, convs: list[list[dict[str, str]]]) -> np.ndarray:
    if not convs:
        return np.zeros(0, dtype=np.int64)
    rendered = tok.apply_chat_template(convs, tokenize=False)
    ids = tok(rendered, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
