"""Both engines on two tiny models of different architectures and tokenizers: exact row counts, prompts that do
not fit the context skipped and counted, and greedy equality between vLLM and transformers on a model trained
for a few seconds to answer fixed prompts (where they differ, the first divergent token must be a near-tie).

vLLM starts once (one CLI run loading both models in turn: the first is released before the second loads)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fusechat.config import load_config
from fusechat.demo.tiny import TinySpec, build_model, build_tokenizer, make_tiny, save_tiny
from fusechat.prompts import run_prompts
from fusechat.sample import run_sample
from fusechat.sample.render import render_ids
from fusechat.store import RunStore
from fusechat.tokenizers import load_tokenizer

pytestmark = pytest.mark.slow
FRIENDS = ["Ada", "Bob", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
QA = {f"Who is friend number {i}?": f"Friend {i} is {name}." for i, name in enumerate(FRIENDS)}
# vLLM's CPU attention needs a head size of 32, 64, ...: hidden 64 over 2 heads.
VLLM_SIZES = dict(hidden=64, heads=2, kv_heads=1, layers=2, ffn=128)


def train_tutor(out):
    """A tiny Llama (Llama-3 template, char tokenizer) that answers QA greedily with clear margins: ~200 steps."""
    tok = build_tokenizer("llama3", "char")
    model = build_model(TinySpec(arch="llama", chat="llama3", seed=5, **VLLM_SIZES), tok)
    seqs, answer_masks = [], []
    for question, answer in QA.items():
        prompt = render_ids(tok, [{"role": "user", "content": question}], tok.chat_template)
        reply = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + reply)
        answer_masks.append([0] * len(prompt) + [1] * len(reply))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in answer_masks])
    labels = ids.masked_fill(mask == 0, -100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains far faster on one thread than on shared cores
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    try:
        for _ in range(200):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05
    return save_tiny(model.eval(), tok, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One samples version per engine, from the same config and prompts."""
    root = tmp_path_factory.mktemp("engines")
    tutor = train_tutor(root / "tutor")
    corpus = [f"friend number {i} is {n}. who is it? {n} {i}" for i, n in enumerate(FRIENDS * 20)]
    qwen = make_tiny(
        root / "qwen_bpe", TinySpec(arch="qwen2", chat="chatml", tokenizer="bpe", seed=6, **VLLM_SIZES), corpus=corpus
    )
    rows = [{"q": q} for q in QA] + [{"q": "Who is friend number " + "9" * 200 + "?"}]  # longer than 64 tokens
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # max_num_batched_tokens below the chunk's prompt tokens: vLLM would prefill prompts in parts, which crashes
    # seeded sampling on CPU unless the engine turns chunked prefill off.
    common = {"engine": "vllm", "engine_args": {"max_model_len": 64, "max_num_batched_tokens": 64}, "chunk_size": 4}
    cfg = {
        "name": "eng",
        "workdir": str(root / "runs"),
        "seed": 3,
        "prompts": {
            "sources": [{"name": "p", "path": str(root / "p.jsonl"), "domain": "friends", "fields": {"prompt": "q"}}]
        },
        "sources": [
            {
                "name": "tutor",
                "model": str(tutor),
                "samples": {"friends": 1},
                "sampling": {"temperature": 0.0, "max_tokens": 40},
                **common,
            },
            {
                "name": "qwen",
                "model": str(qwen),
                "samples": {"friends": 2},
                "sampling": {"temperature": 0.8, "max_tokens": 12},
                **common,
            },
        ],
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    store = RunStore(root / "runs" / "eng")
    run_prompts(load_config(root / "cfg.yaml"), store, log=lambda _: None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "sample", "-c", "cfg.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    hf_cfg = load_config(root / "cfg.yaml", ["sources.0.engine=transformers", "sources.1.engine=transformers"])
    hf = run_sample(hf_cfg, store, log=lambda _: None)
    [vllm] = [v for v in store.versions("samples") if v.name != hf.name]
    return {"vllm": vllm, "transformers": hf, "tutor": tutor, "qwen": qwen, "prompts": store.latest("prompts")}


def table(version):
    rows = pq.read_table(version.data).to_pylist()
    return {(r["source"], r["prompt_id"], r["sample_index"]): r for r in rows}


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_each_engine_fills_a_version_with_exact_rows(runs, engine):
    version = runs[engine]
    rows = table(version)
    assert len(rows) == 8 * 1 + 8 * 2 == version.manifest["counts"]["samples"]
    assert len(pq.read_table(version.data)) == len(rows)  # no duplicate (source, prompt_id, sample_index)
    by_source = version.manifest["counts"]["by_source"]
    assert by_source["tutor"]["skipped_too_long"] == by_source["qwen"]["skipped_too_long"] == 1
    assert by_source["qwen"]["samples"] == 16 and by_source["qwen"]["prompts"] == 8
    assert by_source["qwen"]["tokens"] == sum(r["num_tokens"] for k, r in rows.items() if k[0] == "qwen")
    assert version.manifest["config"]["sources"][1]["engine"] == engine
    qwen = [r for k, r in rows.items() if k[0] == "qwen"]
    assert all(1 <= r["num_tokens"] <= 12 for r in qwen)
    assert {r["finish_reason"] for r in qwen} <= {"stop", "length"}
    pairs = {}
    for r in qwen:
        pairs.setdefault(r["prompt_id"], []).append(r["text"])
    assert any(a != b for a, b in pairs.values())  # k samples of one prompt are drawn independently


def test_greedy_text_is_the_same_on_both_engines(runs):
    tok = load_tokenizer(runs["tutor"])
    vllm, hf = table(runs["vllm"]), table(runs["transformers"])
    prompts = {r["prompt_id"]: r["messages"] for r in pq.read_table(runs["prompts"].data).to_pylist()}
    model = None
    for key, expected in hf.items():
        if key[0] != "tutor":
            continue
        question = prompts[key[1]][0]["content"]
        assert expected["text"] == QA[question] and expected["finish_reason"] == "stop"  # the tutor learned it
        got = vllm[key]
        if got["text"] == expected["text"]:
            assert got["num_tokens"] == expected["num_tokens"] == len(QA[question]) + 1  # + <|eot_id|>
            continue
        # Different text: the first divergent token must have been a near-tie for the model.
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(runs["tutor"], dtype=torch.float32).eval()
        prefix = os.path.commonprefix([got["text"], expected["text"]])
        ids = render_ids(tok, prompts[key[1]], tok.chat_template) + tok(prefix, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            top2 = model(torch.tensor([ids])).logits[0, -1].topk(2).values
        assert (top2[0] - top2[1]).item() < 0.05, (question, got["text"], expected["text"])
