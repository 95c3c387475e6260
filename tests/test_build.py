"""`fusechat build` end to end on hand-written prompts/samples/scores versions (made with the real store), with the
tiny Llama tokenizer as target: acceptance rules, determinism, the length filter, errors, the CLI table."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fusechat.build import run_build
from fusechat.config import load_config
from fusechat.errors import UserError
from fusechat.prompts import read_prompts, run_prompts
from fusechat.store import RunStore, StageResult, run_stage

SOURCES = ("alpha", "beta", "gamma")


def write_config(root: Path, target: Path, **build) -> Path:
    items = {
        "chat": [f"Write a line about topic {i}." for i in range(30)],
        "math": [f"What is {i} + {i}?" for i in range(30)],
        "chinese": [f"写一句关于{i}的话。" for i in range(6)],
    }
    sources = []
    for domain, texts in items.items():
        path = root / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"q": t, "a": "x"}) + "\n" for t in texts))
        fields = {"prompt": "q", "answer": "a"} if domain == "math" else {"prompt": "q"}
        sources.append({"name": domain, "path": str(path), "domain": domain, "fields": fields})
    cfg = {
        "name": "b",
        "workdir": str(root / "runs"),
        "seed": 11,
        "prompts": {"sources": sources, "default_sft_ratio": 0.5},
        "build": {
            "margin": [0.01, 0.1],
            "sft_only_domains": ["chinese"],
            "verified_domains": {"math": "math"},
            "max_length": 2048,
            **build,
        },
        "target": {"path": str(target)},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def write_responses(store: RunStore, prompts_version, seed: int = 0, tamper=None):
    """A samples and a scores version, written by hand: per source 1-4 responses per prompt, rewards on the
    ArmoRM scale (close together so that many gaps fall in [0.01, 0.1]), math correctness, a few NaN / null
    rewards, truncated and blank responses, and duplicated texts."""
    rng = random.Random(seed)
    samples, scores = [], []
    for row in read_prompts(prompts_version).to_pylist():
        for src in rng.sample(SOURCES, rng.randint(1, 3)):
            for k in range(rng.randint(1, 4)):
                text = (
                    rng.choice(
                        [f"{src} says {k} about {row['prompt_id'][:6]}", "same text", "   ", f"long answer {'x' * 300}"]
                    )
                    if rng.random() < 0.3
                    else f"{src}-{k}-{row['prompt_id']}"
                )
                samples.append(
                    {
                        "prompt_id": row["prompt_id"],
                        "source": src,
                        "sample_index": k,
                        "text": text,
                        "num_tokens": len(text),
                        "finish_reason": "length" if rng.random() < 0.08 else "stop",
                    }
                )
                reward = rng.choice([None, float("nan")]) if rng.random() < 0.05 else round(rng.uniform(0.0, 0.15), 4)
                scores.append(
                    {
                        "prompt_id": row["prompt_id"],
                        "source": src,
                        "sample_index": k,
                        "reward": reward,
                        "correct": rng.random() < 0.6 if row["domain"] == "math" else None,
                        "verdict": "ok",
                    }
                )
    if tamper:
        tamper(samples, scores)

    def writer(name, rows):
        def body(out: Path) -> StageResult:
            (out / "data").mkdir(parents=True)
            half = len(rows) // 2  # two files, several row groups: the text reader must find rows anywhere
            for i, part in enumerate((rows[:half], rows[half:])):
                pq.write_table(pa.Table.from_pylist(part), out / "data" / f"part-{i}.parquet", row_group_size=37)
            return StageResult(counts={"rows": len(rows)})

        return body

    sv = run_stage(
        store, "samples", {"seed": seed}, {"prompts": prompts_version}, writer("samples", samples), log=lambda m: None
    )
    cv = run_stage(
        store,
        "scores",
        {"seed": seed, "t": bool(tamper)},
        {"samples": sv},
        writer("scores", scores),
        log=lambda m: None,
    )
    return sv, cv, samples, scores


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("build")
    cfg = load_config(write_config(root, tiny_llama), check_trl=False)
    store = RunStore(cfg.run_dir)
    pv = run_prompts(cfg, store, log=lambda m: None)
    sv, cv, samples, scores = write_responses(store, pv)
    version = run_build(cfg, store, log=lambda m: None)
    return {
        "root": root,
        "cfg": cfg,
        "store": store,
        "prompts": pv,
        "samples": samples,
        "scores": scores,
        "version": version,
    }


def test_rows_follow_the_selection_rules(world):
    prompts = {r["prompt_id"]: r for r in read_prompts(world["prompts"]).to_pylist()}
    text = {(r["prompt_id"], r["source"], r["sample_index"]): r for r in world["samples"]}
    score = {(r["prompt_id"], r["source"], r["sample_index"]): r for r in world["scores"]}

    def acceptable(key, chosen=True):
        s, t = score[key], text[key]
        ok = (
            s["reward"] is not None
            and s["reward"] == s["reward"]
            and t["finish_reason"] == "stop"
            and t["text"].strip()
        )
        if prompts[key[0]]["domain"] == "math":
            return ok and s["correct"] is chosen
        return bool(ok)

    sft = pq.read_table(world["version"].path / "sft" / "train.parquet").to_pylist()
    dpo = pq.read_table(world["version"].path / "dpo" / "train.parquet").to_pylist()
    assert sft and dpo
    for row in sft:
        key = (row["prompt_id"], row["source"], row["sample_index"])
        assert prompts[row["prompt_id"]]["split"] == "sft" and acceptable(key)
        assert row["reward"] == max(score[k]["reward"] for k in score if k[0] == row["prompt_id"] and acceptable(k))
        assert row["messages"] == [
            *prompts[row["prompt_id"]]["messages"],
            {"role": "assistant", "content": text[key]["text"]},
        ]
    for row in dpo:
        c, r = (
            (row["prompt_id"], row["source"], row["chosen_index"]),
            (row["prompt_id"], row["source"], row["rejected_index"]),
        )
        assert prompts[row["prompt_id"]]["split"] == "dpo" and prompts[row["prompt_id"]]["domain"] != "chinese"
        assert acceptable(c) and acceptable(r, chosen=False)
        assert row["chosen_reward"] == max(score[k]["reward"] for k in score if k[:2] == c[:2] and acceptable(k))
        assert row["rejected_reward"] == min(
            score[k]["reward"] for k in score if k[:2] == c[:2] and acceptable(k, chosen=False)
        )
        assert 0.01 - 1e-9 <= row["chosen_reward"] - row["rejected_reward"] <= 0.1 + 1e-9
        assert row["prompt"] == prompts[row["prompt_id"]]["messages"]
        assert row["chosen"] == [{"role": "assistant", "content": text[c]["text"]}]
        assert row["rejected"] == [{"role": "assistant", "content": text[r]["text"]}]
        assert row["chosen"] != row["rejected"]
    assert not {r["prompt_id"] for r in sft} & {r["prompt_id"] for r in dpo}


def test_stats_count_every_prompt_and_token_lengths_match_the_template(world):
    from fusechat.tokenizers import load_tokenizer

    stats = json.loads((world["version"].path / "stats.json").read_text())
    assert stats["inputs"] == {"prompts": "v001", "samples": "v001", "scores": "v001"}
    for name, kept in (("sft", "rows"), ("dpo", "pairs")):
        assert stats[name][kept] + sum(stats[name]["dropped"].values()) == stats[name]["prompts"]
        assert sum(stats[name]["by_source"].values()) == stats[name][kept]
    assert stats["dpo"]["dropped"]["sft_only_domain"] == stats["dpo"]["prompts_by_domain"]["chinese"]
    assert {"nan_reward", "null_reward", "truncated", "empty"} <= set(stats["responses"]["excluded"])
    assert stats["dpo"]["margin"]["kept"]["count"] == stats["dpo"]["pairs"]
    assert sum(stats["dpo"]["margin"]["histogram"]["kept"]) == stats["dpo"]["pairs"]
    # per domain and per source: every response, row, pair and drop is counted once
    domains = stats["domains"]
    assert set(domains) == {"chat", "math", "chinese"} and stats["warnings"] == []
    assert sum(d["candidates"] for d in domains.values()) == stats["responses"]["total"] == len(world["samples"])
    assert sum(d["sft_rows"] for d in domains.values()) == stats["sft"]["rows"]
    assert sum(d["dpo_pairs"] for d in domains.values()) == stats["dpo"]["pairs"]
    for name, d in domains.items():
        assert d["prompts"] == {
            "sft": stats["sft"]["prompts_by_domain"][name],
            "dpo": stats["dpo"]["prompts_by_domain"][name],
        }
        assert d["sft_rows"] == stats["sft"]["by_domain"].get(name, 0)
        for key in ("candidates", "acceptable", "sft_rows", "dpo_pairs"):
            assert sum(c[key] for c in d["by_source"].values()) == d[key]
        assert list(d["by_origin"]) == [name]  # one prompt file per domain in this world
        assert d["by_origin"][name]["sft_rows"] == d["sft_rows"] and d["by_origin"][name]["prompts"] == d["prompts"]
        assert (
            d["sft_rows"] + sum(d["dropped_prompts"]["sft"].values()) + sum(d["dropped_rows"]["sft"].values())
            == (d["prompts"]["sft"])
        )
        assert d["acceptable"] + sum(d["excluded_responses"].values()) <= d["candidates"]
    for reason, n in stats["responses"]["excluded"].items():
        assert sum(d["excluded_responses"].get(reason, 0) for d in domains.values()) == n
    for split in ("sft", "dpo"):
        for reason, n in stats[split]["dropped"].items():
            counted = sum(
                d["dropped_prompts"][split].get(reason, 0) + d["dropped_rows"][split].get(reason, 0)
                for d in domains.values()
            )
            assert counted == n, (split, reason)
    math_sources = {
        r["source"]
        for r in world["samples"]
        if r["prompt_id"]
        in {p["prompt_id"] for p in read_prompts(world["prompts"]).to_pylist() if p["domain"] == "math"}
    }
    assert set(domains["math"]["by_source"]) == math_sources
    tok = load_tokenizer(world["cfg"].target.path)
    rows = pq.read_table(world["version"].path / "sft" / "train.parquet").to_pylist()
    for row in rows:  # exact where build tokenized the row, else null (a bound settled that it fits)
        exact = len(tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
        assert row["num_tokens"] in (None, exact) and exact <= 2048
    assert stats["lengths"]["bound"] == "bytes" and stats["lengths"]["tokenized"] == 0  # char level: bytes settle it


def test_second_build_is_cached_then_byte_identical_with_force(world):
    logs = []
    again = run_build(world["cfg"], world["store"], log=logs.append)
    assert again.path == world["version"].path and logs[-1].startswith("cached")
    forced = run_build(world["cfg"], world["store"], force=True, log=lambda m: None)
    assert forced.name != world["version"].name
    for name in ("sft/train.parquet", "dpo/train.parquet", "stats.json"):
        assert (forced.path / name).read_bytes() == (world["version"].path / name).read_bytes(), name


def exact_lengths(world, tok) -> dict[tuple, int]:
    """Every candidate conversation's tokens in the target's template, by (prompt_id, source, sample_index)."""
    turns = {p["prompt_id"]: p["messages"] for p in read_prompts(world["prompts"]).to_pylist()}
    return {
        (s["prompt_id"], s["source"], s["sample_index"]): len(
            tok.apply_chat_template([*turns[s["prompt_id"]], {"role": "assistant", "content": s["text"]}])["input_ids"]
        )
        for s in world["samples"]
    }


def test_over_length_responses_give_way_to_the_next_best(tmp_path, tiny_llama):
    from fusechat.tokenizers import load_tokenizer

    limit = 120  # the short answers fit, the 300-character ones do not
    cfg = load_config(write_config(tmp_path, tiny_llama, max_length=limit), check_trl=False)
    store = RunStore(cfg.run_dir)
    pv = run_prompts(cfg, store, log=lambda m: None)

    def best_is_long(samples, scores):  # each source's first sample: too long, and the best-rewarded
        for s, c in zip(samples, scores, strict=True):
            if s["sample_index"] == 0:
                s["text"], s["finish_reason"], c["reward"] = f"long answer {'x' * 300}", "stop", 0.2

    _, _, samples, scores = write_responses(store, pv, seed=5, tamper=best_is_long)
    world = {"prompts": pv, "samples": samples, "scores": scores}
    version = run_build(cfg, store, log=lambda m: None)
    stats = json.loads((version.path / "stats.json").read_text())
    tok = load_tokenizer(cfg.target.path)
    length = exact_lengths(world, tok)
    prompts = {p["prompt_id"]: p for p in read_prompts(world["prompts"]).to_pylist()}
    score = {(c["prompt_id"], c["source"], c["sample_index"]): c for c in world["scores"]}

    def acceptable(s) -> bool:
        c = score[(s["prompt_id"], s["source"], s["sample_index"])]
        ok = c["reward"] is not None and c["reward"] == c["reward"] and s["finish_reason"] == "stop"
        ok = ok and bool(s["text"].strip())
        return ok and (prompts[s["prompt_id"]]["domain"] != "math" or c["correct"])

    best, best_fitting = {}, {}
    for s in world["samples"]:
        if prompts[s["prompt_id"]]["split"] != "sft" or not acceptable(s):
            continue
        key = (s["prompt_id"], s["source"], s["sample_index"])
        reward = score[key]["reward"]
        best[s["prompt_id"]] = max(best.get(s["prompt_id"], -1.0), reward)
        if length[key] <= limit:
            best_fitting[s["prompt_id"]] = max(best_fitting.get(s["prompt_id"], -1.0), reward)
    sft = pq.read_table(version.path / "sft" / "train.parquet").to_pylist()
    # every SFT prompt with an acceptable response that fits has a row: the best-rewarded of those that fit
    assert {r["prompt_id"]: r["reward"] for r in sft} == best_fitting
    gave_way = [p for p in best_fitting if best_fitting[p] < best[p]]
    assert gave_way, "the world should have prompts whose best answer is too long"
    for r in sft:
        assert len(tok.apply_chat_template(r["messages"])["input_ids"]) <= limit
    dpo = pq.read_table(version.path / "dpo" / "train.parquet").to_pylist()
    assert dpo and all(length[(r["prompt_id"], r["source"], r["chosen_index"])] <= limit for r in dpo)
    assert all(length[(r["prompt_id"], r["source"], r["rejected_index"])] <= limit for r in dpo)
    assert stats["responses"]["excluded"]["too_long"] > 0 and "too_long" not in stats["sft"]["dropped"]
    report = stats["lengths"]
    assert report["max_length"] == limit and report["rounds"] >= 1 and report["excluded_too_long"] > 0
    assert 0 < report["tokenized"] <= report["bounded"] < len(world["samples"])  # only what was in contention

    # truncate: a too-long winner competes whole and is written cut to fit
    cut = cfg.model_copy(update={"build": cfg.build.model_copy(update={"over_length": "truncate"})})
    version = run_build(cut, store, log=lambda m: None)
    stats = json.loads((version.path / "stats.json").read_text())
    rows = {r["prompt_id"]: r for r in pq.read_table(version.path / "sft" / "train.parquet").to_pylist()}
    assert {p: r["reward"] for p, r in rows.items()} == best
    shortened = [rows[p] for p in gave_way]
    assert stats["lengths"]["truncated"]["sft"] >= len(shortened) > 0
    for r in shortened:
        assert r["num_tokens"] == len(tok.apply_chat_template(r["messages"])["input_ids"]) <= limit
        assert r["messages"][-1]["content"].startswith("long answer x")


def test_identical_texts_are_dropped(tmp_path, tiny_llama):
    cfg = load_config(write_config(tmp_path, tiny_llama, max_length=None, margin=[0.0, 0.1]), check_trl=False)
    store = RunStore(cfg.run_dir)
    pv = run_prompts(cfg, store, log=lambda m: None)

    def same_text(samples, scores):
        for s in samples:
            s["text"], s["finish_reason"] = "the very same answer", "stop"

    write_responses(store, pv, seed=3, tamper=same_text)
    logs: list[str] = []
    stats = json.loads((run_build(cfg, store, log=logs.append).path / "stats.json").read_text())
    assert stats["dpo"]["pairs"] == 0 and stats["dpo"]["dropped"]["identical_texts"] > 0
    assert stats["max_length"] is None and stats["sft"]["tokens"] == {"count": 0}
    # a split that yields nothing is a warning naming the cause, in stats.json and on the console
    assert any(
        w.startswith("domain 'chat' yields 0 DPO pairs from") and "identical_texts" in w for w in stats["warnings"]
    )
    assert [f"WARNING: {w}" for w in stats["warnings"]] == [m for m in logs if m.startswith("WARNING")]


def test_a_domain_without_verdicts_is_a_loud_warning(tmp_path, tiny_llama):
    """A verified domain whose responses all lack a verdict (e.g. code prompts without tests) yields nothing:
    the warning says so instead of leaving the domain silently empty."""
    cfg = load_config(write_config(tmp_path, tiny_llama, max_length=None), check_trl=False)
    store = RunStore(cfg.run_dir)
    pv = run_prompts(cfg, store, log=lambda m: None)

    def no_verdicts(samples, scores):
        for s in scores:
            s["correct"] = None

    write_responses(store, pv, seed=5, tamper=no_verdicts)
    logs: list[str] = []
    stats = json.loads((run_build(cfg, store, log=logs.append).path / "stats.json").read_text())
    math = stats["domains"]["math"]
    assert math["sft_rows"] == math["dpo_pairs"] == math["acceptable"] == 0 and math["candidates"] > 0
    warning = next(w for w in stats["warnings"] if w.startswith("domain 'math'"))
    assert "yields 0 SFT rows and 0 DPO pairs" in warning and "excluded as unverified" in warning
    assert "no response has a verifier verdict" in warning
    assert f"WARNING: {warning}" in logs


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda sa, sc: sc.append({**sc[0], "source": "delta"}), "source 'delta' has no responses in the samples"),
        (lambda sa, sc: sc.append({**sc[0], "sample_index": 99}), "which is not a response of samples/"),
        (lambda sa, sc: sc.append(dict(sc[0])), "second score for"),
        (lambda sa, sc: sc.pop(), "has no score for 1 of"),
        (lambda sa, sc: sc.append({**sc[0], "prompt_id": "nope"}), "prompt_id 'nope' is not in prompts/v001"),
    ],
)
def test_scores_that_do_not_match_the_samples_are_clear_errors(tmp_path, tiny_llama, tamper, message):
    cfg = load_config(write_config(tmp_path, tiny_llama, max_length=None), check_trl=False)
    store = RunStore(cfg.run_dir)
    write_responses(store, run_prompts(cfg, store, log=lambda m: None), tamper=tamper)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run_build(cfg, store, log=lambda m: None)
    assert store.versions("datasets") == [] and store.partials("datasets") == []


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fusechat.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_cli_errors_and_summary_table(world, tmp_path, tiny_llama):
    empty = write_config(tmp_path, tiny_llama)
    res = run_cli("build", "-c", str(empty), cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no complete scores" in res.stderr
    res = run_cli("build", "-c", str(world["root"] / "cfg.yaml"), "--input", "scores=v007", cwd=tmp_path)
    assert res.returncode == 2 and "--input scores=v007" in res.stderr and "does not exist" in res.stderr
    res = run_cli("build", "-c", str(world["root"] / "cfg.yaml"), "--input", "sft=v001", cwd=tmp_path)
    assert res.returncode == 2 and "build reads prompts, samples, scores" in res.stderr
    res = run_cli(
        "build", "-c", str(world["root"] / "cfg.yaml"), "--set", "build.pair_source_rule=random", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    titles = (
        "datasets by domain and source",
        "by prompt dataset",
        "dropped by domain",
        "dpo margins",
        "sft_only_domain",
    )
    for title in (*titles, "alpha"):
        assert title in res.stdout
    assert "wrote: datasets/" in res.stdout
