"""Batched reward scoring vs one response per forward pass (the SimPO/FuseChat way), in one run.

Both score the same conversations with the same tiny reward model; the one-at-a-time baseline mirrors
`on_policy_data_gen/reward_model_annotate.py`: `apply_chat_template(..., return_tensors="pt")`, then one forward
per response. Prints both rates, the ratio (target >= 3x) and the largest score difference.

    python scripts/bench_reward.py [--n 256] [--batch-size 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = ap.parse_args()

    import torch

    from fusechat.config import RewardModelConfig
    from fusechat.demo.tiny import TinySpec, make_tiny
    from fusechat.score.reward_model import RewardModel, conversation

    torch.set_num_threads(args.threads)
    words = "the model answers each question with care and some detail about numbers code and facts".split()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp) / "reward", TinySpec(arch="llama", chat="chatml", seed=4), reward=True)
        rm = RewardModel(RewardModelConfig(path=str(path), dtype="float32", batch_size=args.batch_size))
        print(f"responses={args.n} batch_size={args.batch_size} torch_threads={args.threads}")
        # short: per-call overhead dominates (as on a GPU); chat: this CPU is compute-bound at ~180 tokens
        for name, prompt_words, response_words in (("short", (1, 3), (1, 6)), ("chat", (3, 12), (5, 40))):
            rng = random.Random(0)
            convs = [
                conversation(
                    [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(*prompt_words)))}],
                    " ".join(rng.choices(words, k=rng.randint(*response_words))),
                )
                for _ in range(args.n)
            ]
            single_s, batched_s, diff = measure(rm, convs)
            tokens = sum(len(s) for s in rm.encode(convs)[0]) / len(convs)
            print(
                f"[{name}] {tokens:.0f} tokens/response: one per forward {args.n / single_s:.1f} responses/s, "
                f"batched {args.n / batched_s:.1f} responses/s, speed-up {single_s / batched_s:.1f}x, "
                f"max |score difference| {diff:.1e}"
            )


def measure(rm, convs) -> tuple[float, float, float]:
    """Seconds one-by-one (the SimPO script's loop), seconds batched, largest score difference."""
    import torch

    model, tok = rm.model, rm.tokenizer
    rm.score(convs[:8])  # warm-up
    started = time.perf_counter()
    one_by_one = []
    with torch.inference_mode():
        for c in convs:
            ids = tok.apply_chat_template(c, tokenize=True, return_tensors="pt", return_dict=True)["input_ids"]
            one_by_one.append(model(input_ids=ids).logits.float().item())
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = rm.score(convs).rewards
    batched_s = time.perf_counter() - started
    return single_s, batched_s, max(abs(a - b) for a, b in zip(one_by_one, batched, strict=True))


if __name__ == "__main__":
    main()
