"""Tokens/s of the two sample engines (vLLM, transformers) on the same tiny model and prompts, in one run.

    python scripts/bench_sample.py [--prompts 64] [--k 4] [--max-tokens 64] [--hidden 128] [--layers 4]

Each engine loads the model, warms up on two prompts, then samples k completions for every prompt; tokens/s is
generated tokens over generate time (loading excluded, reported apart). transformers runs first: vLLM's CPU
worker pins the process's threads. Timings depend on how busy the CPU is; compare the ratio, measured together.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (head size 32: vLLM CPU needs >= 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="transformers engine: prompts per generate call")
    args = parser.parse_args()

    from fusechat.config import SamplingParams, SourceModel
    from fusechat.demo.tiny import TinySpec, make_tiny
    from fusechat.sample.engines import open_engine
    from fusechat.sample.render import render_ids, stop_token_ids
    from fusechat.tokenizers import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(
            arch="llama",
            chat="chatml",
            hidden=args.hidden,
            heads=args.hidden // 32,
            kv_heads=1,
            ffn=args.hidden * 4,
            layers=args.layers,
            seed=0,
        )
        model = str(make_tiny(os.path.join(tmp, "model"), spec))
        tok = load_tokenizer(model)
        prompts = [
            render_ids(
                tok, [{"role": "user", "content": f"Tell me about topic {i}. " * (1 + i % 4)}], tok.chat_template
            )
            for i in range(args.prompts)
        ]
        stop_ids = stop_token_ids(model, tok)
        results = {}
        for engine in ("transformers", "vllm"):
            source = SourceModel(
                name=engine,
                model=model,
                engine=engine,
                batch_size=args.batch_size,
                sampling=SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens),
            )
            started = time.perf_counter()
            runner = open_engine(source, stop_ids, tok.pad_token_id)
            load_s = time.perf_counter() - started
            runner.generate(prompts[:2], args.k, seed=1)  # warm-up
            started = time.perf_counter()
            outputs = runner.generate(prompts, args.k, seed=2)
            gen_s = time.perf_counter() - started
            runner.close()
            tokens = sum(len(c.token_ids) for out in outputs for c in out)
            results[engine] = tokens / gen_s
            print(
                f"{engine:>12}: load {load_s:6.1f}s  generate {gen_s:6.2f}s  {tokens:7,} tokens  "
                f"{tokens / gen_s:9,.0f} tok/s",
                flush=True,
            )
    print(
        f"vllm / transformers tokens/s: {results['vllm'] / results['transformers']:.2f}x "
        f"({args.prompts} prompts x k={args.k}, max_tokens={args.max_tokens}, hidden={args.hidden}, "
        f"layers={args.layers}, cpu threads={os.cpu_count()})"
    )


if __name__ == "__main__":
    main()
