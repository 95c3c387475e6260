"""SFT throughput with and without packing, on the same data, in one run: prints tokens/s of each and the ratio.

Uses fusechat's own SFT trainer path (prompt/completion conversion, hardware defaults) on a tiny local model and
conversations of very different lengths (where padding wastes most compute, and packing should win).

    python scripts/bench_sft_packing.py [--rows 512] [--hidden 256] [--layers 4] [--max-length 512] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the answer is that we add the numbers and carry the ones to get a sum".split()
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        reply = " ".join(rng.choice(words) for _ in range(rng.choice([2, 5, 20, 60]))) + f" {a + b}"
        rows.append(
            {
                "prompt_id": f"p{i}",
                "messages": [{"role": "user", "content": f"what is {a}+{b}?"}, {"role": "assistant", "content": reply}],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset

    from fusechat.demo.tiny import TinySpec, make_tiny
    from fusechat.tokenizers import load_tokenizer
    from fusechat.train import hardware, sft

    if args.threads:
        torch.set_num_threads(args.threads)
    hw = hardware.detect()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(
            Path(tmp) / "model",
            TinySpec(
                arch="llama",
                chat="chatml",
                hidden=args.hidden,
                layers=args.layers,
                ffn=4 * args.hidden,
                max_positions=args.max_length,
            ),
        )
        tok = load_tokenizer(model_dir)
        data = sft.prepare(Dataset.from_list(conversations(args.rows)))
        results = {}
        for packing in (False, True):
            user = {
                "num_train_epochs": 1,
                "per_device_train_batch_size": args.batch,
                "max_length": args.max_length,
                "packing": packing,
                "learning_rate": 1e-4,
                "save_strategy": "no",
                "logging_steps": 1000,
            }
            job = {
                "model": str(model_dir),
                "lora": None,
                "output_dir": str(Path(tmp) / f"out-{packing}"),
                "trl": hardware.effective_args("sft", user, hw, 1, seed=0),
            }
            trainer = sft.make_trainer(job, data, tok, [])
            started = time.perf_counter()
            out = trainer.train()
            seconds = time.perf_counter() - started
            tokens = trainer._total_train_tokens
            results[packing] = tokens / seconds
            print(
                f"packing={str(packing):5}  steps={out.global_step:4d}  tokens={tokens:7d}  "
                f"time={seconds:6.2f}s  tokens/s={tokens / seconds:9.1f}"
            )
    print(
        f"device={hw.name}  rows={args.rows}  model=h{args.hidden}xL{args.layers}  "
        f"packed/unpacked tokens/s ratio: {results[True] / results[False]:.2f}"
    )


if __name__ == "__main__":
    main()
