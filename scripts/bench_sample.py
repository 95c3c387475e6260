"""Tokens/s of the two sample engines (vLLM, transformers) on the same tiny model and prompts, and what per-request
seeds cost in vLLM's sampler, in one run.

    python scripts/bench_sample.py [--prompts 64] [--k 4] [--max-tokens 64] [--hidden 128] [--layers 4] [--reps 3]

Each engine loads the model, warms up on two prompts, then samples k completions for every prompt; tokens/s is
generated tokens over generate time (loading excluded, reported apart). transformers runs first: vLLM's CPU
worker pins the process's threads. Timings depend on how busy the CPU is; compare the ratios, measured together.

Seeds: fusechat gives every vLLM request its own seed (a chunk's samples then depend only on its prompts and seed,
whichever replica, job or attempt runs it). vLLM then keeps one torch.Generator per sequence and, at every decode
step, draws each seeded sequence's noise in a Python loop (on GPU it also leaves FlashInfer's top-p/top-k kernel for
the PyTorch one). The same vLLM engine samples the same prompts with and without seeds, alternately, `--reps`
times each after one untimed round, every sequence exactly `--max-tokens` long (`ignore_eos`), so that only the
sampler differs.
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
    parser.add_argument("--reps", type=int, default=3, help="timed seeded and unseeded runs, alternately")
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
            if engine == "vllm":
                seeded = seed_cost(runner.llm, prompts, args)
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
    with_seed, without = seeded[True], seeded[False]
    print(
        f"vllm seeded / unseeded tokens/s: {with_seed / without:.2f}x ({with_seed:,.0f} vs {without:,.0f} tok/s, "
        f"{args.prompts * args.k} sequences of {args.max_tokens} tokens, best of {args.reps} each)"
    )


def seed_cost(llm, prompts: list[list[int]], args) -> dict[bool, float]:
    """Best tokens/s of the same requests with a seed each (as fusechat sends them) and without."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(i: int, seeded: bool) -> SamplingParams:
        return SamplingParams(
            n=args.k,
            temperature=0.8,
            top_p=0.95,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            seed=3 + i * args.k if seeded else None,
            detokenize=False,
        )

    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    best = {True: 0.0, False: 0.0}
    for rep in range(args.reps + 1):  # the first round warms both paths up, untimed
        for seeded in (False, True):
            batch = [params(i, seeded) for i in range(len(prompts))]
            started = time.perf_counter()
            outputs = llm.generate(requests, batch, use_tqdm=False)
            elapsed = time.perf_counter() - started
            tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
            if rep:
                best[seeded] = max(best[seeded], tokens / elapsed)
                print(f"{'seeded' if seeded else 'unseeded':>12}: generate {elapsed:6.2f}s  {tokens:7,} tokens")
    return best


if __name__ == "__main__":
    main()
