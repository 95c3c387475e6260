"""The report page: one section per question an engineer asks about a fusion run, each built from the versions on
disk (`read`) and drawn (`plots`) into one self-contained HTML file: PNGs embedded as data URIs, no script, no
network. A section or figure that cannot be built is one line in the page, never a crash."""

from __future__ import annotations

import base64
import html
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fusechat.errors import UserError
from fusechat.report import plots, read
from fusechat.store import RunStore, Version

# The curves drawn per trainer, in this order, when the trainer logged them.
CURVES = {"sft": ("loss", "eval_loss", "mean_token_accuracy"), "dpo": ("loss", "rewards/margins", "rewards/accuracies")}
# What the trainers' summaries in the manifests report, shown under the curves.
TRAIN_SUMMARY = ("global_step", "effective_batch", "train_loss", "final_loss", "reward_margin", "reward_accuracy")
TRAIN_SUMMARY += ("tokens_per_s", "train_runtime_s")


@dataclass
class Run:
    store: RunStore
    versions: dict[str, Version]  # the lineage shown, by stage
    stats: dict[str, Any]
    colors: dict[str, Any]


Builder = Callable[[Run], list[str]]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: Iterable[Iterable[Any]], caption: str | None = None, cls: str = "") -> str:
    """Numbers right-aligned; a cell may be pre-rendered as ("html", markup) or ("num", text)."""

    def cell(v: Any) -> str:
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "html":
            return f"<td>{v[1]}</td>"
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "num":
            return f'<td class="num">{esc(v[1])}</td>'
        num = isinstance(v, int | float) and not isinstance(v, bool)
        return f'<td class="num">{esc(fmt(v))}</td>' if num else f"<td>{esc(fmt(v))}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(name: str, draw: Callable[[], Any], caption: str, half: bool = False) -> str:
    """A drawn figure as an embedded PNG, or one line saying why it could not be drawn."""
    try:
        data = plots.png(draw())
    except Exception as e:  # one figure failing must not lose the page
        return note(f"{name}: could not be drawn ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return (
        f'<figure class="{"half" if half else "full"}"><img src="{src}" alt="{esc(name)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


# --------------------------------------------------------------------------------------------- sections
def summary_section(run: Run) -> list[str]:
    v = run.versions
    shown = ", ".join(x.ref for x in v.values()) or "none"
    tiles = []
    if "prompts" in v:
        tiles.append(("prompts", read.dig(v["prompts"].manifest, "counts", "prompts")))
    if "samples" in v:
        tiles.append(("responses sampled", read.dig(v["samples"].manifest, "counts", "samples")))
    if "datasets" in v:
        counts = v["datasets"].manifest.get("counts", {})
        tiles += [("SFT rows", counts.get("sft_rows")), ("DPO pairs", counts.get("dpo_pairs"))]
    sources = sorted(read.dig(v.get("samples").manifest, "counts", "by_source") or {}) if "samples" in v else []
    parts = [
        '<div class="tiles">'
        + "".join(f'<div class="tile"><b>{esc(fmt(n))}</b><span>{esc(k)}</span></div>' for k, n in tiles)
        + "</div>",
        f"<p>Versions shown: {esc(shown)} (the newest model and the data it was made from; every version is listed "
        'under <a href="#lineage">lineage</a>).</p>',
    ]
    if sources:
        parts.append(f"<p>Sources: {esc(', '.join(sources))}.</p>")
    for warning in run.stats.get("warnings") or []:
        parts.append(f'<p class="warning">build: {esc(warning)}</p>')
    if not v:
        parts.append(note(f"no complete version in {run.store.root}: run the pipeline first"))
    return parts


def prompts_section(run: Run) -> list[str]:
    if "prompts" not in run.versions:
        return [note("no prompts version")]
    by_domain = read.prompts_by_domain(run.versions["prompts"])
    splits = plots.split_order({s for c in by_domain.values() for s in c})
    rows = [[d, *(c.get(s, 0) for s in splits), sum(c.values())] for d, c in by_domain.items()]
    rows.append(["total", *(sum(c.get(s, 0) for c in by_domain.values()) for s in splits), sum(r[-1] for r in rows)])
    parts = [
        figure(
            "prompts per domain and split",
            lambda: plots.prompts_plot(by_domain),
            f"Prompts of {run.versions['prompts'].ref} per domain: the SFT split feeds SFT rows, the DPO split "
            "DPO pairs.",
        ),
        table(["domain", *splits, "total"], rows, cls="compact"),
    ]
    read_kept = read.dig(run.versions["prompts"].manifest, "counts", "by_source")
    if isinstance(read_kept, dict) and read_kept:
        rows = [{"prompt dataset": name, **c} for name, c in read_kept.items() if isinstance(c, dict)]
        parts.append(counts_table(rows, "per prompt dataset: records read, prompts kept, records dropped", set()))
    domains = run.stats.get("domains")
    if isinstance(domains, dict):
        rows = [
            {"domain": name, "prompt dataset": origin, **c}
            for name, d in domains.items()
            for origin, c in ((d.get("by_origin") or {}) if isinstance(d, dict) else {}).items()
        ]
        if rows:
            caption = "what each prompt dataset yielded (build's stats.json; prompts: sft / dpo)"
            parts.append(counts_table(rows, caption, set()))
    return parts


def rewards_section(run: Run) -> list[str]:
    if "scores" not in run.versions:
        return [note("no scores version")]
    rewards = read.read_rewards(run.versions["scores"], run.versions.get("prompts"))
    groups = {d: {s: rewards.group(d, s) for s in sorted(rewards.sources)} for d in sorted(rewards.domains)}
    groups = {d: {s: v for s, v in by_source.items() if v.size} for d, by_source in groups.items()}
    summary = read.reward_summary(rewards)
    rows = [
        [
            r["domain"],
            r["source"],
            r["responses"],
            r["p10"],
            r["median"],
            r["p90"],
            None if r["correct"] is None else f"{100 * r['correct']:.1f}%",
        ]
        for r in summary
    ]
    nulls = int(np.isnan(rewards.reward).sum())
    parts = [
        figure(
            "reward distribution per source and domain",
            lambda: plots.rewards_plot(groups, run.colors),
            f"Reward of every scored response of {run.versions['scores'].ref} ({len(rewards.reward):,}), per "
            "domain; one outline per source (density, so sources with different sample counts compare), over the "
            "0.5-99.5th percentiles of the domain's rewards.",
        ),
        table(
            ["domain", "source", "responses", "reward p10", "median", "p90", "verified correct"], rows, cls="compact"
        ),
    ]
    if nulls:
        parts.append(note(f"{nulls:,} responses have no reward (left out of the plot)"))
    return parts


def wins_section(run: Run) -> list[str]:
    if "datasets" not in run.versions:
        return [note("no datasets version")]
    d = run.versions["datasets"]
    panels = {"SFT rows won": read.rows_by_domain_source(d, "sft"), "DPO pairs": read.rows_by_domain_source(d, "dpo")}
    if "prompts" in run.versions:  # domains that won nothing are shown as such
        for domain in read.prompts_by_domain(run.versions["prompts"]):
            for by_domain in panels.values():
                by_domain.setdefault(domain, {})
    sources = sorted({s for p in panels.values() for c in p.values() for s in c})
    domains = sorted({dom for p in panels.values() for dom in p})
    rows = [
        [
            dom,
            *(
                f"{panels['SFT rows won'].get(dom, {}).get(s, 0):,} / {panels['DPO pairs'].get(dom, {}).get(s, 0):,}"
                for s in sources
            ),
        ]
        for dom in domains
    ]
    parts = [
        figure(
            "SFT win share per source and domain",
            lambda: plots.share_plot(panels, run.colors),
            f"{d.ref}: which source's response won each SFT prompt (best over all sources), and whose responses "
            "made each DPO pair (best vs worst of one source), as shares per domain; counts in the bars.",
        ),
        table(["domain (sft / dpo)", *sources], rows, cls="compact"),
    ]
    domains = run.stats.get("domains")
    if not isinstance(domains, dict) or not domains:
        parts.append(note(f"{d.ref}: stats.json has no per domain and source counts (`domains`; an older build)"))
        return parts
    sources = sorted({s for x in domains.values() for s in (x.get("by_source") or {})})
    shares, labels = [], []
    for x in domains.values():
        by_source = x.get("by_source") or {}
        row, text = [], []
        for source in sources:
            c = by_source.get(source, {})
            n, ok = c.get("candidates", 0), c.get("acceptable", 0)
            row.append(ok / n if n else np.nan)
            text.append(f"{ok / n:.0%}\n{ok:,}/{n:,}" if n else "–")
        shares.append(row)
        labels.append(text)
    if sources and any("acceptable" in c for x in domains.values() for c in (x.get("by_source") or {}).values()):
        parts.append(
            figure(
                "acceptable share per source and domain",
                lambda: plots.heatmap_plot(
                    list(domains), sources, np.array(shares, float), labels, "acceptable responses / responses"
                ),
                "Share of each source's responses that may be chosen (usable and, in verified domains, correct), "
                "per domain: where each source is strong.",
            )
        )
    rows = []
    for name, x in domains.items():
        rows.append({"domain": name, "source": "all", **x})
        rows += [{"domain": "", "source": source, **c} for source, c in (x.get("by_source") or {}).items()]
    caption = f"{d.ref} stats.json: per domain, and per source within it (prompts: sft / dpo; a source's: answered)"
    parts.append(counts_table(rows, caption, skip={"by_source", "by_origin"}))
    return parts


def counts_table(rows: list[dict[str, Any]], caption: str, skip: set[str]) -> str:
    """Rows of counts with whatever keys they have: numbers as columns (plus the acceptable share when both counts
    exist), `{sft: n, dpo: m}` as "n / m", mappings of reasons (excluded, dropped) as one "reason=n" a line."""
    header: list[str] = []
    cells: list[dict[str, Any]] = []
    for r in rows:
        out: dict[str, Any] = {}
        for key, value in r.items():
            if key in skip:
                continue
            if (
                isinstance(value, dict)
                and value
                and set(value) <= {"sft", "dpo"}
                and all(isinstance(v, int) for v in value.values())
            ):
                out[key] = " / ".join(f"{value.get(k, 0):,}" for k in ("sft", "dpo"))
            elif isinstance(value, dict):
                lines = reason_lines(value)
                out[key] = (
                    ("html", f'<span class="reasons">{"<br>".join(esc(x) for x in lines)}</span>') if lines else "–"
                )
            else:
                out[key] = value
            if key == "acceptable" and isinstance(value, int) and isinstance(r.get("candidates"), int):
                out["acceptable %"] = f"{100 * value / r['candidates']:.1f}%" if r["candidates"] else "–"
        header += [k for k in out if k not in header]
        cells.append(out)
    body = ([c.get(k, "") for k in header] for c in cells)
    return '<div class="scroll">' + table([h.replace("_", " ") for h in header], body, caption=caption) + "</div>"


def reason_lines(counts: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for k, v in counts.items():
        if isinstance(v, dict):
            lines += reason_lines(v, f"{prefix}{k}: ")
        elif isinstance(v, int | float) and v:
            lines.append(f"{prefix}{k}={fmt(v)}")
    return lines


def dpo_section(run: Run) -> list[str]:
    if "datasets" not in run.versions:
        return [note("no datasets version")]
    d = run.versions["datasets"]
    pairs = read.read_pairs(d)
    band = read.margin_band(d, run.stats)
    hist = read.dig(run.stats, "dpo", "margin", "histogram")
    parts = [
        '<div class="row">',
        figure(
            "DPO margin histogram",
            lambda: plots.margins_plot(pairs.margin, band, hist),
            f"{d.ref}: reward margin of each kept DPO pair; the green band is build.margin, pairs outside it "
            "are not kept.",
            half=True,
        ),
        figure(
            "chosen vs rejected lengths",
            lambda: plots.lengths_plot(pairs.chosen_len, pairs.rejected_len, pairs.length_unit),
            "Each DPO pair's chosen vs rejected length; points above the dashed diagonal have the longer chosen "
            "answer (a length bias DPO would learn).",
            half=True,
        ),
        "</div>",
    ]
    q = np.quantile(pairs.margin, [0.1, 0.5, 0.9]) if len(pairs.margin) else [np.nan] * 3
    parts.append(
        table(
            ["pairs", "margin p10", "median", "p90", f"chosen median ({pairs.length_unit})", "rejected median"],
            [
                [
                    len(pairs.margin),
                    float(q[0]),
                    float(q[1]),
                    float(q[2]),
                    float(np.median(pairs.chosen_len)) if len(pairs.chosen_len) else None,
                    float(np.median(pairs.rejected_len)) if len(pairs.rejected_len) else None,
                ]
            ],
            cls="compact",
        )
    )
    return parts


# What the reasons the stages record mean, for a reader who has not read the code; others are shown as they are.
MEANINGS = {
    "empty": "no text",
    "excluded": "matched prompts.sources[].exclude",
    "duplicate": "same domain and text as an earlier prompt",
    "skipped_too_long": "prompt too long for the source's context: not sampled",
    "finish_length": "cut at the source's max_tokens",
    "reward_null": "the reward model gave no reward",
    "null_reward": "no reward",
    "nan_reward": "reward is NaN",
    "truncated": "cut at max_tokens (build), or longer than the reward model's window (score)",
    "reward_truncated": "the reward model saw only the start",
    "unverified": "verified domain, but no verdict",
    "no_samples": "no response at all",
    "no_usable_response": "every response excluded",
    "no_acceptable_response": "no response may be chosen (verified domains: none correct)",
    "no_rejected_response": "no response may be rejected (verified domains: all correct)",
    "no_same_source_pair": "no source has both a chosen and a rejected response",
    "margin_below_band": "every same-source gap below build.margin",
    "margin_above_band": "every same-source gap above build.margin",
    "margin_outside_band": "gaps below and above build.margin, none inside",
    "sft_only_domain": "domain in build.sft_only_domains",
    "too_long": "longer than build.max_length in the target's tokens",
    "identical_texts": "chosen and rejected texts are the same",
    "no_tests": "no tests found for the code prompt",
    "unparseable_tests": "its tests do not parse",
    "no_solution": "no solution in the dataset to check the tests with",
    "solution_fails": "the dataset's own solution fails the tests",
}


VERDICTS = {
    "wrong": "the verifier judged the answer wrong: it may be rejected, never chosen",
    "fail": "the code failed its tests: it may be rejected, never chosen",
    "no_answer": "no final answer found to check",
    "syntax_error": "the code does not parse: it may be rejected, never chosen",
    "undefined_name": "the code uses a name it never defines: it may be rejected, never chosen",
    "no_tests": "no tests to run: decides nothing",
    "bad_tests": "the reference tests do not parse: decides nothing",
    "no_reference": "no reference answer or tests: decides nothing",
    "error": "the scorer failed on this response",
    "timeout": "the check ran out of time",
    "truncated": "longer than the reward model's window: it saw only the start",
    "prompt_too_long": "the prompt alone fills the reward model's window",
    "out_of_memory": "did not fit in memory even alone",
}


def meaning(reason: str) -> str:
    if reason.startswith("verdict "):
        return VERDICTS.get(reason.rsplit(":", 1)[-1], "")
    return MEANINGS.get(reason, "")


def drops_section(run: Run) -> list[str]:
    found = read.drops(run.versions, run.stats)
    if not found:
        return [note("nothing was dropped (or no stage recorded drops)")]
    rows = [[x.stage, x.reason, x.count, x.unit, meaning(x.reason), x.detail] for x in found]
    plotted = [(f"{x.stage}: {x.reason}", x.count) for x in found if x.count]
    parts = []
    if plotted:
        parts.append(
            figure(
                "drop reasons per stage",
                lambda: plots.drops_plot(plotted),
                "Every reason a prompt, response, row or pair was dropped or flagged, per stage (the unit is in "
                "the table).",
            )
        )
    header = ["stage", "reason", "count", "counted in", "meaning", "per source (build: per domain)"]
    parts.append(table(header, rows, cls="compact wide"))
    return parts


def training_section(run: Run) -> list[str]:
    parts = []
    panels = []
    summary_rows = []
    for stage in ("sft", "dpo"):
        v = run.versions.get(stage)
        if v is None:
            parts.append(note(f"no {stage} version"))
            continue
        history = read.log_history(v)
        found = read.curves(history, CURVES[stage])
        panels += [(stage, key, found[key]) for key in CURVES[stage] if key in found]
        if not history:
            parts.append(note(f"{v.ref}: no log_history.json"))
        elif "loss" not in found:
            logging = read.dig(v.manifest, "config", "trl", "logging_steps")
            steps = read.dig(v.manifest, "train", "global_step")
            parts.append(
                note(
                    f"{v.ref}: no step logs in log_history.json (logging_steps {logging}, {steps} steps); "
                    "only the final numbers below"
                )
            )
        train = v.manifest.get("train", {})
        summary_rows.append([v.ref, *(train.get(k) for k in TRAIN_SUMMARY)])
    if panels:
        parts.insert(
            0,
            figure(
                "training curves",
                lambda: plots.curves_plot(panels),
                "From the trainers' log_history.json: SFT loss and token accuracy; DPO loss, reward "
                "margin and reward accuracy (the share of pairs whose chosen answer the policy "
                "prefers), per logged step.",
            ),
        )
    if summary_rows:
        parts.append(table(["version", *TRAIN_SUMMARY], summary_rows, cls="compact wide"))
    return parts


def eval_section(run: Run) -> list[str]:
    from fusechat.eval.compare import FUSION_LABELS, comparison, latest_evals, scores_of

    evals = latest_evals(run.store)
    if not evals:
        return [note("no eval version: fusechat eval (or run) evaluates the target before and after fusion")]
    wanted = {"target": "target"}
    wanted.update({k: f"{k}/{run.versions[k].name}" for k in ("sft", "dpo") if k in run.versions})
    columns, parts = [], []
    for key, label in wanted.items():
        if label in evals:
            columns.append((f"{FUSION_LABELS[key]} ({evals[label].ref})", scores_of(evals[label])))
        else:
            parts.append(note(f"{FUSION_LABELS[key]}: {label} not evaluated (fusechat eval --model {key})"))
    if columns:
        t = comparison(columns, deltas=True)
        parts.insert(0, comparison_html(t, "the target before and after fusion, per benchmark"))
        parts.insert(
            1,
            figure(
                "eval scores before and after fusion",
                lambda: plots.eval_plot(t["header"], t["rows"], t["models"]),
                "Scores per benchmark (local sets in %, judged ones on their own scale).",
            ),
        )
    others = [(label.removeprefix("source:"), v) for label, v in evals.items() if label not in wanted.values()]
    if others:
        everyone = comparison([*columns, *((f"{label} ({v.ref})", scores_of(v)) for label, v in others)])
        parts.append(comparison_html(everyone, "every evaluated model (sources and others), latest evaluation each"))
    return parts


def comparison_html(t: dict[str, Any], caption: str) -> str:
    rows = t["rows"] + ([t["average"]] if t["average"] else [])

    def cell(i: int, v: Any) -> Any:
        if i == 0 or v is None:
            return v
        if i <= t["models"]:
            return ("num", f"{v:.1f}")
        cls = "up" if v > 0 else "down" if v < 0 else ""
        return ("html", f'<span class="{cls}">{v:+.1f}</span>')

    return table(
        t["header"], ([cell(i, v) for i, v in enumerate(r)] for r in rows), caption=caption, cls="compact eval"
    )


def lineage_section(run: Run) -> list[str]:
    from fusechat.status import summarize_counts

    shown = {v.ref for v in run.versions.values()}
    rows, timed = [], []
    for v in read.all_versions(run.store):
        m = v.manifest
        timings = m.get("timings") or {}
        wall = timings.get("wall_s")
        inner = " ".join(f"{k}={fmt(x)}" for k, x in timings.items() if k != "wall_s" and isinstance(x, int | float))
        inputs = ", ".join(f"{k}/{n}" for k, n in (m.get("inputs") or {}).items())
        label = v.ref + (f" ({m['counts']['model']})" if v.stage == "eval" and "model" in m.get("counts", {}) else "")
        created = str(m.get("created_at", "")).replace("T", " ").removesuffix("+00:00")
        rows.append(
            [
                ("html", f"<b>{esc(label)}</b>" if v.ref in shown else esc(label)),
                created,
                inputs or "–",
                wall,
                inner or "–",
                summarize_counts(m.get("counts") or {}),
            ]
        )
        if isinstance(wall, int | float) and (v.ref in shown or v.stage == "eval"):
            timed.append((label, float(wall)))
    parts = []
    if timed:
        parts.append(
            figure(
                "stage timings",
                lambda: plots.timings_plot(timed),
                "Wall time of each version shown (bold below) and of every evaluation.",
            )
        )
    parts.append(
        table(
            ["version", "created (UTC)", "made from", "wall s", "timings", "counts"], rows, cls="compact wide lineage"
        )
    )
    return parts


SECTIONS: list[tuple[str, str, Builder]] = [
    ("summary", "Summary", summary_section),
    ("prompts", "Prompts per domain and split", prompts_section),
    ("rewards", "Rewards per source and domain", rewards_section),
    ("wins", "Which source won: SFT rows and DPO pairs per domain", wins_section),
    ("dpo", "DPO pairs: margins and lengths", dpo_section),
    ("drops", "What was dropped, and why", drops_section),
    ("training", "Training: loss, reward margin, accuracy", training_section),
    ("eval", "Evaluation: before fusion, after SFT, after DPO", eval_section),
    ("lineage", "Lineage and timings", lineage_section),
]


# --------------------------------------------------------------------------------------------- page
def render(run: Run, sections: list[tuple[str, str, Builder]] = SECTIONS) -> str:
    body = []
    for sid, title, build in sections:
        try:
            parts = build(run)
        except Exception as e:  # a section that cannot be read or drawn is one line, the rest of the page stays
            parts = [
                note(f"{title}: could not be built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            ]
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{"".join(parts)}</section>')
    nav = " · ".join(f'<a href="#{sid}">{esc(title.split(":")[0])}</a>' for sid, title, _ in sections)
    name = run.store.root.name
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fusechat report: {esc(name)}</title>
<style>{CSS}</style></head>
<body><header><h1>fusechat report: {esc(name)}</h1>
<p class="meta">{esc(run.store.root.resolve())} · written {stamp} from the versions on disk</p>
<nav>{nav}</nav></header>
<main>{"".join(body)}</main></body></html>
"""


CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222; }
body { max-width: 1000px; margin: 0 auto; padding: 0 16px 48px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6em; margin: 24px 0 4px; }
h2 { font-size: 1.25em; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
.meta { color: #666; margin: 0 0 8px; font-size: 0.9em; word-break: break-all; }
nav { font-size: 0.9em; } nav a { color: #2a5db0; text-decoration: none; }
figure { margin: 12px 0; } figure img { width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 0.88em; margin-top: 4px; }
.row { display: flex; gap: 16px; flex-wrap: wrap; } .row figure.half { flex: 1 1 420px; min-width: 0; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.88em; }
table.wide { width: 100%; } caption { text-align: left; color: #555; padding-bottom: 4px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.lineage td { font-size: 0.92em; word-break: break-word; }
.scroll { overflow-x: auto; } .scroll td:nth-child(-n+2) { white-space: nowrap; } .reasons { font-size: 0.9em; white-space: nowrap; }
table.eval td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.warning { color: #8a1c12; background: #fdecea; border-left: 3px solid #d93025; padding: 4px 8px; margin: 8px 0; }
.note { color: #8a4b00; background: #fff6e5; border-left: 3px solid #e0a030; padding: 4px 8px; margin: 8px 0; }
.tiles { display: flex; gap: 12px; flex-wrap: wrap; margin: 8px 0; }
.tile { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.tile b { display: block; font-size: 1.4em; } .tile span { color: #666; font-size: 0.85em; }
.up { color: #1a7f37; font-weight: 600; } .down { color: #b42318; font-weight: 600; }
@media print {
  body { max-width: none; font-size: 11px; } nav { display: none; }
  section, figure, table { break-inside: avoid; } h2 { break-after: avoid; }
  .scroll { overflow: visible; } .reasons { white-space: normal; }
  .note { background: none; }
}
"""


def write_report(store: RunStore, *, pinned: dict[str, str] | None = None, out: Path | None = None) -> Path:
    """`<run dir>/report.html` (or `out`), written atomically; returns its path. `pinned`: stage -> version to show
    instead of the latest dpo version's lineage."""
    unknown = sorted(set(pinned or {}) - set(read.LINEAGE_ORDER))
    if unknown:
        raise UserError(f"--input {unknown[0]}=...: the report shows {', '.join(reversed(read.LINEAGE_ORDER))}")
    if not store.root.is_dir():
        raise UserError(f"{store.root}: no run directory; run the pipeline first (or check workdir and name)")
    versions = read.lineage(store, pinned)
    stats = read.read_stats(versions["datasets"]) if "datasets" in versions else {}
    sources: set[str] = set()
    if "samples" in versions:
        sources |= set(read.dig(versions["samples"].manifest, "counts", "by_source") or {})
    sources |= set(read.dig(stats, "sft", "by_source") or {}) | set(read.dig(stats, "dpo", "by_source") or {})
    page = render(Run(store, versions, stats, plots.source_colors(sorted(sources))))
    path = out or store.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def report_after_run(store: RunStore, log: Callable[[str], None]) -> Path | None:
    """The report at the end of `fusechat run` and `fusechat demo`: its path, or None after one line saying why it
    was not written (a report must not fail the run it describes)."""
    try:
        return write_report(store)
    except Exception as e:
        log(f"report: not written ({type(e).__name__}: {e})")
        return None
