"""SFT and DPO training throughput of fusechat's hardware defaults, next to raw TRL trainers given the same effective
settings and, on a GPU, next to the old defaults (fp32 weights, gradient checkpointing, no Liger), in one run:
tokens/s, pairs/s and MFU.

On a GPU: a ~0.76B random Llama on the workload of issue 12 (conversations of 350-2,000 tokens, 8 per step,
max_length 2048; DPO: 8 pairs of ~250-1,100-token answers, sigmoid_norm, beta 10). MFU = model FLOPs per token
(6 N for SFT; 8 N for DPO: policy forward and backward plus the reference forward) x tokens/s / the card's dense bf16
peak. Without a GPU: a tiny model for a few steps, which checks the path and prints tokens/s but no MFU.

    python scripts/bench_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from pathlib import Path

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def conversations(n: int, seed: int, lo: int, hi: int) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz      .,"
    out = []
    for i in range(n):
        prompt = "".join(rng.choice(letters) for _ in range(rng.randint(50, 200)))
        reply = "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))
        out.append(
            {
                "prompt_id": f"p{i}",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            }
        )
    return out


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measure(trainer, warmup: int) -> dict:
    """Seconds per step and tokens/s over the steps after `warmup`, from a callback that syncs the GPU."""
    import torch
    from transformers import TrainerCallback

    marks: dict[int, tuple[float, int]] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[state.global_step] = (time.perf_counter(), trainer._total_train_tokens)

    trainer.add_callback(Clock())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    last = max(marks)
    (t0, k0), (t1, k1) = marks[warmup], marks[last]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"s_per_step": (t1 - t0) / (last - warmup), "tokens_per_s": (k1 - k0) / (t1 - t0), "peak_gib": peak}


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: 12 GPU, 4 CPU)")
    args = ap.parse_args()

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from fusechat.demo.tiny import TinySpec, make_tiny
    from fusechat.tokenizers import load_tokenizer
    from fusechat.train import defaults, dpo, hardware, sft

    hw = hardware.detect()
    gpu = hw.device == "cuda"
    if gpu:
        spec = TinySpec(hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, max_positions=2048)
        batch, max_length, steps, warmup = 8, 2048, args.steps or 12, 3
        sft_len, dpo_len = (350, 1800), (200, 900)
    else:
        spec = TinySpec(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, max_positions=512)
        batch, max_length, steps, warmup = 4, 512, args.steps or 4, 1
        sft_len, dpo_len = (100, 300), (50, 200)
        print("no GPU: a tiny model on CPU for a few steps (checks the path; MFU not measured)")
    peak = peak_flops(hw.name) if gpu else None

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "model", spec)
        tok = load_tokenizer(model_dir)
        facts = hardware.model_facts(str(model_dir))
        print(f"device={hw.name}  model={facts.params / 1e6:.1f}M params  batch={batch}  max_length={max_length}")
        sft_data = sft.prepare(Dataset.from_list(conversations(batch * steps * 2, 0, *sft_len)))
        chosen, rejected = (conversations(batch * steps * 2, seed, *dpo_len) for seed in (5, 6))
        pairs = [
            {"prompt": a["messages"][:1], "chosen": a["messages"][1:], "rejected": b["messages"][1:]}
            for a, b in zip(chosen, rejected, strict=True)
        ]
        dpo_data = dpo.prepare(Dataset.from_list(pairs))
        common = {"max_steps": steps, "per_device_train_batch_size": batch, "max_length": max_length}
        common.update(save_strategy="no", logging_steps=1000)
        before = {"gradient_checkpointing": True, "use_liger_kernel": False, "model_init_kwargs": {"dtype": "float32"}}

        for kind in ("sft", "dpo"):
            user = {**common, "learning_rate": 1e-5}
            if kind == "dpo":
                user.update(learning_rate=1e-6, loss_type="sigmoid_norm", beta=10.0)
            planned = defaults.plan(kind, user, hw, facts=facts)
            print(f"{kind} defaults: " + ", ".join(f"{k}={d['value']}" for k, d in planned.decisions.items()))
            data = sft_data if kind == "sft" else dpo_data
            results = {}
            variants = [("fusechat", planned), ("raw TRL", planned)]
            if gpu:
                variants.append(("old defaults", defaults.plan(kind, {**user, **before}, hw, facts=facts)))
            for name, p in variants:
                out = str(Path(tmp) / f"{kind}-{len(results)}")
                if name == "fusechat":
                    job = {"model": str(model_dir), "lora": None, "output_dir": out, "trl": p.trl}
                    trainer = (sft if kind == "sft" else dpo).make_trainer(
                        {**job, "padding_free": p.padding_free}, data, tok, []
                    )
                elif kind == "sft":
                    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

                    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
                    collator = flat if p.padding_free else None
                    trainer = SFTTrainer(
                        model=str(model_dir),
                        args=SFTConfig(output_dir=out, **p.trl),
                        train_dataset=data,
                        processing_class=tok,
                        data_collator=collator,
                    )
                else:
                    trainer = DPOTrainer(
                        model=str(model_dir),
                        args=DPOConfig(output_dir=out, **p.trl),
                        train_dataset=data,
                        processing_class=tok,
                    )
                r = measure(trainer, warmup)
                flops_per_token = (6 if kind == "sft" else 8) * facts.params
                mfu = f"{flops_per_token * r['tokens_per_s'] / peak:6.1%}" if peak else "   n/a"
                rate = f"pairs/s={batch / r['s_per_step']:7.2f}" if kind == "dpo" else f"s/step={r['s_per_step']:6.3f}"
                memory = f"  peak={r['peak_gib']:5.1f} GiB" if gpu else ""
                print(
                    f"  {kind} {name:13} tokens/s={r['tokens_per_s']:9.0f}  {rate}  MFU={mfu}{memory}  "
                    f"dtype={next(trainer.model.parameters()).dtype}"
                )
                results[name] = r["tokens_per_s"]
                del trainer
                free()
            ratio = f"fusechat / raw TRL: {results['fusechat'] / results['raw TRL']:.3f}"
            if "old defaults" in results:
                ratio += f"   fusechat / old defaults: {results['fusechat'] / results['old defaults']:.2f}x"
            print(f"  {kind} {ratio}")
    if not gpu:
        print("(CPU timings of a tiny model are dominated by overheads and noise; the ratios mean something on a GPU)")


if __name__ == "__main__":
    main()
