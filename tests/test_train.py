"""Training stages: hardware defaults, prompt/completion conversion, launch command (no models); then real tiny
SFT/DPO runs: loss goes down, the model generates, DPO widens the chosen-rejected margin, sigmoid_norm matches a
hand computation, the assistant-only mask, resume after a kill, 2-process data-parallel SFT, one-line errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.errors import UserError
from fusechat.store import RunStore, StageResult, run_stage
from fusechat.train import hardware, launch
from fusechat.train.sft import to_prompt_completion
from fusechat.train.worker import last_checkpoint

CPU = hardware.Hardware("cpu", 0, False, "cpu")
GPU = hardware.Hardware("cuda", 8, True, "NVIDIA H100")
# One OpenMP thread: on a shared 2-core machine two spinning threads make a tiny model ~50x slower.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ pure cores
def test_cpu_defaults_fp32_no_checkpointing_user_keys_win():
    args = hardware.effective_args("sft", {"learning_rate": 1e-5, "save_strategy": False}, CPU, 1, seed=7)
    assert args["bf16"] is False and args["gradient_checkpointing"] is False
    assert args["use_cpu"] is True and args["dataloader_pin_memory"] is False
    assert args["report_to"] == "none" and args["seed"] == 7 and args["learning_rate"] == 1e-5
    assert args["save_strategy"] == "no"  # YAML's bare `no` is false


def test_gpu_defaults_bf16_checkpointing_and_ddp():
    args = hardware.effective_args("dpo", {"report_to": "wandb"}, GPU, 8, seed=1)
    assert args["bf16"] is True and args["gradient_checkpointing"] is True and "use_cpu" not in args
    assert args["ddp_find_unused_parameters"] is False and args["report_to"] == "wandb"
    assert hardware.effective_args("dpo", {"fp16": True}, GPU, 1, seed=1)["bf16"] is False


def test_bf16_without_support_is_an_error_naming_the_key():
    with pytest.raises(UserError, match=r"^sft\.bf16: true, but this machine has no GPU"):
        hardware.effective_args("sft", {"bf16": True}, CPU, 1, seed=0)
    with pytest.raises(UserError, match=r"^dpo\.bf16: true, but V100 does not support bf16"):
        hardware.effective_args("dpo", {"bf16": True}, hardware.Hardware("cuda", 1, False, "V100"), 1, seed=0)


def test_prompt_completion_splits_off_the_last_assistant_turn():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to_prompt_completion({"messages": msgs}) == {"prompt": msgs[:2], "completion": msgs[2:]}
    with pytest.raises(ValueError, match="prompt_id p9: the last message must be an assistant turn"):
        to_prompt_completion({"prompt_id": "p9", "messages": msgs[:2]})


def test_launch_command_on_cpu_uses_multi_gpu_with_use_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv, env = launch.command(tmp_path / "job.json", 2, None, CPU)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" not in argv
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv
    assert argv[-3:] == ["-m", "fusechat.train.worker", str(tmp_path / "job.json")]
    assert env["ACCELERATE_USE_CPU"] == "true" and env["OMP_NUM_THREADS"] == "1"
    zero3 = launch.resolve_config("zero3", "sft.accelerate_config")
    assert zero3.is_file() and "zero_stage: 3" in zero3.read_text()
    argv, _ = launch.command(tmp_path / "job.json", 1, zero3, GPU)
    assert argv[argv.index("--config_file") + 1] == str(zero3) and "--num_processes" not in argv
    with pytest.raises(UserError, match=r"^dpo\.accelerate_config: 'zero9' is neither a file nor one of"):
        launch.resolve_config("zero9", "dpo.accelerate_config")
    monkeypatch.setenv(launch.EXTRA_ARGS_ENV, "--num_machines 2 --machine_rank 1 --main_process_ip node0")
    assert launch.machine_rank() == 1 and launch.needs_launch(1, None)


def test_last_checkpoint_skips_one_killed_while_saving(tmp_path):
    # the Trainer writes trainer_state.json last and not atomically: missing or truncated, the save was cut short
    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, ""), (10, '{"global_step": 1')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == (tmp_path / "checkpoint-4", 4)
    assert last_checkpoint(tmp_path / "none") == (None, 0)


# ------------------------------------------------------------------------------------------------ tiny runs
def arithmetic_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    sft, dpo = [], []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        prompt = [{"role": "user", "content": f"what is {a}+{b}?"}]
        good = {"role": "assistant", "content": f"{a + b}"}
        bad = {"role": "assistant", "content": f"{a + b + rng.randint(1, 9)}, I think"}
        sft.append({"prompt_id": f"p{i}", "domain": "math", "messages": [*prompt, good], "source": "s", "reward": 1.0})
        dpo.append(
            {
                "prompt_id": f"p{i}",
                "domain": "math",
                "prompt": prompt,
                "chosen": [good],
                "rejected": [bad],
                "source": "s",
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
            }
        )
    return sft, dpo


def make_run(root: Path, target: Path, n: int = 32, **sections) -> Path:
    """A config plus a hand-made datasets version (the build stage's on-disk contract)."""
    sft, dpo = arithmetic_rows(n)

    def body(out: Path) -> StageResult:
        for name, rows in (("sft", sft), ("dpo", dpo)):
            (out / name).mkdir()
            pq.write_table(pa.Table.from_pylist(rows), out / name / "train.parquet")
        return StageResult(counts={"sft": len(sft), "dpo": len(dpo)})

    run_stage(RunStore(root / "runs" / "t"), "datasets", {"n": n}, {}, body, log=lambda m: None)
    small = {"per_device_train_batch_size": 8, "logging_steps": 1, "max_length": 64, "save_strategy": "no"}
    cfg = {
        "name": "t",
        "workdir": str(root / "runs"),
        "prompts": {"sources": []},
        "target": {"path": str(target)},
        "sft": {**small, "max_steps": 8, "learning_rate": 3e-3, **sections.get("sft", {})},
        "dpo": {**small, "max_steps": 8, "learning_rate": 1e-3, "beta": 0.1, **sections.get("dpo", {})},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def margins(model_dir: Path, pairs: list[dict]) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), completion tokens only, computed by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusechat.tokenizers import load_tokenizer

    tok, model = load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt, completion) -> float:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            lp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        return lp[len(p) - 1 :].sum().item()

    return sum(logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in pairs) / len(pairs)


@pytest.mark.cpu_only
@pytest.mark.slow
def test_sft_then_dpo(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from fusechat.config import load_config
    from fusechat.tokenizers import load_tokenizer
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    cfg = load_config(make_run(tmp_path, tiny_llama))
    store = RunStore(cfg.run_dir)
    sft = run_sft(cfg, store, log=lambda m: None)
    train = sft.manifest["train"]
    first_loss = json.loads((sft.path / "log_history.json").read_text())[0]["loss"]
    assert train["final_loss"] < first_loss - 0.5 and train["world_size"] == 1 and train["global_step"] == 8
    assert train["tokens_per_s"] > 0 and sft.manifest["inputs"] == {"datasets": "v001"}
    trl = sft.manifest["config"]["trl"]
    assert trl["bf16"] is False and trl["use_cpu"] is True and trl["learning_rate"] == 3e-3
    assert sorted(p.name for p in sft.path.iterdir()) == ["log_history.json", "manifest.json", "model"]
    assert (sft.path / "model" / "chat_template.jinja").is_file()

    tok, model = load_tokenizer(sft.path / "model"), AutoModelForCausalLM.from_pretrained(sft.path / "model")
    assert model.config.use_cache is True
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "what is 3+4?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert run_sft(cfg, store, log=lambda m: None).name == "v001"  # same inputs + config: cache hit

    pairs = arithmetic_rows(32)[1][:8]
    before = margins(sft.path / "model", pairs)
    dpo = run_dpo(cfg, store, log=lambda m: None)
    assert dpo.manifest["inputs"] == {"datasets": "v001", "sft": "v001"}
    assert margins(dpo.path / "model", pairs) > before + 1.0
    assert dpo.manifest["train"]["reward_accuracy"] > 0.5 and dpo.manifest["train"]["reward_margin"] > 0


@pytest.mark.slow
def test_sigmoid_norm_matches_hand_computation_and_differs_from_sigmoid(tmp_path, tiny_llama):
    import torch
    import torch.nn.functional as F
    from datasets import load_dataset

    from fusechat.train import dpo
    from fusechat.train.worker import load_target_tokenizer

    make_run(tmp_path, tiny_llama)
    files = [str(next((tmp_path / "runs" / "t" / "datasets").glob("v*/dpo/train.parquet")))]
    job = {
        "model": str(tiny_llama),
        "lora": None,
        "output_dir": str(tmp_path / "out"),
        "trl": hardware.effective_args(
            "dpo",
            {"per_device_train_batch_size": 4, "max_length": 64, "beta": 2.0, "loss_type": "sigmoid"},
            CPU,
            1,
            seed=0,
        ),
    }
    tok = load_target_tokenizer(str(tiny_llama), None)
    trainer = dpo.make_trainer(job, dpo.prepare(load_dataset("parquet", data_files=files, split="train")), tok, [])
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference copy, so the log-ratios are not zero
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    losses = {}
    for loss_type in ("sigmoid", "sigmoid_norm"):
        trainer.loss_types = [loss_type]  # same trainer, same batch, only the loss differs
        with torch.no_grad():
            losses[loss_type] = trainer.compute_loss(trainer.model, batch).item()

    def seq_logps(model):
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()
        with torch.no_grad():
            lp = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
        return (lp.gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(1), mask.sum(1)

    policy, lengths = seq_logps(trainer.model)
    ref, _ = seq_logps(trainer.ref_model)
    per_token = (policy - ref) / lengths
    chosen, rejected = per_token.chunk(2)
    hand = -F.logsigmoid(2.0 * (chosen - rejected)).mean().item()
    assert losses["sigmoid_norm"] == pytest.approx(hand, rel=1e-4)
    assert abs(losses["sigmoid_norm"] - losses["sigmoid"]) > 1e-3


@pytest.mark.slow
def test_assistant_only_mask_without_generation_markers(tmp_path, tiny_llama):
    from datasets import Dataset

    from fusechat.train import sft
    from fusechat.train.worker import load_target_tokenizer

    template = load_target_tokenizer(str(tiny_llama), None).chat_template
    plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" in template and "{% generation %}" not in plain
    tok = load_target_tokenizer(str(tiny_llama), plain)
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4, surely"},
    ]
    job = {
        "model": str(tiny_llama),
        "lora": None,
        "output_dir": str(tmp_path / "out"),
        "trl": hardware.effective_args("sft", {"max_length": 128}, CPU, 1, seed=0),
    }
    data = sft.prepare(Dataset.from_list([{"prompt_id": "p", "messages": conversation}]))
    trainer = sft.make_trainer(job, data, tok, [])
    row = trainer.train_dataset[0]
    full = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert row["input_ids"] == full
    trained = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tok.decode(trained) == "4, surely<|eot_id|>"
    n = len(trained)
    assert row["labels"][-n:] == full[-n:] and set(row["labels"][:-n]) == {-100}


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_llama):
    from fusechat.config import load_config
    from fusechat.train.sft import run_sft

    cfg_path = make_run(tmp_path, tiny_llama, sft={"max_steps": 6, "save_strategy": "steps", "save_steps": 2})
    script = textwrap.dedent(f"""
        import os, signal
        from transformers import TrainerCallback
        from fusechat.config import load_config
        from fusechat.store import RunStore
        from fusechat.train.sft import run_sft

        class KillAfterFirstCheckpoint(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                os.kill(os.getpid(), signal.SIGKILL)

        cfg = load_config({str(cfg_path)!r})
        run_sft(cfg, RunStore(cfg.run_dir), callbacks=[KillAfterFirstCheckpoint()])
    """)
    killed = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (partial,) = (tmp_path / "runs" / "t" / "sft").glob(".partial-*")
    assert last_checkpoint(partial / "checkpoints")[1] == 2

    cfg = load_config(cfg_path)
    version = run_sft(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    train = version.manifest["train"]
    assert train["resumed_from_step"] == 2 and train["steps_run"] == 4 and train["global_step"] == 6
    assert not partial.exists() and not (version.path / "checkpoints").exists()


@pytest.mark.cpu_only
@pytest.mark.slow
def test_killed_after_the_last_checkpoint_ends_at_max_steps_with_the_clean_weights(tmp_path, tiny_llama):
    """The Trainer, resumed from the checkpoint of its last step, used to take one step more (max_steps 10 ended
    at 11 with other weights; a constant schedule shows it). Now it ends at 10 with the weights, loss and token
    count of an uninterrupted run. CPU: the same seed gives the same weights."""
    from safetensors.torch import load_file

    from fusechat.config import load_config
    from fusechat.train.sft import run_sft

    sft = {"max_steps": 10, "save_strategy": "steps", "save_steps": 5, "lr_scheduler_type": "constant"}
    runs = {}
    for name in ("clean", "killed"):
        (tmp_path / name).mkdir()
        cfg_path = make_run(tmp_path / name, tiny_llama, sft=sft)  # 32 rows, 4 steps an epoch: 10 is mid-epoch
        if name == "killed":
            script = textwrap.dedent(f"""
                import os, signal
                from transformers import TrainerCallback
                from fusechat.config import load_config
                from fusechat.store import RunStore
                from fusechat.train.sft import run_sft

                class KillAfterLastCheckpoint(TrainerCallback):
                    def on_save(self, args, state, control, **kw):
                        if state.global_step == 10:
                            os.kill(os.getpid(), signal.SIGKILL)

                cfg = load_config({str(cfg_path)!r})
                run_sft(cfg, RunStore(cfg.run_dir), callbacks=[KillAfterLastCheckpoint()])
            """)
            killed = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True)
            assert killed.returncode == -9, killed.stderr[-2000:]
            (partial,) = (tmp_path / name / "runs" / "t" / "sft").glob(".partial-*")
            assert last_checkpoint(partial / "checkpoints")[1] == 10
        cfg = load_config(cfg_path)
        runs[name] = run_sft(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    clean, resumed = runs["clean"].manifest["train"], runs["killed"].manifest["train"]
    assert resumed["resumed_from_step"] == 10 and resumed["steps_run"] == 0 and resumed["global_step"] == 10
    assert resumed["tokens"] == clean["tokens"] and resumed["train_loss"] == pytest.approx(clean["train_loss"])
    a, b = (load_file(str(runs[n].path / "model" / "model.safetensors")) for n in ("clean", "killed"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


@pytest.mark.cpu_only
@pytest.mark.slow
def test_two_process_cpu_sft_is_data_parallel(tmp_path, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    cfg = make_run(tmp_path, tiny_qwen2, sft={"max_steps": 3, "per_device_train_batch_size": 4})
    proc = subprocess.run(
        [sys.executable, "-m", "fusechat.cli", "sft", "-c", str(cfg), "--set", "sft.num_processes=2"],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = RunStore(tmp_path / "runs" / "t").latest("sft")
    train = version.manifest["train"]
    assert train["world_size"] == 2 and train["global_step"] == 3
    assert train["tokens"] > 0 and version.manifest["config"]["num_processes"] == 2
    model = AutoModelForCausalLM.from_pretrained(version.path / "model")
    assert model.config.model_type == "qwen2"


@pytest.mark.slow
def test_lora_adapter_kept_when_not_merged(tmp_path, tiny_llama):
    from fusechat.config import load_config
    from fusechat.train.sft import run_sft

    cfg = load_config(make_run(tmp_path, tiny_llama, sft={"max_steps": 2, "lora": {"r": 4, "merge": False}}))
    version = run_sft(cfg, RunStore(cfg.run_dir), log=lambda m: None)
    files = {p.name for p in (version.path / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= files
    assert "model.safetensors" not in files and version.manifest["config"]["lora"]["r"] == 4


# ------------------------------------------------------------------------------------------------ CLI errors
def cli(*args: str):
    from typer.testing import CliRunner

    from fusechat.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.cpu_only
@pytest.mark.slow
def test_errors_are_one_line_exit_2_before_training(tmp_path, tiny_llama):
    cfg = str(make_run(tmp_path, tiny_llama))
    sft_dir = tmp_path / "runs" / "t" / "sft"

    r = cli("sft", "-c", cfg, "--set", "sft.bf16=true")
    assert r.exit_code == 2 and "sft.bf16: true, but this machine has no GPU" in r.output
    r = cli("sft", "-c", cfg, "--input", "datasets=v009")
    assert r.exit_code == 2 and "--input datasets=v009" in r.output and "does not exist" in r.output
    r = cli("dpo", "-c", cfg)
    assert r.exit_code == 2 and "no complete sft version" in r.output

    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_llama, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    r = cli("sft", "-c", cfg, "--set", f"target.path={no_tok}")
    assert r.exit_code == 2 and f"target.path: cannot load a tokenizer from {no_tok}" in r.output
    r = cli("sft", "-c", cfg, "--set", "sft.lr_scheduler_type=bogus")
    assert r.exit_code == 2 and "sft: invalid TRL SFTConfig arguments" in r.output
    assert not sft_dir.exists() or not any(sft_dir.glob("v*"))
