"""Training defaults as pure decisions on simulated hardware (no GPU needed; hardware: any): bf16 weights only where
the optimizer keeps fp32 master weights, attention kernel by installation and model family, Liger, gradient
checkpointing from the memory estimate, padding-free SFT, the global batch split over 1, 2, 8 and 16 processes, the
launch strategy read from the shipped accelerate configs, model facts from config.json, checkpoint names."""

from __future__ import annotations

import pytest

from fusechat.errors import UserError
from fusechat.train import hardware, launch
from fusechat.train.defaults import Strategy, memory_estimate, plan, split_global_batch
from fusechat.train.hardware import Hardware, ModelFacts

NO_GPU = hardware.CPU
H100x8 = Hardware("cuda", 8, True, "NVIDIA H100 80GB HBM3", 79.1, flash_attn=True, liger=("gemma2", "llama", "qwen2"))
H100x8_BARE = Hardware("cuda", 8, True, "NVIDIA H100 80GB HBM3", 79.1)  # no flash-attn, no liger
H200 = Hardware("cuda", 1, True, "NVIDIA H200", 139.8, liger=("llama",))
V100 = Hardware("cuda", 1, False, "Tesla V100-SXM2-32GB", 31.7)

LLAMA_8B = ModelFacts("llama", 8_030_261_248, 32, 4096, 14336, 1024, 128256, 131072, heads=32)
LLAMA_07B = ModelFacts("llama", 755_000_000, 16, 2048, 5632, 1024, 300, 2048, heads=16)  # the bench model
GEMMA2_9B = ModelFacts("gemma2", 9_241_705_984, 42, 3584, 14336, 2048, 256000, 8192, softcapping=True, heads=16)
ZERO3 = Strategy("deepspeed", 3, "bf16")
FSDP = Strategy("fsdp", 0, "bf16")
RECIPE = {"max_length": 2048, "per_device_train_batch_size": 8}


def test_bf16_rounds_away_a_small_adamw_step():
    """Why plain DDP keeps fp32 weights: a step of lr ~5e-6 on a weight of 0.02 is below bf16's resolution."""
    import torch

    w = torch.tensor(0.02)
    assert (w.bfloat16() + 5e-6).item() == w.bfloat16().item()
    assert (w + 5e-6).item() != w.item()


@pytest.mark.parametrize(
    ("strategy", "lora", "dtype", "why"),
    [
        (Strategy(), False, "float32", "plain DDP"),
        (ZERO3, False, "bfloat16", "DeepSpeed"),
        (Strategy("deepspeed", 2, "bf16"), False, "bfloat16", "DeepSpeed"),
        (FSDP, False, "bfloat16", "FSDP"),
        (Strategy("fsdp", 0, "no"), False, "float32", "plain DDP"),  # no mixed precision: weights stay as loaded
        (Strategy(), True, "bfloat16", "LoRA"),
    ],
)
def test_bf16_weights_only_where_master_weights_stay_fp32(strategy, lora, dtype, why):
    p = plan("sft", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B, strategy=strategy, lora=lora)
    assert p.trl["model_init_kwargs"]["dtype"] == dtype and p.trl["bf16"] is True
    assert why in p.decisions["dtype"]["reason"]


def test_no_gpu_fp32_sdpa_no_liger_no_checkpointing():
    p = plan("sft", dict(RECIPE), NO_GPU, facts=LLAMA_07B)
    assert p.trl["model_init_kwargs"] == {"dtype": "float32", "attn_implementation": "sdpa"}
    assert p.trl["bf16"] is False and p.trl["use_cpu"] is True and p.trl["gradient_checkpointing"] is False
    assert p.trl["use_liger_kernel"] is False and p.padding_free is False
    v100 = plan("sft", dict(RECIPE), V100, facts=LLAMA_07B)
    assert v100.trl["model_init_kwargs"]["dtype"] == "float32" and v100.trl["bf16"] is False


def test_attention_kernel_by_installation_and_family():
    def attn(hw, facts):
        return plan("sft", dict(RECIPE), hw, world_size=8, facts=facts, strategy=ZERO3).trl["model_init_kwargs"]

    assert attn(H100x8, LLAMA_8B)["attn_implementation"] == "flash_attention_2"
    assert attn(H100x8_BARE, LLAMA_8B)["attn_implementation"] == "sdpa"
    assert attn(H100x8, GEMMA2_9B)["attn_implementation"] == "flash_attention_2"  # flash-attn 2 softcaps
    assert attn(H100x8_BARE, GEMMA2_9B)["attn_implementation"] == "eager"  # sdpa would drop the softcapping
    assert attn(NO_GPU, GEMMA2_9B)["attn_implementation"] == "eager"
    assert "attn_implementation" not in attn(H100x8, None)  # unreadable config: transformers decides


def test_padding_free_sft_only_with_flash_attention():
    assert plan("sft", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3).padding_free is True
    assert plan("sft", dict(RECIPE), H100x8_BARE, world_size=8, facts=LLAMA_8B, strategy=ZERO3).padding_free is False
    dpo = plan("dpo", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3)
    assert dpo.padding_free is False and "DPOTrainer" in dpo.decisions["padding_free"]["reason"]
    packed = plan("sft", {**RECIPE, "packing": True}, H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3)
    assert packed.padding_free is False  # TRL's packing does its own padding-free batching


def test_liger_when_installed_and_the_model_type_has_kernels():
    p = plan("dpo", {**RECIPE, "loss_type": "sigmoid_norm"}, H200, facts=LLAMA_07B)
    assert p.trl["use_liger_kernel"] is True
    assert p.decisions["use_liger_kernel"]["reason"] == "layer kernels only; TRL computes the sigmoid_norm loss itself"
    mistral = ModelFacts("mistral", 7_000_000_000, 32, 4096, 14336, 1024, 32768)
    p = plan("sft", dict(RECIPE), H200, facts=mistral)
    assert p.trl["use_liger_kernel"] is False and "no kernels for mistral" in p.decisions["use_liger_kernel"]["reason"]
    p = plan("sft", dict(RECIPE), H100x8_BARE, world_size=8, facts=LLAMA_8B)
    assert p.trl["use_liger_kernel"] is False and "not installed" in p.decisions["use_liger_kernel"]["reason"]


def test_checkpointing_only_when_the_micro_batch_does_not_fit():
    # the table: a 0.76B Llama, batch 8 x 2048 tokens, on one H200, plain DDP: fits without checkpointing
    p = plan("sft", dict(RECIPE), H200, facts=LLAMA_07B)
    assert p.trl["gradient_checkpointing"] is False and p.trl["per_device_train_batch_size"] == 8
    assert "fits without" in p.decisions["gradient_checkpointing"]["reason"]
    # Llama-3.1-8B under ZeRO-3 on 8 x H100: 2 sequences of 2048 fit, 8 do not
    z3 = plan("sft", {**RECIPE, "per_device_train_batch_size": 2}, H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3)
    assert z3.trl["gradient_checkpointing"] is False
    big = plan("sft", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3)
    assert (
        big.trl["gradient_checkpointing"] is True
        and "does not fit without" in big.decisions["gradient_checkpointing"]["reason"]
    )
    # 8B under plain DDP: 16 bytes per parameter do not fit in 80 GB whatever the activations
    ddp = plan("sft", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B)
    assert ddp.trl["gradient_checkpointing"] is True and "zero3" in ddp.decisions["gradient_checkpointing"]["reason"]
    # Gemma-2 without flash-attn trains on eager attention, whose score matrices take memory: a smaller micro-batch
    eager = plan("sft", dict(RECIPE), H100x8_BARE, world_size=8, facts=GEMMA2_9B, strategy=ZERO3, global_batch=128)
    flash = plan("sft", dict(RECIPE), H100x8, world_size=8, facts=GEMMA2_9B, strategy=ZERO3, global_batch=128)
    assert (eager.trl["per_device_train_batch_size"], flash.trl["per_device_train_batch_size"]) == (1, 2)
    # unknown model: conservative
    unknown = plan("sft", dict(RECIPE), H100x8, world_size=8, facts=None, strategy=ZERO3)
    assert unknown.trl["gradient_checkpointing"] is True


def test_user_values_always_win():
    user = {
        **RECIPE,
        "gradient_checkpointing": True,
        "use_liger_kernel": False,
        "model_init_kwargs": {"dtype": "bfloat16", "attn_implementation": "eager", "trust_remote_code": True},
    }
    p = plan("sft", user, H200, facts=LLAMA_07B)
    assert p.trl["gradient_checkpointing"] is True and p.trl["use_liger_kernel"] is False
    assert p.trl["model_init_kwargs"] == user["model_init_kwargs"]
    assert {d["reason"] for k, d in p.decisions.items() if k != "padding_free"} == {"set by the user"}


def test_user_values_the_hardware_cannot_honour_are_one_line_errors():
    with pytest.raises(UserError, match=r"^sft\.use_liger_kernel: true, but liger-kernel cannot run here \(cpu\)"):
        plan("sft", {"use_liger_kernel": True}, NO_GPU)
    with pytest.raises(UserError, match=r"^dpo\.model_init_kwargs\.attn_implementation: flash_attention_2, but"):
        plan("dpo", {"model_init_kwargs": {"attn_implementation": "flash_attention_2"}}, H100x8_BARE)


def test_memory_estimate_by_strategy():
    def states(strategy, world=8, **kw):
        return memory_estimate(
            LLAMA_8B,
            tokens=2048,
            strategy=strategy,
            world_size=world,
            weight_bytes=kw.pop("weight_bytes", 2),
            lora=kw.pop("lora", False),
            reference=kw.pop("reference", False),
            checkpointing=False,
        )["states_gib"]

    assert states(Strategy(), weight_bytes=4) == pytest.approx(16 * 8.03 / 1.0737, rel=0.01)  # 119.7 GiB
    assert states(ZERO3) == pytest.approx(16 * 8.03 / 1.0737 / 8 + 0.8, rel=0.02)  # sharded, plus gathered layers
    assert states(Strategy("deepspeed", 2, "bf16")) > states(ZERO3) > states(ZERO3, world=16)
    assert states(ZERO3, reference=True) == pytest.approx(states(ZERO3) + 2 * 8.03 / 1.0737 / 8, abs=0.15)
    assert states(Strategy(), lora=True) < 20


@pytest.mark.parametrize("world", [1, 2, 8, 16])
def test_global_batch_128_is_the_same_on_any_number_of_processes(world):
    batch, accumulation = split_global_batch("sft", 128, world, per_device=2)
    assert batch * accumulation * world == 128 and batch == 2
    batch, accumulation = split_global_batch("sft", 128, world)  # no hint: up to DEFAULT_MICRO_BATCH
    assert batch * accumulation * world == 128 and batch == min(8, 128 // world)
    p = plan("dpo", {"per_device_train_batch_size": 4}, NO_GPU, world_size=world, global_batch=128)
    args = p.trl
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * world == 128
    assert p.decisions["batch"]["value"] == f"4 x {128 // world // 4} x {world}"


def test_global_batch_uses_the_largest_micro_batch_that_fits():
    assert split_global_batch("sft", 128, 8, per_device=8, fits=lambda b: b <= 3) == (2, 8)
    assert split_global_batch("sft", 128, 8, per_device=8, fits=lambda b: False) == (8, 2)
    assert split_global_batch("sft", 96, 4, per_device=5) == (4, 6)  # 24 per process: the largest divisor <= 5
    # on the H100 node, DPO of the 8B target: one pair of 2 x 2048 tokens per micro-batch fits without checkpointing
    p = plan("dpo", dict(RECIPE), H100x8, world_size=8, facts=LLAMA_8B, strategy=ZERO3, global_batch=128)
    assert (p.trl["per_device_train_batch_size"], p.trl["gradient_accumulation_steps"]) == (1, 16)
    assert p.trl["gradient_checkpointing"] is False


def test_global_batch_misfit_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^sft\.global_batch_size: 128 does not split over 3 training processes"):
        split_global_batch("sft", 128, 3)
    with pytest.raises(UserError, match=r"^dpo\.global_batch_size: 128 != 8 processes x 4 x gradient_accumulation"):
        split_global_batch("dpo", 128, 8, per_device=4, accumulation=8)
    assert split_global_batch("dpo", 128, 8, accumulation=4) == (4, 4)


def test_launch_strategy_and_world_size_of_the_shipped_configs(tmp_path):
    assert launch.strategy(None) == Strategy("ddp", 0, "no")
    zero3 = launch.resolve_config("zero3", "sft.accelerate_config")
    assert launch.strategy(zero3) == ZERO3
    assert launch.strategy(launch.resolve_config("fsdp", "x")) == FSDP
    assert launch.strategy(launch.resolve_config("ddp", "x")).kind == "ddp"
    assert launch.world_size(1, zero3) == 8 and launch.world_size(16, zero3) == 16 and launch.world_size(2, None) == 2
    ds_file = tmp_path / "ds.json"
    ds_file.write_text('{"zero_optimization": {"stage": 2}}')
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(
        f"distributed_type: DEEPSPEED\nmixed_precision: bf16\ndeepspeed_config:\n  deepspeed_config_file: {ds_file}\n"
    )
    assert launch.strategy(cfg) == Strategy("deepspeed", 2, "bf16")


def test_model_facts_from_config_without_weights(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    facts = hardware.model_facts(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert facts.model_type == "llama" and facts.params == sum(p.numel() for p in model.parameters())
    assert facts.layers == model.config.num_hidden_layers and facts.hidden == model.config.hidden_size
    assert facts.softcapping is False and facts.supports_sdpa is True
    assert hardware.model_facts(str(tmp_path)) is None  # no config.json


def test_gemma2_facts_say_softcapping(tmp_path):
    from fusechat.demo.tiny import TinySpec, make_tiny

    path = make_tiny(tmp_path / "g", TinySpec(arch="gemma2", chat="chatml", seed=5))
    facts = hardware.model_facts(str(path))
    assert facts.model_type == "gemma2" and facts.softcapping is True
    assert plan("sft", {}, NO_GPU, facts=facts).trl["model_init_kwargs"]["attn_implementation"] == "eager"


def test_hardware_in_the_manifest_says_whether_liger_is_there():
    assert H200.as_dict()["liger"] is True and NO_GPU.as_dict()["liger"] is False
    assert H200.as_dict()["memory_gib"] == 139.8


TARGETS = {  # the recipes' targets, from their config.json
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA_8B,
    "Qwen/Qwen2.5-7B-Instruct": ModelFacts("qwen2", 7_615_616_512, 28, 3584, 18944, 512, 152064, 32768, heads=28),
    "google/gemma-2-9b-it": GEMMA2_9B,
    "meta-llama/Llama-3.2-3B-Instruct": ModelFacts(
        "llama", 3_212_749_824, 28, 3072, 8192, 1024, 128256, 131072, heads=24
    ),
    "meta-llama/Llama-3.2-1B-Instruct": ModelFacts(
        "llama", 1_235_814_400, 16, 2048, 8192, 512, 128256, 131072, heads=32
    ),
}


@pytest.mark.parametrize("world", [8, 16])
def test_every_recipe_trains_with_global_batch_128_on_one_or_two_h100_nodes(world):
    from pathlib import Path

    from fusechat.config import load_config

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        if path.stem == "demo":
            continue
        cfg = load_config(path)
        facts = TARGETS[cfg.target.path]
        for kind in ("sft", "dpo"):
            section = getattr(cfg, kind)
            strategy = launch.strategy(launch.resolve_config(section.accelerate_config, kind))
            p = plan(
                kind,
                section.trl_args(),
                H100x8_BARE,
                world_size=world,
                facts=facts,
                strategy=strategy,
                global_batch=section.global_batch_size,
            )
            args = p.trl
            assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * world == 128, path
            assert args["model_init_kwargs"]["dtype"] == "bfloat16"  # ZeRO-3
            expected = "eager" if facts.softcapping else "sdpa"
            assert args["model_init_kwargs"]["attn_implementation"] == expected
            assert p.decisions["gradient_checkpointing"]["value"] is args["gradient_checkpointing"]
