"""What training runs on and what it trains: the machine (`Hardware`: device, memory, bf16, installed kernels) and
the model (`ModelFacts`, read from config.json on the meta device, without loading weights). `effective_args` turns
them into TRL arguments through the pure decisions of `train.defaults`; a user value the hardware cannot honour is
an error that names the key, raised before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    count: int  # accelerators visible to this process (0 on CPU)
    bf16: bool
    name: str
    memory_gib: float = 0.0  # per accelerator
    flash_attn: bool = False  # flash-attn 2 importable (transformers' check)
    liger: tuple[str, ...] = ()  # model types liger-kernel can patch; empty when it is not installed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "liger": bool(self.liger)}


CPU = Hardware("cpu", 0, False, "cpu")


def detect(force_cpu: bool = False) -> Hardware:
    """This machine; `force_cpu` (the user's `use_cpu: true`) trains on CPU even where a GPU is visible."""
    import torch

    if force_cpu or not torch.cuda.is_available():
        return CPU
    from transformers.utils import is_flash_attn_2_available

    props = torch.cuda.get_device_properties(0)
    return Hardware(
        "cuda",
        torch.cuda.device_count(),
        torch.cuda.is_bf16_supported(),
        props.name,
        memory_gib=round(props.total_memory / GIB, 1),
        flash_attn=is_flash_attn_2_available(),
        liger=_liger_model_types(),
    )


def _liger_model_types() -> tuple[str, ...]:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # not installed, or triton cannot load: train without
        return ()
    return tuple(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))


@dataclass(frozen=True)
class ModelFacts:
    """What the defaults need to know about a model, from its config alone."""

    model_type: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    max_positions: int | None = None
    softcapping: bool = False  # attention-logit softcapping (Gemma-2): sdpa would silently drop it
    supports_flash: bool = True
    supports_sdpa: bool = True
    heads: int = 32  # attention heads: eager attention keeps heads x length scores per token


def model_facts(path: str) -> ModelFacts | None:
    """Facts of a model directory or hub id; None when its config cannot be read (no config.json, offline hub id,
    an adapter-only directory): the defaults then stay conservative."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # transformers raises OSError/ValueError/KeyError for what it cannot read
        return None
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelFacts(
        model_type=text.model_type,
        params=sum(p.numel() for p in model.parameters()),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
        softcapping=getattr(text, "attn_logit_softcapping", None) is not None,
        supports_flash=bool(getattr(model, "_supports_flash_attn", False)),
        supports_sdpa=bool(getattr(model, "_supports_sdpa", False)),
        heads=heads,
    )


def effective_args(section: str, user: dict[str, Any], hw: Hardware, num_processes: int, seed: int) -> dict[str, Any]:
    """The TRL arguments for this hardware without model facts (conservative: checkpointing on a GPU); the stages
    use `train.defaults.plan`, which also sees the model, the launch strategy and the global batch."""
    from fusechat.train.defaults import plan

    return plan(section, user, hw, world_size=num_processes, seed=seed).trl
