"""Hardware-aware training defaults: bf16 and gradient checkpointing on a GPU that supports them, fp32 and no
checkpointing on CPU, without the user editing the YAML. A user value the hardware cannot honour is an error that
names the key, raised before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fusechat.errors import UserError


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    count: int  # accelerators visible to this process (0 on CPU)
    bf16: bool
    name: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect() -> Hardware:
    import torch

    if torch.cuda.is_available():
        return Hardware(
            "cuda", torch.cuda.device_count(), torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0)
        )
    return Hardware("cpu", 0, False, "cpu")


def effective_args(section: str, user: dict[str, Any], hw: Hardware, num_processes: int, seed: int) -> dict[str, Any]:
    """The TRL arguments to use: fusechat's defaults for this hardware, overridden by the user's keys.

    TRL configs default to bf16 and gradient checkpointing, which fail (bf16) or only cost time (checkpointing) on
    CPU, so both are always set explicitly and the effective values end up in the manifest."""
    gpu = hw.device == "cuda"
    for key in ("bf16", "fp16"):
        if user.get(key) and not gpu:
            raise UserError(f"{section}.{key}: true, but this machine has no GPU ({hw.name}); remove it or set false")
    if user.get("bf16") and not hw.bf16:
        raise UserError(f"{section}.bf16: true, but {hw.name} does not support bf16; remove it or use fp16")
    if user.get("use_cpu") is False and not gpu:
        raise UserError(f"{section}.use_cpu: false, but this machine has no GPU")
    defaults: dict[str, Any] = {
        "bf16": hw.bf16 and not user.get("fp16"),
        "gradient_checkpointing": gpu,
        "report_to": "none",
        "seed": seed,
        "save_total_limit": 2,
    }
    if not gpu:
        defaults.update(use_cpu=True, dataloader_pin_memory=False)
    if num_processes > 1:
        defaults["ddp_find_unused_parameters"] = False
    # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the string "no" to TRL
    user = {k: "no" if v is False and k.endswith("_strategy") else v for k, v in user.items()}
    return {**defaults, **user}
