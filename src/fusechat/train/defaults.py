"""Training defaults chosen by hardware, model and launch strategy, as pure functions of (Hardware, ModelFacts,
Strategy, the user's keys), so that they are unit-tested on simulated machines. Each decision carries its reason,
which the stage records in the manifest; a key the user set always wins.

- weights: bf16 where the optimizer keeps fp32 master weights (DeepSpeed with bf16, FSDP with mixed precision,
  whose trainable weights accelerate upcasts to fp32; LoRA, whose base is frozen); fp32 plus bf16 autocast under
  plain DDP, where torch's AdamW updates each weight in its own dtype and a step of lr ~1e-6 on a bf16 weight of
  0.02 (resolution 1.2e-4) rounds away.
- attention: flash-attn 2 when installed on a bf16 GPU, else sdpa; eager only for a family whose attention sdpa
  cannot express (Gemma-2's logit softcapping) when flash-attn 2 is missing.
- Liger kernels when installed and the model type has them: TRL 1.16 applies the layer kernels only (RMSNorm, RoPE,
  SwiGLU; it turns Liger's fused cross-entropy off) and computes every loss type itself, `sigmoid_norm` included.
- gradient checkpointing only when the memory estimate says the micro-batch does not fit without it.
- padding-free SFT batches when the attention kernel is flash-attn 2 (varlen: no cross-sequence attention).
- `global_batch_size`: per-device batch x accumulation derived for the world size; a misfit is a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusechat.errors import UserError
from fusechat.train.hardware import GIB, Hardware, ModelFacts

DEFAULT_MICRO_BATCH = 8  # the per-device batch tried first under global_batch_size when the user gives none
TRL_MAX_LENGTH = 1024  # TRL's default max_length for SFT and DPO
RESERVED_GIB = 2.0  # CUDA context, NCCL buffers
USABLE_FRACTION = 0.9  # allocator fragmentation


@dataclass(frozen=True)
class Strategy:
    """How the processes share the model, read from the accelerate config (`launch.strategy`)."""

    kind: str = "ddp"  # ddp (also one process), deepspeed, fsdp
    zero_stage: int = 0
    mixed_precision: str = "no"  # accelerate's setting: no, bf16, fp16

    @property
    def shards_params(self) -> bool:
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage >= 3)


@dataclass
class Plan:
    trl: dict[str, Any]  # the TRL config arguments
    padding_free: bool = False  # SFT: flatten each batch (fusechat's collator; TRL's own padding_free stays off)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {value, reason}

    def summary(self) -> str:
        return "; ".join(f"{k}={d['value']} ({d['reason']})" for k, d in self.decisions.items())


# ------------------------------------------------------------------------------------------------ single decisions
def weights_dtype(hw: Hardware, strategy: Strategy, lora: bool, bf16: bool) -> tuple[str, str]:
    if hw.device != "cuda":
        return "float32", "CPU"
    if not bf16:
        return "float32", f"no bf16 training on {hw.name}"
    if lora:
        return "bfloat16", "LoRA: the base stays frozen and PEFT keeps the adapters in fp32"
    if strategy.kind == "deepspeed" and strategy.mixed_precision == "bf16":
        return "bfloat16", "DeepSpeed's bf16 optimizer keeps fp32 master weights"
    if strategy.kind == "fsdp" and strategy.mixed_precision != "no":
        return "bfloat16", "accelerate upcasts FSDP's trainable weights to fp32 master copies"
    return "float32", "plain DDP: AdamW would update bf16 weights in bf16, losing small steps; bf16 autocast computes"


def attention(hw: Hardware, facts: ModelFacts | None) -> tuple[str | None, str]:
    if facts is None:
        return None, "model config unreadable: transformers' default"
    flash = hw.device == "cuda" and hw.bf16 and hw.flash_attn and facts.supports_flash
    if flash:
        return "flash_attention_2", "flash-attn 2 installed"
    if facts.softcapping:
        return "eager", f"{facts.model_type} softcaps attention logits, which sdpa drops; flash-attn 2 not installed"
    if facts.supports_sdpa:
        why = "flash-attn 2 not installed" if hw.device == "cuda" else "CPU"
        return "sdpa", why
    return "eager", f"{facts.model_type} supports neither flash-attn 2 nor sdpa"


def liger(hw: Hardware, facts: ModelFacts | None, loss: str) -> tuple[bool, str]:
    if hw.device != "cuda":
        return False, "CPU"
    if not hw.liger:
        return False, "liger-kernel not installed (the gpu extra installs it)"
    if facts is None:
        return False, "model type unknown"
    if facts.model_type not in hw.liger:
        return False, f"liger-kernel has no kernels for {facts.model_type}; the model's own layers train"
    return True, f"layer kernels only; TRL computes the {loss} loss itself"


def padding_free(section: str, user: dict[str, Any], attn: str | None) -> tuple[bool, str]:
    if section != "sft":
        return False, "TRL 1.16's DPOTrainer has no padding-free path"
    if "padding_free" in user or user.get("packing"):
        return False, "the user set TRL's padding_free/packing"
    if attn == "flash_attention_2":
        return True, "flash-attn 2 attends within each sequence of a flattened batch"
    return False, f"{attn or 'the default'} attention would need a block mask for a flattened batch"


# ------------------------------------------------------------------------------------------------ memory
def memory_estimate(
    facts: ModelFacts,
    *,
    tokens: int,
    strategy: Strategy,
    world_size: int,
    weight_bytes: int,
    lora: bool,
    reference: bool,
    checkpointing: bool,
    eager_length: int = 0,
) -> dict[str, float]:
    """GiB per GPU for one micro-batch of `tokens` tokens: model states (weights, gradients, AdamW, a DPO reference
    copy) by strategy, plus activations. Activations per token and layer (bf16 autocast, flash/sdpa attention, no
    full logits: TRL's fused LM head): norms, q/k/v, rotary, attention output and the SwiGLU MLP, about
    2 x (16 h + 6 kv + 4 i) bytes, plus 6 x heads x length for eager attention's score matrices (`eager_length`:
    the sequence length when attention is eager); with checkpointing, one fp32 layer input per layer plus one layer
    recomputed."""
    p, w = facts.params, world_size
    layer_params = max(p - 2 * facts.vocab * facts.hidden, 0) / max(facts.layers, 1)
    shard = w if strategy.shards_params else 1
    if lora:
        states = weight_bytes * p / shard + 16 * 0.01 * p  # frozen base; adapters (~1%) in fp32 with AdamW
    elif strategy.kind == "deepspeed":
        s = strategy.zero_stage
        states = 2 * p / (w if s >= 3 else 1) + 2 * p / (w if s >= 2 else 1) + 12 * p / (w if s >= 1 else 1)
    elif strategy.kind == "fsdp":
        states = 16 * p / w  # fp32 master weights, gradients and AdamW moments, all sharded
    else:
        states = 4 * weight_bytes * p  # weights, gradients, two AdamW moments, in the weights' dtype
    if strategy.shards_params:
        states += 2 * 2 * layer_params  # two gathered bf16 layers at a time
    if reference:
        states += weight_bytes * p / shard
    per_token_layer = 2 * (16 * facts.hidden + 6 * facts.kv_dim + 4 * facts.intermediate)
    per_token_layer += 6 * facts.heads * eager_length
    if checkpointing:
        activations = tokens * (facts.layers * 4 * facts.hidden + per_token_layer)
    else:
        activations = tokens * facts.layers * per_token_layer
    return {
        "states_gib": round(states / GIB, 1),
        "activations_gib": round(activations / GIB, 1),
        "total_gib": round((states + activations) / GIB, 1),
    }


def usable_gib(hw: Hardware) -> float:
    return round(hw.memory_gib * USABLE_FRACTION - RESERVED_GIB, 1)


# ------------------------------------------------------------------------------------------------ global batch
def split_global_batch(
    section: str,
    global_batch: int,
    world_size: int,
    per_device: int | None = None,
    accumulation: int | None = None,
    fits: Callable[[int], bool] = lambda b: True,
) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with per-device x accumulation x world_size == global_batch.

    With the user's `gradient_accumulation_steps` the per-device batch follows from it; otherwise the user's
    per-device batch (or DEFAULT_MICRO_BATCH) is the largest one tried, and the largest divisor that `fits`
    wins (the first divisor when none fits)."""
    where = f"{section}.global_batch_size"
    if global_batch % world_size:
        raise UserError(
            f"{where}: {global_batch} does not split over {world_size} training processes; "
            f"use a multiple of {world_size} or another number of processes"
        )
    per_rank = global_batch // world_size
    if accumulation is not None:
        if per_rank % accumulation or (per_device is not None and per_device * accumulation != per_rank):
            shown = f"{per_device} x " if per_device is not None else ""
            raise UserError(
                f"{where}: {global_batch} != {world_size} processes x {shown}gradient_accumulation_steps "
                f"{accumulation}; drop per_device_train_batch_size/gradient_accumulation_steps to derive them"
            )
        return per_rank // accumulation, accumulation
    hint = per_device or DEFAULT_MICRO_BATCH
    sizes = [b for b in range(min(hint, per_rank), 0, -1) if per_rank % b == 0]
    chosen = next((b for b in sizes if fits(b)), sizes[0])
    return chosen, per_rank // chosen


# ------------------------------------------------------------------------------------------------ the plan
def check_user(section: str, user: dict[str, Any], hw: Hardware) -> None:
    """A user value the hardware cannot honour: one line naming the key, before any model loads."""
    gpu = hw.device == "cuda"
    for key in ("bf16", "fp16"):
        if user.get(key) and not gpu:
            raise UserError(f"{section}.{key}: true, but this machine has no GPU ({hw.name}); remove it or set false")
    if user.get("bf16") and not hw.bf16:
        raise UserError(f"{section}.bf16: true, but {hw.name} does not support bf16; remove it or use fp16")
    if user.get("use_cpu") is False and not gpu:
        raise UserError(f"{section}.use_cpu: false, but this machine has no GPU")
    if user.get("use_liger_kernel") and not hw.liger:
        raise UserError(
            f"{section}.use_liger_kernel: true, but liger-kernel cannot run here ({hw.name}): it needs a GPU and "
            "`pip install liger-kernel`; remove it or set false"
        )
    attn = (user.get("model_init_kwargs") or {}).get("attn_implementation")
    if attn == "flash_attention_2" and not hw.flash_attn:
        raise UserError(
            f"{section}.model_init_kwargs.attn_implementation: flash_attention_2, but flash-attn 2 is not installed "
            f"here ({hw.name}); use sdpa or install flash-attn"
        )


def plan(
    section: str,
    user: dict[str, Any],
    hw: Hardware,
    *,
    world_size: int = 1,
    seed: int = 0,
    facts: ModelFacts | None = None,
    strategy: Strategy = Strategy(),
    lora: bool = False,
    global_batch: int | None = None,
) -> Plan:
    """The TRL arguments for `section` (sft or dpo): fusechat's defaults for this hardware, model and strategy,
    overridden by the user's keys, with the reason of each default."""
    # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the string "no" to TRL
    user = {k: "no" if v is False and k.endswith("_strategy") else v for k, v in user.items()}
    check_user(section, user, hw)
    gpu = hw.device == "cuda"
    decisions: dict[str, dict[str, Any]] = {}

    def decide(key: str, value: Any, reason: str) -> Any:
        decisions[key] = {"value": value, "reason": reason}
        return value

    trl: dict[str, Any] = {"report_to": "none", "seed": seed, "save_total_limit": 2}
    trl["bf16"] = hw.bf16 and not user.get("fp16")
    if not gpu:
        trl.update(use_cpu=True, dataloader_pin_memory=False)
    if world_size > 1:
        trl["ddp_find_unused_parameters"] = False

    init = dict(user.get("model_init_kwargs") or {})
    if "dtype" in init:
        decide("dtype", init["dtype"], "set by the user")
    else:
        init["dtype"] = decide("dtype", *weights_dtype(hw, strategy, lora, bool(user.get("bf16", trl["bf16"]))))
    if "attn_implementation" in init:
        attn = decide("attn_implementation", init["attn_implementation"], "set by the user")
    else:
        attn = decide("attn_implementation", *attention(hw, facts))
        if attn is not None:
            init["attn_implementation"] = attn
    trl["model_init_kwargs"] = init
    if "use_liger_kernel" in user:
        decide("use_liger_kernel", user["use_liger_kernel"], "set by the user")
    else:
        loss = user.get("loss_type", "sigmoid" if section == "dpo" else "nll")
        trl["use_liger_kernel"] = decide("use_liger_kernel", *liger(hw, facts, str(loss)))
    flat = decide("padding_free", *padding_free(section, user, attn))

    # micro-batch, accumulation and checkpointing, from the memory estimate
    user_ckpt = user.get("gradient_checkpointing")
    seq = user.get("max_length", TRL_MAX_LENGTH) or (facts.max_positions if facts else None) or 4096
    per_example = 2 if section == "dpo" else 1  # chosen and rejected
    reference = section == "dpo" and not lora and not user.get("precompute_ref_log_probs")
    weight_bytes = 2 if str(init.get("dtype")) in ("bfloat16", "float16", "torch.bfloat16") else 4
    budget = usable_gib(hw)

    def estimate(batch: int, checkpointing: bool) -> dict[str, float]:
        assert facts is not None
        return memory_estimate(
            facts,
            tokens=batch * per_example * seq,
            strategy=strategy,
            world_size=world_size,
            weight_bytes=weight_bytes,
            lora=lora,
            reference=reference,
            checkpointing=checkpointing,
            eager_length=seq if attn == "eager" else 0,
        )

    can_estimate = gpu and facts is not None and hw.memory_gib > 0

    def fits(batch: int) -> bool:
        return not can_estimate or estimate(batch, bool(user_ckpt))["total_gib"] <= budget

    if global_batch is not None:
        batch, accumulation = split_global_batch(
            section,
            global_batch,
            world_size,
            user.get("per_device_train_batch_size"),
            user.get("gradient_accumulation_steps"),
            fits,
        )
        trl.update(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        decide(
            "batch",
            f"{batch} x {accumulation} x {world_size}",
            f"global_batch_size {global_batch} = per-device x accumulation x processes",
        )
        user = {
            k: v for k, v in user.items() if k not in ("per_device_train_batch_size", "gradient_accumulation_steps")
        }
    else:
        batch = user.get("per_device_train_batch_size", 8)

    if user_ckpt is not None:
        decide("gradient_checkpointing", user_ckpt, "set by the user")
    elif not gpu:
        trl["gradient_checkpointing"] = decide("gradient_checkpointing", False, "CPU")
    elif not can_estimate:
        trl["gradient_checkpointing"] = decide("gradient_checkpointing", True, "model size unknown: no estimate")
    else:
        need = estimate(batch, False)
        on = need["total_gib"] > budget
        reason = (
            f"micro-batch {batch} ({batch * per_example * seq} tokens) {'does not fit' if on else 'fits'} without: "
            f"~{need['total_gib']} GiB (states {need['states_gib']}, activations {need['activations_gib']}) "
            f"of {budget} usable per GPU"
        )
        if on and estimate(batch, True)["total_gib"] > budget:
            reason += (
                f"; ~{estimate(batch, True)['total_gib']} GiB even with it: shard the model (zero3, fsdp) or use lora"
            )
        trl["gradient_checkpointing"] = decide("gradient_checkpointing", on, reason)
    return Plan(trl={**trl, **user, "model_init_kwargs": init}, padding_free=flat, decisions=decisions)
