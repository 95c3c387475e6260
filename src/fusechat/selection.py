"""The FuseChat-3.0 selection rules (reference/fusechat3.md §5), as a pure function over columns of ids and scores.

Texts never enter here: `select` sees one row per response (its prompt, source, sample index, reward, correctness
and two flags) and returns which rows become SFT rows and DPO pairs, with a count for every prompt it drops.
Everything is numpy over integer codes, so 3.2M responses take seconds.

Rules, per response:
- *usable*: the reward is a number (null and NaN are not), not cut by max_tokens (`drop_truncated`), scored whole
  by the reward model (`reward_truncated`: it saw only the start), not empty (`drop_empty`), not longer than
  `build.max_length` in the target's tokens (`too_long`, measured by the caller). Unusable responses are neither
  chosen nor rejected, so the next-best usable response takes their place.
- a domain is *verified* when `build.verified_domains` lists it, or when any of its responses has a non-null
  `correct`. In a verified domain a response may be chosen only when `correct` is true and rejected only when
  it is false; a null verdict there makes it neither (counted as `unverified`). In other domains every usable
  response may be either.

SFT (prompts of the `sft` split): the acceptable response with the highest reward over all sources.
DPO (prompts of the `dpo` split, domains not in `sft_only_domains`): for each source, chosen = its
highest-reward acceptable response, rejected = its lowest-reward rejectable one (never the same response); a
source qualifies when `low <= chosen - rejected <= high`. A source whose k samples of a prompt are all the same text
(`identical_samples`) makes no pair for it (a prompt left with no such source is dropped as `identical_samples`). The first `pairs_per_prompt` qualifying sources are
kept, ranked by `pair_source_rule`: `largest_margin` (the paper leaves this open; the widest in-band gap),
`highest_chosen` (the reference's suggestion: the best chosen response), or `random`. Ties everywhere (equal
rewards, equal margins) and the `random` rule follow one pseudo-random order seeded by `seed` and the prompt id,
so the result does not depend on row order, source names or file layout.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusechat.config import BuildConfig

# Columns `select` needs. prompts: prompt_id, domain, split. candidates: one row per scored response.
CANDIDATE_COLUMNS = ("prompt_id", "source", "sample_index", "reward", "correct", "truncated", "empty")
# optional: "reward_truncated", "too_long", "identical_samples" (absent: none)
SFT_COLUMNS = ("row", "prompt_id", "domain", "source", "sample_index", "reward")
BAND_SLACK = 1e-9
DPO_COLUMNS = (
    "prompt_id",
    "domain",
    "source",
    "chosen_row",
    "rejected_row",
    "chosen_index",
    "rejected_index",
    "chosen_reward",
    "rejected_reward",
    "margin",
)


@dataclass
class Selection:
    """`sft` and `dpo` rows (in prompts-table order; `row`, `chosen_row`, `rejected_row` index the candidates),
    prompts dropped by reason, responses excluded by reason, and every same-source best-worst gap considered."""

    sft: pa.Table
    dpo: pa.Table
    dropped: dict[str, Counter] = field(default_factory=dict)  # "sft"/"dpo" -> reason -> prompts
    excluded: Counter = field(default_factory=Counter)  # reason -> responses
    verified: dict[str, str] = field(default_factory=dict)  # domain -> "math"/"code"/"inferred"
    candidate_margins: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # For per-domain and per-source stats: per candidate, the reason it was excluded ("" if usable) and whether
    # it may be chosen; per prompt, the reason it was dropped ("" if kept).
    excluded_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    acceptable: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    dropped_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    # Candidates whose exclusion could change the result, and any that could then take their place: the SFT rows,
    # the kept pairs, and the pairs of sources whose gap is above the band (excluding a response only narrows a
    # source's gap, so those may still enter the band). Measuring just these is enough to exclude over-long ones.
    contenders: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def select(prompts: pa.Table, candidates: pa.Table, rules: BuildConfig, seed: int) -> Selection:
    """Apply the selection rules. Every candidate's prompt_id must be in `prompts` (ValueError otherwise)."""
    n_prompts = prompts.num_rows
    p = codes_in(candidates.column("prompt_id"), prompts.column("prompt_id"))
    if (p < 0).any():
        bad = candidates.column("prompt_id")[int(np.flatnonzero(p < 0)[0])].as_py()
        raise ValueError(f"response for prompt_id {bad!r}, which is not in the prompts table")
    s, sources = dictionary_codes(candidates.column("source"))
    sample_index = candidates.column("sample_index").to_numpy(zero_copy_only=False).astype(np.int64)
    domain_names = sorted(set(prompts.column("domain").to_pylist()))
    d_of_prompt = codes_in(prompts.column("domain"), pa.array(domain_names, pa.string()))
    split_of_prompt = np.asarray(prompts.column("split").to_pylist(), dtype=object)
    d = d_of_prompt[p]

    reward_col = candidates.column("reward").cast(pa.float64())
    reward_null = reward_col.is_null().to_numpy(zero_copy_only=False)
    reward = reward_col.fill_null(np.nan).to_numpy(zero_copy_only=False)
    correct_col = candidates.column("correct")
    correct_known = correct_col.is_valid().to_numpy(zero_copy_only=False)
    correct = correct_col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    truncated = _flag(candidates, "truncated")
    empty = _flag(candidates, "empty")
    reward_truncated = _flag(candidates, "reward_truncated")
    too_long = _flag(candidates, "too_long")
    identical = _flag(candidates, "identical_samples")

    # Which domains gate acceptance on `correct`.
    verified = {dom: kind for dom, kind in rules.verified_domains.items()}
    for code in np.unique(d[correct_known]):
        verified.setdefault(domain_names[code], "inferred")
    is_verified_domain = np.array([name in verified for name in domain_names], dtype=bool)
    row_verified = is_verified_domain[d]

    # Response-level exclusions, first reason wins (the order is the order of the checks).
    excluded = Counter()
    reasons = (
        ("null_reward", reward_null),
        ("nan_reward", np.isnan(reward) & ~reward_null),
        ("truncated", truncated if rules.drop_truncated else np.zeros_like(truncated)),
        ("reward_truncated", reward_truncated),
        ("empty", empty if rules.drop_empty else np.zeros_like(empty)),
        ("too_long", too_long),
        ("unverified", row_verified & ~correct_known),
    )
    usable = np.ones(len(reward), dtype=bool)
    excluded_reason = np.full(len(reward), "", dtype=object)
    for reason, mask in reasons:
        hit = usable & mask
        if hit.any():
            excluded[reason] = int(hit.sum())
            excluded_reason[hit] = reason
        usable &= ~mask
    chosen_ok = usable & (~row_verified | correct)
    rejected_ok = usable & (~row_verified | ~correct)

    prompt_hash = _prompt_hashes(prompts.column("prompt_id"), seed)
    source_hash = _source_hashes(sources)
    row_key = _mix(prompt_hash[p] ^ _mix(source_hash[s] + sample_index.astype(np.uint64) + np.uint64(1)))
    is_sft = (split_of_prompt == "sft")[p]
    is_dpo = (split_of_prompt == "dpo")[p]
    sft_only = np.array([name in rules.sft_only_domains for name in domain_names], dtype=bool)

    dropped: dict[str, Counter] = {"sft": Counter(), "dpo": Counter()}
    why = np.full(n_prompts, "", dtype=object)  # the reason each dropped prompt was dropped
    prompt_ids = prompts.column("prompt_id")
    domain_arr = prompts.column("domain")

    # ---------------------------------------------------------------- SFT: global best acceptable response
    rows = np.flatnonzero(is_sft & chosen_ok)
    best = rows[top_per_group(p[rows], [-reward[rows], row_key[rows]])]
    sft_prompts = np.flatnonzero(split_of_prompt == "sft")
    _count_missing(
        dropped["sft"],
        sft_prompts,
        p,
        {
            "no_samples": np.ones(len(p), dtype=bool),
            "no_usable_response": usable,
            "no_acceptable_response": chosen_ok,
        },
        n_prompts,
        why,
    )
    best = best[np.argsort(p[best], kind="stable")]
    sft = pa.table(
        {
            "row": pa.array(best, pa.int64()),
            "prompt_id": prompt_ids.take(p[best]),
            "domain": domain_arr.take(p[best]),
            "source": sources.take(s[best]),
            "sample_index": pa.array(sample_index[best], pa.int32()),
            "reward": pa.array(reward[best], pa.float64()),
        }
    )

    # ---------------------------------------------------------------- DPO: best vs worst within one source
    dpo_mask = is_dpo & ~sft_only[d] & ~identical
    n_sources = max(len(sources), 1)
    ps = p.astype(np.int64) * n_sources + s
    rows = np.flatnonzero(dpo_mask & chosen_ok)
    chosen = rows[top_per_group(ps[rows], [-reward[rows], row_key[rows]])]
    rows = np.flatnonzero(dpo_mask & rejected_ok)
    # The reverse of the chosen order, so that with one response set the two picks differ whenever they can.
    rejected = rows[top_per_group(ps[rows], [reward[rows], ~row_key[rows]])]
    _, ci, ri = np.intersect1d(ps[chosen], ps[rejected], assume_unique=True, return_indices=True)
    chosen, rejected = chosen[ci], rejected[ri]
    distinct = chosen != rejected
    chosen, rejected = chosen[distinct], rejected[distinct]
    margin = reward[chosen] - reward[rejected]
    low, high = rules.margin
    # Inclusive, with float slack: 0.51 - 0.41 is 0.10000000000000003 and belongs to a [0.01, 0.1] band.
    in_band = (margin >= low - BAND_SLACK) & (margin <= high + BAND_SLACK)
    dpo_prompts = np.flatnonzero(split_of_prompt == "dpo")
    _drop(dropped["dpo"], why, dpo_prompts[sft_only[d_of_prompt[dpo_prompts]]], "sft_only_domain")
    pair_p = p[chosen]
    has_pair, has_band, any_below, any_above = (np.zeros(n_prompts, dtype=bool) for _ in range(4))
    has_pair[pair_p] = True
    has_band[pair_p[in_band]] = True
    any_below[pair_p[margin < low - BAND_SLACK]] = True
    any_above[pair_p[margin > high + BAND_SLACK]] = True
    out = _count_missing(
        dropped["dpo"],
        dpo_prompts[~sft_only[d_of_prompt[dpo_prompts]]],
        p,
        {
            "no_samples": np.ones(len(p), dtype=bool),
            "identical_samples": ~identical,  # every source that answered repeated one text k times
            "no_usable_response": usable & ~identical,
            "no_acceptable_response": chosen_ok & ~identical,  # verified domains: every response incorrect
            "no_rejected_response": rejected_ok & ~identical,  # verified domains: every response correct
        },
        n_prompts,
        why,
    )
    # Both kinds exist, but never in one source (or each source has a single response).
    _drop(dropped["dpo"], why, out[~has_pair[out]], "no_same_source_pair")
    out = out[has_pair[out] & ~has_band[out]]
    _drop(dropped["dpo"], why, out[any_below[out] & ~any_above[out]], "margin_below_band")
    _drop(dropped["dpo"], why, out[any_above[out] & ~any_below[out]], "margin_above_band")
    _drop(dropped["dpo"], why, out[any_above[out] & any_below[out]], "margin_outside_band")

    keep = np.flatnonzero(in_band)
    source_key = _mix(prompt_hash[pair_p[keep]] ^ source_hash[s[chosen[keep]]])
    rank = {
        "largest_margin": [-margin[keep], source_key],
        "highest_chosen": [-reward[chosen[keep]], source_key],
        "random": [source_key],
    }[rules.pair_source_rule]
    keep = keep[top_per_group(pair_p[keep], rank, n=rules.pairs_per_prompt)]
    keep = keep[np.lexsort((s[chosen[keep]], pair_p[keep]))]
    c, r = chosen[keep], rejected[keep]
    dpo = pa.table(
        {
            "prompt_id": prompt_ids.take(p[c]),
            "domain": domain_arr.take(p[c]),
            "source": sources.take(s[c]),
            "chosen_row": pa.array(c, pa.int64()),
            "rejected_row": pa.array(r, pa.int64()),
            "chosen_index": pa.array(sample_index[c], pa.int32()),
            "rejected_index": pa.array(sample_index[r], pa.int32()),
            "chosen_reward": pa.array(reward[c], pa.float64()),
            "rejected_reward": pa.array(reward[r], pa.float64()),
            "margin": pa.array(margin[keep], pa.float64()),
        }
    )
    above = margin > high + BAND_SLACK
    contenders = np.unique(np.concatenate([best, c, r, chosen[above], rejected[above]]))
    return Selection(
        sft=sft,
        dpo=dpo,
        dropped=dropped,
        excluded=excluded,
        verified=dict(sorted(verified.items())),
        candidate_margins=np.sort(margin),
        excluded_reason=excluded_reason,
        acceptable=chosen_ok,
        dropped_reason=why,
        contenders=contenders,
    )


# --------------------------------------------------------------------------------------------- helpers
def top_per_group(group: np.ndarray, keys: list[np.ndarray], n: int = 1) -> np.ndarray:
    """Positions of the first `n` rows of each group when rows are ordered by `keys` (first key first)."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort([*reversed(keys), group])
    g = group[order]
    starts = np.r_[True, g[1:] != g[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(g)), 0))
    return order[np.arange(len(g)) - first < n]


def codes_in(values: pa.Array | pa.ChunkedArray, value_set: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Position of each value in `value_set` (-1 when absent); dictionary arrays map only their dictionary."""
    if isinstance(value_set, pa.ChunkedArray):
        value_set = value_set.combine_chunks()
    if isinstance(values, pa.ChunkedArray):
        parts = [codes_in(chunk, value_set) for chunk in values.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if pa.types.is_dictionary(values.type):
        mapping = codes_in(values.dictionary, value_set)
        return mapping[values.indices.to_numpy(zero_copy_only=False)]
    return pc.index_in(values, value_set=value_set).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def dictionary_codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(code per value, sorted distinct values); a dictionary column is read through its dictionaries only."""
    if pa.types.is_dictionary(values.type):
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        pool = pa.chunked_array([c.dictionary for c in chunks], values.type.value_type)
    else:
        pool = values
    distinct = pc.unique(pool)
    distinct = distinct.take(pc.sort_indices(distinct))
    return codes_in(values, distinct), distinct


def _flag(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column(name).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit value from any 64-bit input (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _prompt_hashes(prompt_ids: pa.ChunkedArray, seed: int) -> np.ndarray:
    return np.fromiter(
        (_hash64(f"{seed}\0{pid}") for pid in prompt_ids.to_pylist()), dtype=np.uint64, count=len(prompt_ids)
    )


def _source_hashes(sources: pa.Array) -> np.ndarray:
    return np.fromiter(
        (_hash64(f"source\0{name}") for name in sources.to_pylist()), dtype=np.uint64, count=len(sources)
    )


def _count_missing(
    counter: Counter,
    prompts: np.ndarray,
    p: np.ndarray,
    stages: dict[str, np.ndarray],
    n_prompts: int,
    why: np.ndarray,
) -> np.ndarray:
    """Count prompts (of `prompts`) that have no row in the first mask, else none in the next, and so on: each
    dropped prompt is counted once, under the first requirement it fails. Returns the prompts that pass all."""
    alive = np.ones(len(prompts), dtype=bool)
    for reason, mask in stages.items():
        present = np.zeros(n_prompts, dtype=bool)
        present[p[mask]] = True
        fails = alive & ~present[prompts]
        _drop(counter, why, prompts[fails], reason)
        alive &= ~fails
    return prompts[alive]


def _drop(counter: Counter, why: np.ndarray, prompts: np.ndarray, reason: str) -> None:
    """Count `prompts` as dropped for `reason` and note the reason on each."""
    _add(counter, reason, len(prompts))
    why[prompts] = reason


def _add(counter: Counter, key: str, n: int) -> None:
    if n:
        counter[key] += n
