"""`fusechat score` at recipe scale on tiny stand-ins: the ArmoRM layout without remote code (scores checked against
the published formula computed here), truncation that keeps the prompt, rows that fail alone, the truncation flag
reaching `build`, and several scoring workers (CPU processes here; the device plan is tested on simulated GPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hand_samples import sample_row, write_samples

from fusechat.config import RewardModelConfig, load_config
from fusechat.demo.tiny import TEMPLATES
from fusechat.errors import UserError
from fusechat.score.reward_model import RewardModel, check_reward_model, conversation
from fusechat.shards import ShardSpec
from fusechat.store import RunStore
from fusechat.workers import devices_for, local_slot

HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"  # the published gating pattern


@pytest.fixture(scope="module")
def tiny_armorm(tiny_dir) -> Path:
    from fusechat.demo.tiny import make_tiny_armorm

    out = tiny_dir / "armorm"
    if not (out / "config.json").exists():
        make_tiny_armorm(out)
    return out


def published_scores(path: Path, convs: list[list[dict[str, str]]]) -> list[float]:
    """ArmoRM's formula over the saved tensors, one unpadded conversation at a time, in float32: transformers'
    LlamaModel for the hidden states, plain torch for the head, the model card's way of tokenising."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tensors = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    config = json.loads((path / "config.json").read_text())
    backbone = LlamaModel(LlamaConfig.from_pretrained(path))
    backbone.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    backbone.eval()
    tok = AutoTokenizer.from_pretrained(path)
    pattern = tok.encode(HEADER, add_special_tokens=False)
    n_layers = config["gating_n_hidden"] + 1
    out = []
    for conv in convs:
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
        start = max(j for j in range(len(ids) - len(pattern) + 1) if ids[j : j + len(pattern)] == pattern)
        x = hidden[start]
        for k in range(n_layers):
            x = x @ tensors[f"gating.layers.{k}.weight"].T + tensors[f"gating.layers.{k}.bias"]
            x = torch.relu(x) if k < n_layers - 1 else x
        gate = torch.softmax(x / config["gating_temperature"], dim=0) * tensors["gating.logit_scale"][0]
        rewards = hidden[-1] @ tensors["regression_layer.weight"].T
        out.append(float((gate * (rewards @ tensors["reward_transform_matrix"])).sum()))
    return out


def _convs() -> list[list[dict[str, str]]]:
    convs = [
        conversation([{"role": "user", "content": "question " * (1 + i % 4)}], "word " * (i * 3 % 17)) for i in range(9)
    ]
    # several turns: the gate reads the LAST assistant header
    convs.append(
        conversation(
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and now?"},
            ],
            "now this",
        )
    )
    convs.append(conversation([{"role": "user", "content": "hi"}], "the pad token <|pad|> inside"))
    return convs


@pytest.mark.parametrize("side", ["right", "left"])
def test_armorm_layout_scores_as_the_published_formula(tiny_armorm, side):
    check_reward_model(RewardModelConfig(path=str(tiny_armorm)))  # no trust_remote_code needed
    rm = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="float32", padding_side=side))
    convs = _convs()
    want = published_scores(tiny_armorm, convs)
    assert max(want) - min(want) > 0.1  # the stand-in's scores vary: the comparison means something
    for batch_size in (1, 2, 5, len(convs)):
        got = rm.score(convs, batch_size=batch_size)
        assert got.verdicts == ["ok"] * len(convs)
        assert max(abs(a - b) for a, b in zip(got.rewards, want, strict=True)) < 1e-5, batch_size


def test_armorm_loads_natively_whatever_trust_remote_code_says(tiny_armorm):
    from transformers import AutoModelForSequenceClassification

    # the checkpoint's own code cannot run on transformers 5, as with the real one
    with pytest.raises(ImportError, match="LLAMA_INPUTS_DOCSTRING"):
        AutoModelForSequenceClassification.from_pretrained(tiny_armorm, trust_remote_code=True)
    convs = _convs()[:3]
    plain = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="float32")).score(convs).rewards
    trusted = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="float32", trust_remote_code=True))
    assert trusted.score(convs).rewards == pytest.approx(plain, abs=1e-6)


def test_armorm_head_dtype(tiny_armorm):
    head = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="bfloat16")).model
    assert head.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {head.regression_layer.weight.dtype, head.gating.layers[0].weight.dtype} == {torch.float32}
    assert head.reward_transform_matrix.dtype == torch.float32 and head.gating.logit_scale.item() == pytest.approx(1.3)
    published = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="bfloat16", head_dtype="model")).model
    assert published.regression_layer.weight.dtype == torch.bfloat16


def test_armorm_needs_the_llama3_assistant_header(tiny_armorm):
    with pytest.raises(UserError, match=r"^score.reward_model.chat_template: .* gates on the assistant header"):
        RewardModel(RewardModelConfig(path=str(tiny_armorm), chat_template=TEMPLATES["chatml"]))


def test_armorm_truncation_keeps_the_gate(tiny_armorm):
    rm = RewardModel(RewardModelConfig(path=str(tiny_armorm), dtype="float32", max_length=64))
    long = conversation([{"role": "user", "content": "a question"}], "a long answer " * 20)
    got = rm.score([long, conversation([{"role": "user", "content": "q" * 70}], "a")])
    assert got.verdicts == ["truncated", "prompt_too_long"] and got.rewards[1] is None
    cut = rm.encode([long]).ids[0]
    assert len(cut) == 64 and got.rewards[0] == pytest.approx(rm.forward([cut])[0], abs=1e-6)


# --------------------------------------------------------------------------------------------- the stage
# A response holding FAULT gets an assistant header without the blank line: ArmoRM then finds no gating position
# and raises inside its forward pass, for that row only.
FAULTY_TEMPLATE = TEMPLATES["llama3"].replace(
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}",
    "{% if 'FAULT' in message['content'] %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n' }}"
    "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{% endif %}",
)
PROMPTS = ["Tell me about cats.", "Tell me about dogs.", "Tell me about " + "very " * 40 + "long things."]
RESPONSES = ["A short answer.", "Another answer, a bit longer.", "A FAULT in the model.", "Long. " * 30]


def _world(root: Path, armorm: Path, **rm_extra) -> tuple:
    from fusechat.prompts import read_prompts, run_prompts

    (root / "chat.jsonl").write_text("".join(json.dumps({"q": q}) + "\n" for q in PROMPTS))
    (root / "template.jinja").write_text(FAULTY_TEMPLATE)
    rm = {"path": str(armorm), "dtype": "float32", "max_length": 96, "chat_template": str(root / "template.jinja")}
    cfg = {
        "name": "t",
        "workdir": str(root / "runs"),
        "prompts": {
            "sources": [{"name": "chat", "path": str(root / "chat.jsonl"), "domain": "chat", "fields": {"prompt": "q"}}]
        },
        "score": {"reward_model": {**rm, **rm_extra}, "shard_size": 100},
        "build": {"max_length": None, "margin": [0.0, 10.0]},
    }
    (root / "cfg.yaml").write_text(json.dumps(cfg))
    cfg = load_config(root / "cfg.yaml", check_trl=False)
    store = RunStore(cfg.run_dir)
    prompts = run_prompts(cfg, store, log=lambda _: None)
    rows = [
        sample_row(p["prompt_id"], source, k, text)
        for p in read_prompts(prompts).to_pylist()
        for source in ("alpha", "beta")
        for k, text in enumerate(RESPONSES)
    ]
    write_samples(store, prompts, rows)
    return cfg, store


def _key(r: dict) -> tuple:
    return (r["prompt_id"], r["source"], r["sample_index"])


@pytest.mark.slow
def test_score_completes_with_a_too_long_prompt_and_a_faulty_row_and_build_drops_them(tmp_path, tiny_armorm):
    from fusechat.build import run_build
    from fusechat.score.stage import run_score

    cfg, store = _world(tmp_path, tiny_armorm)
    logs: list[str] = []
    version = run_score(cfg, store, log=logs.append)  # one chunk holds every row
    scores = pq.read_table(version.data).to_pylist()
    assert len(scores) == 24
    long_prompt = {r["prompt_id"] for r in scores if r["verdict"] == "reward:prompt_too_long"}
    assert len(long_prompt) == 1
    for r in scores:
        text = RESPONSES[r["sample_index"]]
        if r["prompt_id"] in long_prompt:
            assert (r["verdict"], r["reward"], r["truncated"]) == ("reward:prompt_too_long", None, True)
        elif "FAULT" in text:
            assert (r["verdict"], r["reward"], r["reward_tokens"]) == ("reward:error", None, None)
        elif text.startswith("Long"):
            assert r["verdict"] == "reward:truncated" and r["truncated"] and r["reward_tokens"] == 96
        else:
            assert r["verdict"] == "reward:ok" and isinstance(r["reward"], float) and not r["truncated"]
    counts = version.manifest["counts"]
    assert counts["by_verdict"] == {
        "reward:error": 4,
        "reward:ok": 8,
        "reward:prompt_too_long": 8,
        "reward:truncated": 4,
    }
    assert counts["reward_null"] == 12 and counts["truncated"] == 12
    assert any("not scored; first: error" in m and "gating token pattern" in m for m in logs)

    stats = json.loads((run_build(cfg, store, log=lambda _: None).path / "stats.json").read_text())
    assert stats["responses"]["excluded"] == {"null_reward": 12, "reward_truncated": 4}


@pytest.mark.slow
def test_two_workers_score_disjoint_chunks_like_one(tmp_path, tiny_armorm):
    from fusechat.score.stage import run_score

    cfg, store = _world(tmp_path, tiny_armorm)
    cfg.score.shard_size = 5
    one = run_score(cfg, store, log=lambda _: None)
    cfg.score.reward_model.workers = 2
    logs: list[str] = []
    two = run_score(cfg, store, force=True, log=logs.append)
    assert two.name != one.name and "scoring on cpu, cpu" in logs
    a = {_key(r): r for r in pq.read_table(one.data).to_pylist()}
    b = {_key(r): r for r in pq.read_table(two.data).to_pylist()}
    assert a.keys() == b.keys() and len(a) == 24
    for k in a:
        assert a[k]["verdict"] == b[k]["verdict"]
        assert a[k]["reward"] == pytest.approx(b[k]["reward"], abs=1e-5)
    workers = two.manifest["timings"]["workers"]
    assert len(workers) == 2 and sum(workers.values()) == 24  # two processes, 3 + 2 chunks
    assert sorted(workers.values()) == [10, 14]


# --------------------------------------------------------------------------------------------- device plan
def test_local_slot_from_launchers_and_shards():
    two = ShardSpec(2, 2)
    assert local_slot({}, ShardSpec()) == (0, 1)
    assert local_slot({}, two) == (1, 2)  # hand-started --shard jobs share the machine
    assert local_slot({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, two) == (3, 4)
    assert local_slot({"SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "7"}, two) == (1, 4)
    assert local_slot({"SLURM_JOB_ID": "7", "SLURM_LOCALID": "0"}, two) == (0, 1)  # a batch script: the node is its
    assert local_slot({"CUDA_VISIBLE_DEVICES": "4,5"}, two) == (0, 1)  # GPUs chosen for the job: all of them


def test_devices_on_simulated_machines():
    assert devices_for(0, 0, 1) == ["cpu"] and devices_for(0, 0, 1, workers=2) == ["cpu", "cpu"]
    assert devices_for(8, 0, 1) == [f"cuda:{i}" for i in range(8)]
    # two shard processes on an 8-GPU node: disjoint halves
    assert devices_for(8, 0, 2) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert devices_for(8, 1, 2) == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    assert [devices_for(8, s, 3) for s in range(3)] == [
        ["cuda:0", "cuda:1"],
        ["cuda:2", "cuda:3", "cuda:4"],
        ["cuda:5", "cuda:6", "cuda:7"],
    ]
    # more jobs than GPUs: one GPU each, spread
    assert [devices_for(2, s, 4) for s in range(4)] == [["cuda:0"], ["cuda:1"], ["cuda:0"], ["cuda:1"]]
    assert devices_for(1, 0, 2) == devices_for(1, 1, 2) == ["cuda:0"]  # one GPU: both on it (say so)
    assert devices_for(4, 0, 1, workers=6) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    # 8 GPUs, srun with 8 tasks on the node: one GPU per task
    plan = [
        devices_for(8, *local_slot({"SLURM_LOCALID": str(i), "SLURM_STEP_TASKS_PER_NODE": "8"}, ShardSpec()))
        for i in range(8)
    ]
    assert plan == [[f"cuda:{i}"] for i in range(8)]
