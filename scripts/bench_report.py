"""Benchmark `fusechat report` at the scale of the real recipe: 3.2M scored responses, 5 sources, 5 domains.

Generates the versions the report reads, in their real layouts: prompts (640k), samples (manifest only: the report
never reads texts), scores (3.2M rows in 64k-row chunks), datasets (SFT rows and DPO pairs with short messages,
token counts, margins, a stats.json), sft and dpo (log_history.json of 1,000 logged steps each). Then writes the
report in a fresh process and prints its wall time, its peak RSS (ru_maxrss of the child) and the page's size.

    python scripts/bench_report.py                      # 3.2M responses
    python scripts/bench_report.py --responses 200000   # quick
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

SOURCES = ("gemma-2-27b", "mistral-large", "qwen2.5-72b", "llama-3.1-70b", "qwen2.5-math-72b")
DOMAINS = ("instruction", "math", "code", "chinese", "other")
K = 5
CHUNK = 65_536


def generate(root: Path, n_responses: int, seed: int = 0) -> None:
    from fusechat.store import RunStore, StageResult, run_stage

    rng = np.random.default_rng(seed)
    store = RunStore(root)
    n_prompts = n_responses // K
    ids = np.array([f"p{i:08d}" for i in range(n_prompts)], dtype=object)
    domain = rng.integers(0, len(DOMAINS), n_prompts)
    split = np.where(rng.random(n_prompts) < 0.4, "sft", "dpo")

    def version(stage, inputs, counts, write=lambda out: None):
        def body(out: Path) -> StageResult:
            write(out)
            return StageResult(counts=counts)

        return run_stage(store, stage, {"bench": stage}, inputs, body, force=True, log=lambda line: None)

    def write_prompts(out: Path) -> None:
        (out / "data").mkdir()
        table = pa.table({"prompt_id": ids, "domain": np.array(DOMAINS)[domain], "split": split})
        pq.write_table(table, out / "data" / "prompts.parquet")

    prompts = version("prompts", {}, {"prompts": n_prompts}, write_prompts)
    samples = version("samples", {"prompts": prompts}, {"samples": n_responses})

    def write_scores(out: Path) -> None:
        (out / "data").mkdir()
        p = np.repeat(np.arange(n_prompts), K)
        source = rng.integers(0, len(SOURCES), len(p))
        for c, start in enumerate(range(0, len(p), CHUNK)):
            sl = slice(start, start + CHUNK)
            reward = rng.normal(0.1 + 0.02 * source[sl], 0.05).astype(np.float64)
            table = pa.table(
                {
                    "prompt_id": ids[p[sl]],
                    "source": np.array(SOURCES)[source[sl]],
                    "sample_index": np.tile(np.arange(K), CHUNK)[: len(reward)],
                    "reward": reward,
                    "correct": pa.array(np.where(domain[p[sl]] == 1, reward > 0.12, None), pa.bool_()),
                    "verdict": np.full(len(reward), "reward:ok"),
                    "domain": np.array(DOMAINS)[domain[p[sl]]],
                }
            )
            pq.write_table(table, out / "data" / f"chunk-{c:06d}.parquet")

    scores = version("scores", {"samples": samples, "prompts": prompts}, {"responses": n_responses}, write_scores)

    def message(role: str, text: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    def write_datasets(out: Path) -> None:
        for name, mask in (("sft", split == "sft"), ("dpo", split == "dpo")):
            (out / name).mkdir()
            rows = np.flatnonzero(mask)
            src = np.array(SOURCES)[rng.integers(0, len(SOURCES), len(rows))]
            table = {"prompt_id": ids[rows], "domain": np.array(DOMAINS)[domain[rows]], "source": src}
            if name == "sft":
                table["messages"] = [message("user", "q") + message("assistant", "a")] * len(rows)
                table["reward"] = rng.normal(0.2, 0.03, len(rows))
            else:
                table["prompt"] = [message("user", "q")] * len(rows)
                table["chosen"] = [message("assistant", "a")] * len(rows)
                table["rejected"] = [message("assistant", "b")] * len(rows)
                table["margin"] = rng.uniform(0.01, 0.1, len(rows))
                table["chosen_tokens"] = rng.integers(50, 2048, len(rows))
                table["rejected_tokens"] = rng.integers(50, 2048, len(rows))
            pq.write_table(pa.table(table), out / name / "train.parquet")
        stats = {
            "responses": {"total": n_responses, "excluded": {"truncated": 1000}},
            "dpo": {"margin": {"band": [0.01, 0.1]}},
        }
        (out / "stats.json").write_text(json.dumps(stats))

    datasets = version("datasets", {"prompts": prompts, "samples": samples, "scores": scores}, {}, write_datasets)

    def write_log(out: Path) -> None:
        log = [
            {"loss": 1 / (s + 1), "rewards/margins": s / 1000, "rewards/accuracies": 0.5, "step": s}
            for s in range(1000)
        ]
        (out / "log_history.json").write_text(json.dumps(log))

    sft = version("sft", {"datasets": datasets}, {}, write_log)
    version("dpo", {"datasets": datasets, "sft": sft}, {}, write_log)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=3_200_000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-report"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.time()
    generate(args.out, args.responses)
    print(f"generated {args.responses:,} scored responses in {time.time() - started:.0f}s under {args.out}")
    code = "import sys; from fusechat.report import write_report; from fusechat.store import RunStore; "
    code += "print(write_report(RunStore(sys.argv[1])))"
    started = time.time()
    subprocess.run([sys.executable, "-c", code, str(args.out)], check=True)
    wall = time.time() - started
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size = (args.out / "report.html").stat().st_size / 1e6
    print(f"report: {wall:.1f}s wall, peak RSS {rss:,.0f} MB, {size:.1f} MB page")


if __name__ == "__main__":
    main()
