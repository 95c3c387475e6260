"""Benchmark `fusechat build` at the scale of the real recipe: 3.2M scored responses of ~2 KB.

Generates (streaming, in batches) a prompts, a samples and a scores version: 4 sources x 5 samples per prompt,
domains chat / math / code / chinese, rewards on the ArmoRM scale, math/code correctness, a few null rewards,
truncated and empty responses; every text unique. The target tokenizer is a byte-level BPE with a Llama-3 chat
template. Then runs the build in a fresh process and reports its wall time and peak RSS (ru_maxrss of the
child), plus the stage's own timings and what the length filter measured (`lengths`: responses bounded, tokenized,
excluded as too long). Target: 3.2M responses with the filter on in <= 120 s and <= 4 GB.

    python scripts/bench_build.py                      # 3.2M responses (~7 GB on disk under --out)
    python scripts/bench_build.py --responses 200000   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SOURCES = ("gemma", "mistral", "llama", "qwen")
K = 5
DOMAINS = (("chat", 0.6), ("math", 0.25), ("code", 0.1), ("chinese", 0.05))
BATCH = 65_536  # responses per samples/scores file


def generate(root: Path, n_responses: int, max_length: int | None, seed: int = 0) -> Path:
    from fusechat.config import load_config
    from fusechat.demo.tiny import build_tokenizer
    from fusechat.prompts import PROMPTS_SCHEMA
    from fusechat.sample import SAMPLES_SCHEMA
    from fusechat.store import RunStore, StageResult, run_stage

    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    pool = [" ".join(rng.choice(words, 330)) for _ in range(4096)]  # ~2 KB each
    tok = build_tokenizer("llama3", "bpe", corpus=pool[:400], vocab_size=4000)
    tok.save_pretrained(root / "target")
    config = {
        "name": "bench",
        "workdir": str(root / "runs"),
        "seed": seed,
        "prompts": {"sources": [{"name": "x", "path": "x.jsonl", "domain": "chat", "fields": {"prompt": "q"}}]},
        "build": {
            "sft_only_domains": ["chinese"],
            "verified_domains": {"math": "math", "code": "code"},
            "max_length": max_length,
        },
        "target": {"path": str(root / "target")},
    }
    (root / "cfg.yaml").write_text(json.dumps(config))
    cfg = load_config(root / "cfg.yaml", check_trl=False)
    store = RunStore(cfg.run_dir)

    n_prompts = n_responses // (len(SOURCES) * K)
    ids = [f"p{i:09d}" for i in range(n_prompts)]
    names, probs = zip(*DOMAINS, strict=True)
    domain = rng.choice(names, n_prompts, p=probs)
    split = np.where(rng.random(n_prompts) < 0.4, "sft", "dpo")

    def prompts_body(out: Path) -> StageResult:
        (out / "data").mkdir(parents=True)
        messages = [
            [{"role": "user", "content": f"Question {i}: " + pool[i % len(pool)][:200]}] for i in range(n_prompts)
        ]
        table = pa.table(
            {
                "prompt_id": ids,
                "domain": domain,
                "split": split,
                "messages": messages,
                "reference": [None] * n_prompts,
                "origin": ["bench"] * n_prompts,
            }
        )
        pq.write_table(table.cast(PROMPTS_SCHEMA), out / "data" / "prompts.parquet")
        return StageResult(counts={"prompts": n_prompts})

    pv = run_stage(store, "prompts", {"bench": n_responses}, {}, prompts_body)

    # Response r: prompt r // 20, source (r // 5) % 4, sample r % 5.
    def batches():
        for start in range(0, n_prompts * len(SOURCES) * K, BATCH):
            r = np.arange(start, min(start + BATCH, n_prompts * len(SOURCES) * K))
            yield start // BATCH, r, r // (len(SOURCES) * K), (r // K) % len(SOURCES), r % K

    base = rng.uniform(0.05, 0.2, n_prompts)

    def samples_body(out: Path) -> StageResult:
        (out / "data").mkdir(parents=True)
        for b, r, p, s, k in batches():
            pick = rng.integers(0, len(pool), len(r))
            text = [pool[j] + f" [{i}]" for j, i in zip(pick.tolist(), r.tolist(), strict=True)]
            for i in np.flatnonzero(rng.random(len(r)) < 0.005):
                text[i] = " "
            table = pa.table(
                {
                    "prompt_id": pa.array(ids).take(p),
                    "source": np.array(SOURCES)[s],
                    "sample_index": k,
                    "text": text,
                    "num_tokens": np.full(len(r), 500),
                    "finish_reason": np.where(rng.random(len(r)) < 0.03, "length", "stop"),
                    "identical_samples": np.zeros(len(r), dtype=bool),
                }
            )
            pq.write_table(table.cast(SAMPLES_SCHEMA), out / "data" / f"chunk-{b:05d}.parquet", row_group_size=16_384)
            print(f"\rsamples: {r[-1] + 1:,} responses", end="", flush=True)
        print()
        return StageResult()

    sv = run_stage(store, "samples", {"bench": n_responses}, {"prompts": pv}, samples_body)

    def scores_body(out: Path) -> StageResult:
        (out / "data").mkdir(parents=True)
        verified = np.isin(domain, ["math", "code"])
        for b, r, p, s, k in batches():
            reward = base[p] + 0.01 * s + rng.normal(0, 0.03, len(r))
            correct = np.where(verified[p], rng.random(len(r)) < 0.7, False)
            table = pa.table(
                {
                    "prompt_id": pa.array(ids).take(p),
                    "source": np.array(SOURCES)[s],
                    "sample_index": k,
                    "reward": pa.array(reward, mask=rng.random(len(r)) < 0.001),
                    "correct": pa.array(correct, mask=~verified[p]),
                    "verdict": ["ok"] * len(r),
                }
            )
            pq.write_table(table, out / "data" / f"chunk-{b:05d}.parquet")
        return StageResult()

    run_stage(store, "scores", {"bench": n_responses}, {"samples": sv}, scores_body)
    return root / "cfg.yaml"


def build_once(config: str) -> None:
    """The measured part, run in a child process so that its peak RSS is its own."""
    from fusechat.build import run_build
    from fusechat.config import load_config
    from fusechat.store import RunStore

    cfg = load_config(config, check_trl=False)
    version = run_build(cfg, RunStore(cfg.run_dir), force=True)
    print(
        json.dumps(
            {
                "version": version.name,
                "counts": {k: v for k, v in version.manifest["counts"].items() if not isinstance(v, dict)},
                "timings": version.manifest["timings"],
                "lengths": json.loads((version.path / "stats.json").read_text())["lengths"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=3_200_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fusechat-bench-build"))
    ap.add_argument(
        "--max-length",
        default="2048",
        help="build.max_length; 'none' skips the length filter "
        "(tokenizing the kept texts in the target tokenizer dominates on a small CPU)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated versions")
    ap.add_argument("--build-only", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_once(args.build_only)
        return
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.time()
    config = generate(args.out, args.responses, None if args.max_length == "none" else int(args.max_length))
    size = sum(f.stat().st_size for f in (args.out / "runs").rglob("*.parquet"))
    print(f"generated {args.responses:,} responses ({size / 1e9:.2f} GB of Parquet) in {time.time() - t0:.0f}s")
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--build-only", str(config)], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "responses": args.responses,
                "max_length": args.max_length,
                "build_wall_s": round(wall, 1),
                "peak_rss_mb": round(peak_mb),
                **result,
            },
            indent=1,
        )
    )
    print(
        f"targets: wall < 120 s: {'ok' if wall < 120 else 'MISSED'}; peak < 4096 MB: "
        f"{'ok' if peak_mb < 4096 else 'MISSED'}"
    )
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
