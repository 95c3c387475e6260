"""Real tiny training runs for the global batch, kept DPO checkpoints, stored reference log-probs and padding-free
batches. Hardware: any (the multi-process run trains on CPU through `use_cpu: true`, also where a GPU is visible),
except the tests marked `gpu`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.config import load_config
from fusechat.errors import UserError
from fusechat.store import RunStore, StageResult, run_stage
from fusechat.train import hardware, ref_logps

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    sft, dpo = [], []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        prompt = [{"role": "user", "content": f"what is {a}+{b}?"}]
        good = {"role": "assistant", "content": f"{a + b}"}
        bad = {"role": "assistant", "content": f"{a + b + rng.randint(1, 9)}, I think"}
        sft.append({"prompt_id": f"p{i}", "domain": "math", "messages": [*prompt, good], "source": "s", "reward": 1.0})
        dpo.append({"prompt_id": f"p{i}", "domain": "math", "prompt": prompt, "chosen": [good], "rejected": [bad]})
    return sft, dpo


def make_run(root: Path, target: Path, n: int = 32, sft: dict | None = None, dpo: dict | None = None) -> Path:
    """A config plus a hand-made datasets version (the build stage's on-disk contract) and a one-prompt eval set."""
    sft_rows, dpo_rows = rows(n)

    def body(out: Path) -> StageResult:
        for name, data in (("sft", sft_rows), ("dpo", dpo_rows)):
            (out / name).mkdir()
            pq.write_table(pa.Table.from_pylist(data), out / name / "train.parquet")
        return StageResult()

    run_stage(RunStore(root / "runs" / "t"), "datasets", {"n": n}, {}, body, log=lambda m: None)
    (root / "eval.jsonl").write_text(json.dumps({"q": "what is 2+3?", "a": "5"}) + "\n")
    small = {"per_device_train_batch_size": 8, "logging_steps": 1, "max_length": 64, "save_strategy": "no"}
    cfg = {
        "name": "t",
        "workdir": str(root / "runs"),
        "prompts": {"sources": []},
        "target": {"path": str(target)},
        "sft": {**small, "max_steps": 2, "learning_rate": 3e-3, **(sft or {})},
        "dpo": {**small, "max_steps": 2, "learning_rate": 1e-3, "beta": 0.1, **(dpo or {})},
        "eval": {
            "max_new_tokens": 4,
            "sets": [
                {
                    "name": "add",
                    "path": str(root / "eval.jsonl"),
                    "domain": "math",
                    "fields": {"prompt": "q", "answer": "a"},
                }
            ],
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def conversation_tokens(model_dir: Path, sft_rows: list[dict]) -> int:
    from fusechat.tokenizers import load_tokenizer

    tok = load_tokenizer(model_dir)
    return sum(
        len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in sft_rows
    )


# ------------------------------------------------------------------------------------------------ global batch
@pytest.mark.slow
def test_global_batch_128_on_two_cpu_processes_equals_one(tmp_path, tiny_llama):
    """Two optimizer steps of global batch 128 see each of the 256 rows exactly once, on 2 processes as on 1."""
    from fusechat.train.sft import run_sft

    sft = {"global_batch_size": 128, "per_device_train_batch_size": 16, "use_cpu": True}
    cfg_path = make_run(tmp_path, tiny_llama, n=256, sft=sft)
    proc = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "sft", "-c", str(cfg_path), "--set", "sft.num_processes=2"],
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},  # two CPU processes, also on a one-GPU machine
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch=16 x 4 x 2" in proc.stdout
    two = RunStore(tmp_path / "runs" / "t").latest("sft").manifest
    one = run_sft(load_config(cfg_path), RunStore(tmp_path / "runs" / "t"), log=lambda m: None).manifest

    total = conversation_tokens(tiny_llama, rows(256)[0])
    for manifest, world, accumulation in ((two, 2, 4), (one, 1, 8)):
        train = manifest["train"]
        assert train["world_size"] == world and train["global_step"] == 2
        assert (train["per_device_train_batch_size"], train["gradient_accumulation_steps"]) == (16, accumulation)
        assert train["effective_batch"] == 128 and train["tokens"] == total
        assert manifest["config"]["global_batch_size"] == 128


def test_global_batch_misfit_fails_before_training(tmp_path, tiny_llama):
    from fusechat.train.sft import run_sft

    cfg = load_config(make_run(tmp_path, tiny_llama, sft={"global_batch_size": 128, "num_processes": 3}))
    with pytest.raises(UserError, match=r"^sft\.global_batch_size: 128 does not split over 3 training processes"):
        run_sft(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    assert not (tmp_path / "runs" / "t" / "sft").exists()


# ------------------------------------------------------------------------------------------------ DPO checkpoints
@pytest.mark.slow
def test_dpo_checkpoints_survive_commit_and_rotation_and_evaluate_by_name(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from fusechat.cli import app
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    dpo = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1}
    cfg = load_config(make_run(tmp_path, tiny_llama, dpo=dpo))
    store = RunStore(cfg.run_dir)
    run_sft(cfg, store, log=lambda m: None)
    logged: list[str] = []
    version = run_dpo(cfg, store, log=logged.append)

    # the Trainer kept one checkpoint (save_total_limit 1); all three models survive, without optimizer state
    assert version.manifest["checkpoints"] == ["step-2", "step-4", "step-6"]
    assert version.manifest["config"]["keep_checkpoints"] is True
    steps = version.path / "checkpoints"
    assert sorted(p.name for p in steps.iterdir()) == ["step-2", "step-4", "step-6"]
    files = {p.name for p in (steps / "step-2").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "training_args.bin"} and not any("rng" in f for f in files)
    assert json.loads((steps / "step-2" / "config.json").read_text())["use_cache"] is True
    assert not list((tmp_path / "runs" / "t" / "dpo").glob(".partial-*"))

    from transformers import AutoModelForCausalLM

    w2, w6 = (AutoModelForCausalLM.from_pretrained(steps / s).model.norm.weight for s in ("step-2", "step-6"))
    assert (w2 - w6).abs().max().item() > 0  # different points of the run

    r = CliRunner().invoke(app, ["eval", "-c", str(tmp_path / "cfg.yaml"), "--model", "dpo/v001@step-4"])
    assert r.exit_code == 0, r.output
    ev = store.latest("eval")
    assert ev.manifest["counts"]["model"] == "dpo/v001@step-4" and ev.manifest["inputs"] == {"dpo": "v001"}
    assert ev.manifest["config"]["identity"]["path"] == str(steps / "step-4")
    r = CliRunner().invoke(app, ["eval", "-c", str(tmp_path / "cfg.yaml"), "--model", "dpo/v001@step-3"])
    assert r.exit_code == 2 and "dpo/v001 has no checkpoint step-3 (kept: step-2, step-4, step-6)" in r.output


def test_model_refs_resolve_to_versions_and_checkpoints(tmp_path):
    from fusechat.train.checkpoints import resolve_model_ref

    store = RunStore(tmp_path / "run")

    def body(out: Path) -> StageResult:
        (out / "model").mkdir()
        (out / "checkpoints" / "step-100").mkdir(parents=True)
        return StageResult()

    run_stage(store, "dpo", {"a": 1}, {}, body, log=lambda m: None)
    v1 = store.latest("dpo")
    assert resolve_model_ref(store, "dpo") is None and resolve_model_ref(store, "/some/dir") is None
    assert resolve_model_ref(store, "dpo/v001") == ("dpo/v001", v1.path / "model", v1)
    assert resolve_model_ref(store, "dpo/v1@step-100") == ("dpo/v001@step-100", v1.path / "checkpoints/step-100", v1)
    assert resolve_model_ref(store, "dpo@step-100")[0] == "dpo/v001@step-100"
    with pytest.raises(UserError, match=r"^--model dpo/v002: .*v002 is not a complete version"):
        resolve_model_ref(store, "dpo/v002")
    with pytest.raises(UserError, match=r"^--model sft@step-1: no complete sft version"):
        resolve_model_ref(store, "sft@step-1")


# ------------------------------------------------------------------------------------------------ reference log-probs
def test_ref_logps_key_ignores_beta_and_learning_rate_but_not_length_or_data():
    trl = {
        "max_length": 64,
        "beta": 0.1,
        "learning_rate": 1e-6,
        "bf16": False,
        "model_init_kwargs": {"dtype": "float32"},
    }
    key = ref_logps.cache_key("sft-fp", "data-fp", trl, None)
    assert ref_logps.cache_key("sft-fp", "data-fp", {**trl, "beta": 10.0, "learning_rate": 5e-7}, None) == key
    assert ref_logps.cache_key("sft-fp", "data-fp", {**trl, "max_length": 128}, None) != key
    assert ref_logps.cache_key("sft-fp", "other-data", trl, None) != key
    assert ref_logps.cache_key("other-sft", "data-fp", trl, None) != key
    assert ref_logps.cache_key("sft-fp", "data-fp", trl, "{{ messages }}") != key


@pytest.mark.slow
def test_precomputed_ref_logps_are_reused_by_a_beta_sweep(tmp_path, tiny_llama):
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    # on CPU everywhere (fp32): the losses with stored and with recomputed reference log-probs compare exactly
    dpo = {"precompute_ref_log_probs": True, "max_steps": 3, "use_cpu": True}
    cfg_path = make_run(tmp_path, tiny_llama, sft={"use_cpu": True}, dpo=dpo)
    cfg = load_config(cfg_path)
    store = RunStore(cfg.run_dir)
    run_sft(cfg, store, log=lambda m: None)

    first: list[str] = []
    v1 = run_dpo(cfg, store, log=first.append)
    assert v1.manifest["ref_logps"]["source"] == "computed" and "reference log-probs: computed" in first
    stored = pq.read_table(v1.path / ref_logps.FILE)
    assert stored.num_rows == 32 and stored.column_names == list(ref_logps.COLUMNS)

    sweep: list[str] = []
    v2 = run_dpo(load_config(cfg_path, ["dpo.beta=0.5"]), store, log=sweep.append)
    assert v2.manifest["ref_logps"] == {"key": v1.manifest["ref_logps"]["key"], "source": "dpo/v001"}
    assert "reference log-probs: reused from dpo/v001" in sweep
    assert pq.read_table(v2.path / ref_logps.FILE).equals(stored)

    # the same run with the reference model computing on the fly: the same losses
    v3 = run_dpo(load_config(cfg_path, ["dpo.beta=0.5", "dpo.precompute_ref_log_probs=false"]), store, log=print)
    assert "ref_logps" not in v3.manifest

    def losses(v):
        return [h["loss"] for h in json.loads((v.path / "log_history.json").read_text()) if "loss" in h]

    assert losses(v2) == pytest.approx(losses(v3), rel=1e-4)
    assert losses(v2)[1:] != pytest.approx(losses(v1)[1:], rel=1e-3)  # beta did change the run


# ------------------------------------------------------------------------------------------------ padding-free
@pytest.mark.slow
def test_padding_free_batches_give_the_padded_loss(tmp_path, tiny_llama):
    import torch
    from datasets import Dataset

    from fusechat.train import sft
    from fusechat.train.worker import load_target_tokenizer

    data = sft.prepare(Dataset.from_list(rows(8)[0]))
    trl = hardware.effective_args("sft", {"max_length": 64, "per_device_train_batch_size": 8}, hardware.CPU, 1, 0)
    losses, shapes = {}, {}
    for flat in (False, True):
        job = {"model": str(tiny_llama), "lora": None, "output_dir": str(tmp_path / f"o{flat}"), "trl": trl}
        trainer = sft.make_trainer(
            {**job, "padding_free": flat}, data, load_target_tokenizer(str(tiny_llama), None), []
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        shapes[flat] = tuple(batch["input_ids"].shape)
        trainer.model.eval()
        with torch.no_grad():
            losses[flat] = trainer.compute_loss(trainer.model, batch).item()
    assert shapes[True][0] == 1 and shapes[False][0] == 8  # one flattened row vs eight padded ones
    assert shapes[True][1] < 8 * shapes[False][1]  # no padding
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_run_uses_the_planned_defaults(tmp_path, tiny_llama):
    from fusechat.train.sft import run_sft

    cfg = load_config(make_run(tmp_path, tiny_llama))
    version = run_sft(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    hw, decided, train = hardware.detect(), version.manifest["defaults"], version.manifest["train"]
    assert version.manifest["hardware"]["device"] == "cuda" and version.manifest["hardware"]["memory_gib"] > 0
    assert version.manifest["config"]["trl"]["bf16"] is hw.bf16
    assert train["dtype"] == decided["dtype"]["value"] == "float32"  # one process: plain DDP keeps fp32 weights
    assert train["attn_implementation"] == decided["attn_implementation"]["value"]
    assert train["gradient_checkpointing"] is False and train["use_liger_kernel"] is bool(hw.liger)


@pytest.mark.gpu
@pytest.mark.slow
def test_liger_kernels_keep_the_sigmoid_norm_loss(tmp_path, tiny_llama):
    """TRL 1.16 applies only Liger's layer kernels in DPO: the logged loss is still the length-normalised one."""
    pytest.importorskip("liger_kernel")
    import torch
    import torch.nn.functional as F
    from datasets import Dataset

    from fusechat.train import dpo
    from fusechat.train.worker import load_target_tokenizer

    pairs = rows(8)[1]
    user = {"per_device_train_batch_size": 8, "max_length": 64, "beta": 2.0, "loss_type": "sigmoid_norm"}
    user.update(max_steps=1, learning_rate=0.0, logging_steps=1, save_strategy="no", use_liger_kernel=True)
    job = {"model": str(tiny_llama), "lora": None, "output_dir": str(tmp_path / "o")}
    job["trl"] = hardware.effective_args("dpo", user, hardware.detect(), 1, seed=0)
    tok = load_target_tokenizer(str(tiny_llama), None)
    trainer = dpo.make_trainer(job, dpo.prepare(Dataset.from_list(pairs)), tok, [])
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference copy, so the log-ratios are not zero
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.train()  # applies the Liger kernels; one step over all 8 pairs, learning rate 0
    logged = trainer.state.log_history[0]["loss"]

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()

    def seq_logps(model):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        lp = logits.float()[:, :-1].log_softmax(-1)
        return (lp.gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(1), mask.sum(1)

    policy, lengths = seq_logps(trainer.model)
    ref, _ = seq_logps(trainer.ref_model)
    chosen, rejected = ((policy - ref) / lengths).chunk(2)
    norm = -F.logsigmoid(2.0 * (chosen - rejected)).mean().item()
    plain_chosen, plain_rejected = (policy - ref).chunk(2)
    plain = -F.logsigmoid(2.0 * (plain_chosen - plain_rejected)).mean().item()
    assert trainer.args.use_liger_kernel and trainer.args.liger_kernel_config["fused_linear_cross_entropy"] is False
    assert logged == pytest.approx(norm, rel=0.03) and abs(logged - plain) > 0.1 * abs(plain - norm)
