"""The report's figures: plain numbers in, a matplotlib Figure out, and `png` to embed one. No pyplot: a bare Figure
saves through the Agg renderer, so there is no global state, no backend to choose and no display. Sources keep one
colour across every figure."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

WIDTH = 10.0  # inches; at DPI about 1,100 px, shown at most 960 px wide (crisp on a laptop and in print)
DPI = 110
SPLIT_COLORS = {"sft": "#4C72B0", "dpo": "#DD8452"}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def source_colors(sources: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sorted(sources))}


def split_order(splits: set[str]) -> list[str]:
    return sorted(splits, key=lambda s: (list(SPLIT_COLORS).index(s) if s in SPLIT_COLORS else len(SPLIT_COLORS), s))


def _grid(n: int, cols: int, height: float) -> tuple[Figure, list[Any]]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(WIDTH, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def prompts_plot(by_domain: dict[str, dict[str, int]]) -> Figure:
    """Horizontal bars per domain, one segment per split, the count written in each."""
    domains = list(by_domain)
    splits = split_order({s for v in by_domain.values() for s in v})
    fig = Figure(figsize=(WIDTH, 0.8 + 0.45 * len(domains)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(domains))
    for split in splits:
        values = np.array([by_domain[d].get(split, 0) for d in domains], float)
        bars = ax.barh(domains, values, left=left, label=split, color=SPLIT_COLORS.get(split))
        ax.bar_label(bars, labels=[f"{int(v):,}" if v else "" for v in values], label_type="center", fontsize=8)
        left += values
    ax.invert_yaxis()
    ax.set_xlabel("prompts")
    fig.legend(title="split", loc="outside right upper")
    ax.grid(axis="x", alpha=0.3)
    return fig


def rewards_plot(groups: dict[str, dict[str, np.ndarray]], colors: dict[str, Any]) -> Figure:
    """One panel per domain: each source's reward histogram (density, 40 bins over the domain's 0.5-99.5th
    percentiles, the tails left out), one legend for all."""
    from matplotlib.lines import Line2D

    fig, axes = _grid(len(groups), len(groups) if len(groups) <= 4 else 3, 2.6)
    seen: list[str] = []
    for ax, (domain, by_source) in zip(axes, groups.items(), strict=True):
        finite = [v[np.isfinite(v)] for v in by_source.values()]
        every = np.concatenate(finite) if finite else np.zeros(0)
        if not len(every):
            ax.set_title(f"{domain}: no rewards")
            continue
        low, high = np.quantile(every, [0.005, 0.995])
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, 41)
        for source, values in by_source.items():
            v = values[np.isfinite(values)]
            if len(v):
                ax.hist(v, bins=edges, density=True, histtype="step", linewidth=1.6, color=colors.get(source))
                seen += [source] if source not in seen else []
        ax.set_title(domain)
        ax.set_xlabel("reward")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    handles = [Line2D([], [], color=colors.get(s), linewidth=1.6) for s in sorted(seen)]
    fig.legend(handles, sorted(seen), loc="outside lower center", ncols=min(len(seen), 6), fontsize=8)
    return fig


def share_plot(panels: dict[str, dict[str, dict[str, int]]], colors: dict[str, Any]) -> Figure:
    """Per panel (e.g. SFT rows, DPO pairs), one 100% bar per domain split by source, the count in each segment."""
    domains = sorted({d for p in panels.values() for d in p})
    sources = sorted({s for p in panels.values() for c in p.values() for s in c})
    fig = Figure(figsize=(WIDTH, 0.9 + 0.42 * len(domains)), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False).ravel()
    for ax, (title, by_domain) in zip(axes, panels.items(), strict=True):
        totals = np.array([sum(by_domain.get(d, {}).values()) for d in domains], float)
        left = np.zeros(len(domains))
        for source in sources:
            counts = np.array([by_domain.get(d, {}).get(source, 0) for d in domains], float)
            share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
            bars = ax.barh(domains, share, left=left, color=colors.get(source), label=source)
            labels = [f"{int(c):,}" if s >= 0.06 else "" for c, s in zip(counts, share, strict=True)]
            ax.bar_label(bars, labels=labels, label_type="center", fontsize=8)
            left += share
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter("{x:.0%}")
        ax.set_title(f"{title} ({int(totals.sum()):,})")
        ax.grid(axis="x", alpha=0.3)
        for i, t in enumerate(totals):
            if not t:
                ax.text(0.5, i, "none", ha="center", va="center", fontsize=8, color="grey")
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(sources), 6), fontsize=8)
    return fig


def heatmap_plot(
    rows: list[str], columns: list[str], values: np.ndarray, labels: list[list[str]], title: str
) -> Figure:
    """A share (0-1, nan: none) per row and column, each cell labelled."""
    fig = Figure(figsize=(WIDTH, 1.0 + 0.5 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            dark = np.isfinite(values[i, j]) and values[i, j] > 0.6
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 4 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, format="{x:.0%}", shrink=0.8)
    return fig


def margins_plot(
    margins: np.ndarray, band: tuple[float, float] | None, candidates: dict[str, Any] | None = None
) -> Figure:
    """Kept pairs' reward margins (chosen - rejected) with the band shaded. With build's histogram of every
    same-source candidate pair (stats.json), the bins are its bins, the candidates are drawn as an outline and those
    below / above the band are counted in a corner."""
    fig = Figure(figsize=(WIDTH / 2, 3.2), layout="constrained")
    ax = fig.subplots()
    m = margins[np.isfinite(margins)]
    edges = np.asarray((candidates or {}).get("edges") or [], float)
    if len(edges) < 2:
        low = min([*(m.min(keepdims=True) if len(m) else []), *(band[:1] if band else [])], default=0.0)
        high = max([*(m.max(keepdims=True) if len(m) else []), *(band[1:] if band else [])], default=1.0)
        edges = np.linspace(low, high if high > low else low + 1.0, 41)
    if band:
        ax.axvspan(band[0], band[1], color="#55A868", alpha=0.12, label=f"band [{band[0]:g}, {band[1]:g}]")
        for x in band:
            ax.axvline(x, color="#55A868", linewidth=1.2)
    ax.hist(np.clip(m, edges[0], edges[-1]), bins=edges, color="#4C72B0", label=f"kept pairs ({len(m):,})")
    if candidates and len(candidates.get("candidates") or []) == len(edges) - 1:
        counts = np.asarray(candidates["candidates"], float)
        ax.stairs(
            counts,
            edges,
            color="black",
            linewidth=1.2,
            linestyle="--",
            label=f"same-source candidates in band ({int(counts.sum()):,})",
        )
        below, above = candidates.get("candidates_below", 0), candidates.get("candidates_above", 0)
        ax.text(
            0.99,
            0.97,
            f"candidates below the band: {below:,}\nabove the band: {above:,}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    pad = 0.03 * (edges[-1] - edges[0])
    ax.set_xlim(edges[0] - pad, edges[-1] + pad)
    ax.set_xlabel("reward margin (chosen - rejected)")
    ax.set_ylabel("pairs")
    ax.set_title("DPO reward margins", fontsize=10)
    fig.legend(fontsize=7, loc="outside lower center", ncols=2)
    ax.grid(alpha=0.3)
    return fig


def lengths_plot(chosen: np.ndarray, rejected: np.ndarray, unit: str, seed: int = 0) -> Figure:
    """Chosen vs rejected length per pair (at most 20,000 points shown) with the diagonal; above it, the chosen
    answer is the longer one."""
    fig = Figure(figsize=(WIDTH / 2, 3.2), layout="constrained")
    ax = fig.subplots()
    n = len(chosen)
    shown = np.random.default_rng(seed).choice(n, 20_000, replace=False) if n > 20_000 else np.arange(n)
    ax.scatter(rejected[shown], chosen[shown], s=8, alpha=0.5, color="#4C72B0", edgecolors="none")
    top = float(max(chosen.max(initial=1), rejected.max(initial=1)))
    ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--")
    longer, equal = (float((chosen > rejected).mean()), float((chosen == rejected).mean())) if n else (0.0, 0.0)
    ax.set_title(
        f"chosen vs rejected length ({unit})\nmedian {np.median(chosen) if n else 0:.0f} vs "
        f"{np.median(rejected) if n else 0:.0f}; of {n:,} pairs chosen is longer in {longer:.0%}, as long in "
        f"{equal:.0%}",
        fontsize=9,
    )
    ax.set_xlabel(f"rejected ({unit})")
    ax.set_ylabel(f"chosen ({unit})")
    ax.set_xlim(0, top * 1.03)
    ax.set_ylim(0, top * 1.03)
    ax.grid(alpha=0.3)
    return fig


def drops_plot(rows: list[tuple[str, int]]) -> Figure:
    """One horizontal bar per (stage: reason), log scale when counts span more than two decades."""
    labels, counts = [r[0] for r in rows], np.array([r[1] for r in rows], float)
    fig = Figure(figsize=(WIDTH, 0.6 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(labels, counts, color="#C44E52")
    ax.bar_label(bars, labels=[f"{int(c):,}" for c in counts], padding=3, fontsize=8)
    if counts.max(initial=0) > 100 * max(counts[counts > 0].min(initial=1), 1):
        ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("count")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    return fig


CURVE_TITLES = {
    "loss": "loss",
    "eval_loss": "eval loss",
    "mean_token_accuracy": "token accuracy",
    "rewards/margins": "reward margin (chosen - rejected)",
    "rewards/accuracies": "reward accuracy (chosen > rejected)",
    "learning_rate": "learning rate",
}


def curves_plot(panels: list[tuple[str, str, tuple[list[float], list[float]]]]) -> Figure:
    """(stage, key, (steps, values)) per panel: one row per stage, at most three panels a row."""
    stages = list(dict.fromkeys(stage for stage, _, _ in panels))
    rows = [[p for p in panels if p[0] == stage][i : i + 3] for stage in stages for i in range(0, 9, 3)]
    rows = [r for r in rows if r]
    fig = Figure(figsize=(WIDTH, 2.5 * len(rows)), layout="constrained")
    grid = fig.subplots(len(rows), 3, squeeze=False)
    for axes, row in zip(grid, rows, strict=True):
        for ax in axes[len(row) :]:
            ax.set_visible(False)
        for ax, (stage, key, (steps, values)) in zip(axes, row, strict=False):
            ax.plot(
                steps,
                values,
                marker="o" if len(steps) <= 30 else None,
                markersize=3,
                color=SPLIT_COLORS.get(stage, "#4C72B0"),
            )
            ax.set_title(f"{stage.upper()} {CURVE_TITLES.get(key, key)}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    return fig


def eval_plot(header: list[str], rows: list[list[Any]], models: int) -> Figure:
    """Grouped bars: one group per benchmark, one bar per model column of a comparison table."""
    labels = header[1 : models + 1]
    fig = Figure(figsize=(WIDTH, 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    width = 0.8 / max(len(labels), 1)
    palette = ["#8C8C8C", "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
    for i, label in enumerate(labels):
        values = [r[i + 1] if isinstance(r[i + 1], int | float) else np.nan for r in rows]
        bars = ax.bar(
            x + (i - (len(labels) - 1) / 2) * width, values, width, label=label, color=palette[i % len(palette)]
        )
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylabel("score")
    fig.legend(fontsize=8, ncols=min(len(labels), 4), loc="outside lower center")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    return fig


def timings_plot(rows: list[tuple[str, float]]) -> Figure:
    """Wall time per version of the lineage, in minutes when any takes more than two."""
    labels, seconds = [r[0] for r in rows], np.array([r[1] for r in rows], float)
    minutes = seconds.max(initial=0) > 120
    values = seconds / 60 if minutes else seconds
    fig = Figure(figsize=(WIDTH, 0.6 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(labels, values, color="#8172B3")
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (minutes)" if minutes else "wall time (s)")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    return fig
