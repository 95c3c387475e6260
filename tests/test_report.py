"""`fusechat report`: the page built from versions on disk (synthetic runs in the real layouts), what it does with
missing pieces and failing figures, and the small demo's page in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import base64
import html as htmllib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from headless import Chromium, install_chromium
from PIL import Image
from typer.testing import CliRunner

from fusechat.report import plots, read, write_report
from fusechat.store import RunStore, StageResult, Version, run_stage

SECTIONS = ["summary", "prompts", "rewards", "wins", "dpo", "drops", "training", "eval", "lineage"]


def make_version(store: RunStore, stage: str, inputs: dict[str, Version], counts=None, files=None, **config):
    """A complete version with the given counts and files (Parquet tables, JSON, text), as a stage writes it."""

    def body(out: Path) -> StageResult:
        for rel, content in (files or {}).items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, pa.Table):
                pq.write_table(content, path)
            else:
                path.write_text(content if isinstance(content, str) else json.dumps(content))
        return StageResult(counts=counts or {})

    return run_stage(store, stage, config, inputs, body, force=True, log=lambda line: None)


def messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def synthetic_run(root: Path, *, domain_column: bool = True, token_columns: bool = True) -> RunStore:
    """Two sources, three domains (math verified), every stage: the columns and nesting the stages write."""
    store = RunStore(root)
    domains = ["math", "instruction", "code"]
    prompt_rows = [
        {"prompt_id": f"p{i}", "domain": domains[i % 3], "split": "sft" if i < 6 else "dpo"} for i in range(12)
    ]
    prompts = make_version(
        store,
        "prompts",
        {},
        counts={
            "prompts": 12,
            "by_domain": {
                "math": {"sft": 2, "dpo": 2},
                "instruction": {"sft": 2, "dpo": 2},
                "code": {"sft": 2, "dpo": 2},
            },
            "by_source": {
                "a": {"read": 9, "kept": 6, "dropped_duplicate": 2, "dropped_empty": 1},
                "b": {"read": 7, "kept": 6, "dropped_duplicate": 1},
            },
        },
        files={"data/prompts.parquet": pa.Table.from_pylist(prompt_rows)},
    )
    samples = make_version(
        store,
        "samples",
        {"prompts": prompts},
        counts={
            "prompts": 12,
            "samples": 48,
            "by_source": {
                "a": {"prompts": 12, "samples": 24, "skipped_too_long": 0, "finish_length": 3},
                "b": {"prompts": 12, "samples": 24, "skipped_too_long": 1, "finish_length": 0, "identical_prompts": 2},
            },
        },
    )
    score_rows = []
    for r in prompt_rows:
        for source, base in (("a", 1.0), ("b", -1.0)):
            for k in range(2):
                row = {
                    "prompt_id": r["prompt_id"],
                    "source": source,
                    "sample_index": k,
                    "reward": base + 0.1 * k,
                    "correct": (k == 0) if r["domain"] == "math" else None,
                    "verdict": "reward:ok",
                }
                if domain_column:
                    row["domain"] = r["domain"]
                score_rows.append(row)
    scores = make_version(
        store,
        "scores",
        {"samples": samples, "prompts": prompts},
        counts={"responses": 48, "by_verdict": {"reward:ok": 47, "reward:error": 1, "math:wrong": 4}, "reward_null": 1},
        files={"data/chunk-000000.parquet": pa.Table.from_pylist(score_rows)},
    )
    sft_rows = [
        {"prompt_id": f"p{i}", "domain": domains[i % 3], "source": "a" if i % 2 else "b", "reward": 1.0}
        for i in range(5)
    ]
    dpo_rows = []
    for i in range(6, 11):
        row = {
            "prompt_id": f"p{i}",
            "domain": domains[i % 3],
            "prompt": messages(("user", f"q{i}")),
            "chosen": messages(("assistant", "x" * (10 + i))),
            "rejected": messages(("assistant", "y" * 12)),
            "source": "a",
            "chosen_reward": 1.1,
            "rejected_reward": 1.0 - 0.01 * i,
            "margin": 0.1 + 0.01 * i,
        }
        if token_columns:
            row.update(chosen_tokens=20 + i, rejected_tokens=22)
        dpo_rows.append(row)
    stats = {
        "responses": {"total": 48, "excluded": {"truncated": 3, "null_reward": 1}},
        "sft": {"rows": 5, "dropped": {"no_acceptable_response": 1}},
        "dpo": {
            "pairs": 5,
            "dropped": {"margin_below_band": 1, "a_reason_added_later": 7},
            "margin": {
                "band": [0.1, 0.3],
                "histogram": {
                    "edges": [0.1, 0.2, 0.3],
                    "kept": [5, 0],
                    "candidates": [6, 1],
                    "candidates_below": 4,
                    "candidates_above": 0,
                },
            },
        },
        # build's per domain breakdown (and per source, per prompt dataset within it), plus a key added later.
        "domains": {
            "math": {
                "prompts": {"sft": 2, "dpo": 2},
                "candidates": 16,
                "acceptable": 8,
                "sft_rows": 2,
                "dpo_pairs": 1,
                "excluded_responses": {"truncated": 3},
                "dropped_prompts": {"sft": {}, "dpo": {"margin_below_band": 1}},
                "dropped_rows": {"sft": {}, "dpo": {}},
                "a_count_added_later": 5,
                "by_source": {
                    "a": {
                        "prompts": 4,
                        "candidates": 8,
                        "acceptable": 6,
                        "sft_rows": 1,
                        "dpo_pairs": 1,
                        "excluded_responses": {"truncated": 3},
                    },
                    "b": {
                        "prompts": 4,
                        "candidates": 8,
                        "acceptable": 2,
                        "sft_rows": 1,
                        "dpo_pairs": 0,
                        "excluded_responses": {},
                    },
                },
                "by_origin": {
                    "gsm": {
                        "prompts": {"sft": 2, "dpo": 2},
                        "sft_rows": 2,
                        "dpo_pairs": 1,
                        "dropped_prompts": {"margin_below_band": 1},
                    },
                },
            },
            "code": {"prompts": {"sft": 2, "dpo": 2}, "candidates": 16, "acceptable": 0, "sft_rows": 0, "dpo_pairs": 0},
        },
        "warnings": ["domain 'code' yields 0 SFT rows and 0 DPO pairs from 4 prompts (16 responses, 0 acceptable)"],
    }
    datasets = make_version(
        store,
        "datasets",
        {"prompts": prompts, "samples": samples, "scores": scores},
        counts={"sft_rows": 5, "dpo_pairs": 5},
        files={
            "sft/train.parquet": pa.Table.from_pylist(sft_rows),
            "dpo/train.parquet": pa.Table.from_pylist(dpo_rows),
            "stats.json": stats,
        },
        build={"margin": [0.1, 0.3]},
    )
    sft_log = [{"loss": 2.0 - 0.1 * s, "mean_token_accuracy": 0.5 + 0.01 * s, "step": s} for s in range(1, 11)]
    sft_log.append({"train_runtime": 1.0, "train_loss": 1.5, "step": 10})
    sft = make_version(
        store, "sft", {"datasets": datasets}, counts={"rows": 5}, files={"log_history.json": sft_log}, trl={}
    )
    dpo_log = [
        {"loss": 0.69 - 0.01 * s, "rewards/margins": 0.01 * s, "rewards/accuracies": 0.5 + 0.04 * s, "step": s}
        for s in range(1, 6)
    ]
    dpo = make_version(
        store,
        "dpo",
        {"datasets": datasets, "sft": sft},
        counts={"rows": 5},
        files={"log_history.json": dpo_log},
        trl={"logging_steps": 1},
    )
    for model, acc in (("target", 0.25), (f"sft/{sft.name}", 0.5), (f"dpo/{dpo.name}", 0.75), ("source:a", 0.4)):
        counts = {"model": model, "model_id": model, "accuracy": {"gsm8k": acc, "count": acc / 2}, "judged": {}}
        make_version(store, "eval", {}, counts=counts, model=model)
    return store


def images(html: str) -> list[tuple[str, Image.Image]]:
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)"', html)
    return [(alt, Image.open(io.BytesIO(base64.b64decode(data)))) for data, alt in found]


def notes(html: str) -> list[str]:
    return re.findall(r'<p class="note">([^<]*)</p>', html)


def test_report_of_a_synthetic_run_has_every_section_and_figure(tmp_path):
    store = synthetic_run(tmp_path / "run")
    path = write_report(store)
    assert path == store.root / "report.html"
    html = path.read_text()
    assert re.findall(r'<section id="([a-z]+)">', html) == SECTIONS
    assert notes(html) == []
    drawn = images(html)
    assert [alt for alt, _ in drawn] == [
        "prompts per domain and split",
        "reward distribution per source and domain",
        "SFT win share per source and domain",
        "acceptable share per source and domain",
        "DPO margin histogram",
        "chosen vs rejected lengths",
        "drop reasons per stage",
        "training curves",
        "eval scores before and after fusion",
        "stage timings",
    ]
    for alt, img in drawn:
        img.load()  # decodes the whole PNG
        assert img.width >= 500 and img.height >= 200, (alt, img.size)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # Drops: per-source prompt drops summed, sample and score flags, every stats.json reason (also unknown ones).
    text = htmllib.unescape(re.sub(r"<[^>]+>", "|", html))
    assert "|prompts||duplicate||3||prompts||same domain and text as an earlier prompt||a: 2, b: 1|" in text
    assert "|samples||finish_length||3||responses|" in text
    assert "|samples||skipped_too_long||1||prompts|" in text
    assert "|samples||identical_prompts||2||prompts|" in text
    assert "|score (flagged)||verdict reward:error||1||responses|" in text
    assert "|build (dpo)||a_reason_added_later||7||prompts|" in text
    assert "|build (responses)||null_reward||1||responses|" in text
    assert (
        "|build (responses)||truncated||3||responses||cut at max_tokens (build), or longer than the reward model's window (score)||a: 3|"
        in text
    )
    assert "|build (dpo)||margin_below_band||1||prompts||every same-source gap below build.margin||math: 1|" in text
    # build's per domain x source counts, whatever keys they have; its warnings; what each prompt dataset yielded.
    assert "|math||all||2 / 2||16||8||50.0%||2||1|||truncated=3||||dpo: margin_below_band=1|||–||5|" in text
    assert "|||a||4||8||6||75.0%||1||1|||truncated=3|||" in text
    assert "|code||all||2 / 2||16||0||0.0%||0||0|" in text
    assert '<p class="warning">build: domain &#x27;code&#x27; yields 0 SFT rows' in html
    assert "|math||gsm||2 / 2||2||1|||margin_below_band=1|||" in text
    assert "|a||9||6||2||1|" in text  # prompts: read, kept, dropped_duplicate, dropped_empty
    # Eval: before / after SFT / after DPO with deltas, as the comparison computes them (in %).
    assert "|gsm8k||25.0||50.0||75.0|||+25.0||||+50.0||" in text
    assert "every evaluated model" in html and "|a (eval/v004)|" in text
    # Lineage: every version listed, the shown ones in bold.
    assert "<b>dpo/v001</b>" in html and "eval/v004 (source:a)" in html


def test_the_report_follows_the_newest_model_unless_pinned(tmp_path):
    store = synthetic_run(tmp_path / "run")
    prompts, samples, scores = (store.latest(s) for s in ("prompts", "samples", "scores"))
    newer = make_version(store, "datasets", {"prompts": prompts, "samples": samples, "scores": scores}, again=1)
    assert newer.name == "v002"
    assert read.lineage(store)["datasets"].name == "v001"  # what dpo/v001 was trained on
    pinned = read.lineage(store, {"datasets": "v002"})
    assert pinned["datasets"].name == "v002" and pinned["dpo"].name == "v001"
    html = write_report(store, pinned={"datasets": "v002"}).read_text()
    assert "Versions shown: prompts/v001, samples/v001, scores/v001, datasets/v002, sft/v001, dpo/v001" in html
    # datasets/v002 has no files: its sections say so in one line each; the rest of the page is drawn.
    where = store.root / "datasets/v002"
    assert notes(html) == [
        "Which source won: SFT rows and DPO pairs per domain: could not be built "
        f"(FileNotFoundError: no Parquet files in {where / 'sft'})",
        f"DPO pairs: margins and lengths: could not be built (FileNotFoundError: no Parquet files in {where / 'dpo'})",
    ]
    assert len(images(html)) == 6


def test_a_figure_or_section_that_fails_is_one_line(tmp_path, monkeypatch):
    store = synthetic_run(tmp_path / "run")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "rewards_plot", broken)
    monkeypatch.setattr(read, "read_pairs", broken)
    html = write_report(store).read_text()
    assert notes(html) == [
        "reward distribution per source and domain: could not be drawn (RuntimeError: no fonts today)",
        "DPO pairs: margins and lengths: could not be built (RuntimeError: no fonts today)",
    ]
    assert len(images(html)) == 7  # the ten figures but these three
    assert re.findall(r'<section id="([a-z]+)">', html) == SECTIONS


def test_missing_stages_are_lines_not_errors(tmp_path):
    store = RunStore(tmp_path / "run")
    make_version(
        store,
        "prompts",
        {},
        counts={"prompts": 2},
        files={
            "data/prompts.parquet": pa.Table.from_pylist(
                [
                    {"prompt_id": "a", "domain": "math", "split": "sft"},
                    {"prompt_id": "b", "domain": "x", "split": "dpo"},
                ]
            )
        },
    )
    html = write_report(store).read_text()
    assert re.findall(r'<section id="([a-z]+)">', html) == SECTIONS
    assert notes(html) == [
        "no scores version",
        "no datasets version",
        "no datasets version",
        "nothing was dropped (or no stage recorded drops)",
        "no sft version",
        "no dpo version",
        "no eval version: fusechat eval (or run) evaluates the target before and after fusion",
    ]
    # Counted from the Parquet file when the manifest has no by_domain.
    assert "|math||1||0||1|" in re.sub(r"<[^>]+>", "|", html).replace("||–|", "||0|")


def test_readers_fall_back_for_older_layouts(tmp_path):
    store = synthetic_run(tmp_path / "run", domain_column=False, token_columns=False)
    v = read.lineage(store)
    rewards = read.read_rewards(v["scores"], v["prompts"])
    assert sorted(rewards.domains) == ["code", "instruction", "math"] and sorted(rewards.sources) == ["a", "b"]
    assert rewards.group("math", "a").tolist() == pytest.approx([1.0, 1.1] * 4)
    summary = {(r["domain"], r["source"]): r for r in read.reward_summary(rewards)}
    assert summary[("math", "a")]["correct"] == 0.5 and summary[("code", "a")]["correct"] is None
    pairs = read.read_pairs(v["datasets"])
    assert pairs.length_unit == "characters"
    assert pairs.chosen_len.tolist() == [16, 17, 18, 19, 20] and set(pairs.rejected_len.tolist()) == {12}
    assert read.margin_band(v["datasets"], {}) == (0.1, 0.3)  # from the manifest's build config
    steps, values = read.curves(read.log_history(v["sft"]), ("loss",))["loss"]
    assert steps == list(range(1, 11)) and values[0] == pytest.approx(1.9)  # the final summary is not a point


def test_report_command(tmp_path):
    from fusechat.cli import app

    synthetic_run(tmp_path / "runs" / "t")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "workdir": str(tmp_path / "runs"),
                "prompts": {"sources": [{"name": "p", "path": "p.jsonl", "domain": "m", "fields": {"prompt": "q"}}]},
            }
        )
    )
    ok = CliRunner().invoke(app, ["report", "-c", str(cfg)])
    assert ok.exit_code == 0, ok.output
    assert f"report: {tmp_path / 'runs' / 't' / 'report.html'}" in ok.output.replace("\n", "")
    out = tmp_path / "elsewhere" / "r.html"
    assert CliRunner().invoke(app, ["report", "-c", str(cfg), "--output", str(out)]).exit_code == 0
    assert out.read_text().startswith("<!doctype html>")
    bad = CliRunner().invoke(app, ["report", "-c", str(cfg), "--input", "sample=v001"])
    assert bad.exit_code == 2 and "--input sample=...: the report shows prompts, samples" in bad.output
    missing = CliRunner().invoke(app, ["report", "-c", str(cfg), "--input", "dpo=v009"])
    assert missing.exit_code == 2 and "dpo=v009" in missing.output
    nowhere = CliRunner().invoke(app, ["report", "-c", str(cfg), "--set", "name=other"])
    assert nowhere.exit_code == 2 and "no run directory" in nowhere.output


# --------------------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="session")
def chromium() -> str:
    binary = install_chromium()
    if binary is None:
        pytest.skip("chromium is missing and cannot be installed here (apt-get install -y chromium, as root)")
    return binary


@pytest.mark.slow
def test_demo_report_renders_in_headless_chromium(small_demo, chromium):
    cwd, first = small_demo
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "report: runs/demo/report.html" in first.stdout
    report = cwd / "runs/demo/report.html"
    with Chromium(chromium, width=1280, height=900) as browser:
        found = browser.page_report(report, screenshot=cwd / "report.png", pdf=cwd / "report.pdf")
    assert [s["id"] for s in found["sections"]] == SECTIONS
    assert all(not s["notes"] for s in found["sections"]), [s["notes"] for s in found["sections"]]
    assert len(found["images"]) == 10
    for img in found["images"]:
        assert img["decoded"] and img["complete"], img
        assert img["width"] >= 500 and img["height"] >= 200, img  # natural size of the PNG
        assert img["shown"] >= 400, img  # laid out at a readable width
    assert found["console_errors"] == [] and found["exceptions"] == [] and found["log_errors"] == []
    assert found["failed_requests"] == []
    assert all(url.startswith(("file://", "data:image/png;base64,")) for url in found["requests"]), found["requests"]
    assert found["scrollWidth"] <= found["innerWidth"]  # no horizontal scrolling on a laptop-wide window
    shot = Image.open(cwd / "report.png")
    assert shot.width == 1280 and shot.height == found["height"]
    assert found["pdf_pages"] >= 3  # prints, on A4/Letter pages
