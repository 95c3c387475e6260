"""`fusechat.lengths`: the upper bound on a conversation's target tokens never undercounts (byte-level BPE and
character-level tokenizers, every kind of text), is much tighter than bytes for byte-level BPE, and the exact count
is the same in worker processes; truncation cuts at a token boundary to fit."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from fusechat.demo.tiny import build_tokenizer
from fusechat.lengths import TargetLengths, byte_level_merges

WORDS = ["the", "answer", "is", "Python", "def", "return", "x", "42", "3.14", "naïve", "café", "数学", "你好", "🙂"]
PUNCT = [".", ",", "!", "?", "'s", "(", ")", "[", "]", "==", "->", "\n", "\n\n", "  ", "\t", "```", "<|eot_id|>"]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(WORDS))
        elif r < 0.75:
            parts.append(rng.choice(PUNCT))
        elif r < 0.85:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        else:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyzQZ") for _ in range(rng.randint(1, 12))))
        parts.append(rng.choice(["", " ", " ", " ", "\n"]))
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizers():
    rng = random.Random(0)
    corpus = [random_text(rng) for _ in range(300)]
    return {
        "bpe": build_tokenizer("llama3", "bpe", corpus=corpus, vocab_size=600),
        "char": build_tokenizer("chatml", "char"),
        "gemma": build_tokenizer("gemma", "char"),  # trims the turns' text
    }


@pytest.mark.parametrize("kind", ["bpe", "char", "gemma"])
def test_the_bound_never_undercounts(tokenizers, kind):
    tok = tokenizers[kind]
    lengths = TargetLengths(tok)
    assert (lengths.merges is not None) == (kind == "bpe")
    rng = random.Random(1)
    prompts = [
        [{"role": "system", "content": random_text(rng)}, {"role": "user", "content": random_text(rng)}]
        if i % 3 == 0
        else [{"role": "user", "content": random_text(rng) or "hi"}]
        for i in range(400)
    ]
    if kind == "gemma":  # its template rejects system turns
        prompts = [p[-1:] for p in prompts]
    texts = [random_text(rng) for _ in range(400)]
    exact = lengths.count([[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)])
    bound = lengths.bounds(lengths.prompt_bounds(prompts), pa.array(texts))
    assert (bound >= exact).all(), [(t, e, b) for t, e, b in zip(texts, exact, bound, strict=True) if b < e][:3]
    column = pa.array(prompts, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    fast = lengths.bounds(lengths.prompt_bounds(column), pa.array(texts))  # single turns bounded without rendering
    assert (fast >= exact).all()
    if kind != "gemma":  # prompts with a system turn are rendered one by one either way
        rendered = lengths.prompt_bounds(prompts)
        assert (lengths.prompt_bounds(column)[[i % 3 == 0 for i in range(len(prompts))]] == rendered[::3]).all()


def test_on_prose_the_byte_level_bound_is_well_under_the_byte_count():
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    corpus = [" ".join(rng.choice(words) for _ in range(100)) for _ in range(200)]
    lengths = TargetLengths(build_tokenizer("llama3", "bpe", corpus=corpus, vocab_size=2000))
    texts = [" ".join(rng.choice(words) for _ in range(300)) + "." for _ in range(50)]
    prompts = [[{"role": "user", "content": "Write a paragraph."}]] * len(texts)
    bound = lengths.bounds(lengths.prompt_bounds(prompts), pa.array(texts))
    exact = lengths.count([[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)])
    nbytes = np.array([len(t.encode()) for t in texts])
    assert (bound >= exact).all() and (bound < 0.9 * nbytes).all()


def test_exact_counts_are_the_same_in_worker_processes(tokenizers):
    lengths = TargetLengths(tokenizers["bpe"])
    rng = random.Random(2)
    convs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": random_text(rng)}] for _ in range(600)]
    import fusechat.lengths as module

    module.POOL_MIN, before = 100, module.POOL_MIN
    try:
        pooled = lengths.count(convs, workers=2)
    finally:
        module.POOL_MIN = before
    assert pooled.tolist() == lengths.count(convs, workers=1).tolist()


def test_truncate_cuts_at_a_token_boundary_to_fit(tokenizers):
    tok = tokenizers["bpe"]
    lengths = TargetLengths(tok)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    text = " ".join(["the answer is 42."] * 40)
    cut, n = lengths.truncate(messages, text, 60)
    assert text.startswith(cut) and len(cut) < len(text)
    assert n == lengths.count([[*messages, {"role": "assistant", "content": cut}]])[0] <= 60
    assert lengths.truncate([{"role": "user", "content": "x " * 200}], text, 60) is None  # the prompt alone is over


def test_a_template_that_rewrites_the_response_gets_no_bound(tokenizers):
    tok = build_tokenizer("chatml", "char")
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert TargetLengths(tok).prompt_bounds([[{"role": "user", "content": "hi"}]])[0] > 10**12


def test_byte_level_merges_only_for_byte_level_bpe(tokenizers):
    table = byte_level_merges(tokenizers["bpe"])
    assert table is not None and table.shape == (65536,) and table.sum() > 10
    assert table[(ord("t") << 8) | ord("h")]  # "th" is a merge of any English-ish corpus
    assert byte_level_merges(tokenizers["char"]) is None


def test_a_tokenizer_that_breaks_the_bound_is_caught_by_the_self_check():
    from tokenizers import normalizers

    tok = build_tokenizer("chatml", "char")
    tok.backend_tokenizer.normalizer = normalizers.Replace("a", "aaaa")  # every "a" becomes four tokens
    lengths = TargetLengths(tok)
    notes: list[str] = []
    prompts = [[{"role": "user", "content": "hi"}]] * 3
    lengths.self_check(prompts, ["banana bread", "plain", "a" * 50], notes.append)
    assert not lengths.trusted and "breaks the length bound on 2 of 3 sampled responses" in notes[0]
    assert (lengths.bounds(lengths.prompt_bounds(prompts), pa.array(["x", "y", "z"])) > 10**12).all()
    ok = TargetLengths(build_tokenizer("chatml", "char"))
    ok.self_check(prompts, ["banana bread", "plain", "a" * 50], notes.append)
    assert ok.trusted and len(notes) == 1
