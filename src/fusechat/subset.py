"""`prompts.sources[].limit`: a seeded random sample of a source's prompts, optionally stratified by a column.

A prompt's rank is a seeded hash of its id, so the sample does not depend on the order of the file (UltraFeedback's
files load alphabetically: its first N rows are almost all evol_instruct and flan). With `stratify`, each stratum
(value of the column) gets a share of the limit proportional to its size (largest remainders), and takes its
lowest-ranked prompts. Memory is bounded by the limit: each stratum keeps at most `limit` candidates (a max-heap
on the rank), so a stream of millions of rows never lives in memory; the candidates' rows wait in a spill file.

`Reservoir` is the pure core: it sees keys, strata and row numbers, never rows.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from typing import Any

VERSION = 1  # bump when the sample drawn for a given seed changes: cached prompts versions are then rebuilt


def rank(seed: int, key: str) -> int:
    """A prompt's place in the sample: the lowest ranks are kept."""
    return int.from_bytes(hashlib.sha256(f"{seed}:limit:{key}".encode()).digest()[:8], "big")


def allocate(limit: int, sizes: dict[Any, int]) -> dict[Any, int]:
    """`limit` split over strata in proportion to their sizes (largest remainders; ties by stratum, as text). A
    stratum never gets more than it has; with `limit` >= the total every stratum keeps everything."""
    total = sum(sizes.values())
    if total <= limit:
        return dict(sizes)
    exact = {s: limit * n / total for s, n in sizes.items()}
    quota = {s: int(q) for s, q in exact.items()}
    left = limit - sum(quota.values())
    for s in sorted(sizes, key=lambda s: (-(exact[s] - quota[s]), str(s)))[:left]:
        quota[s] += 1
    return quota


class Reservoir:
    """The `limit` lowest-ranked keys of each stratum seen so far, with the row number (in the caller's spill file)
    of each. `wants` says whether a key could still be sampled, before the caller spends work on its row."""

    def __init__(self, limit: int | None, seed: int):
        self.limit = limit
        self.seed = seed
        self.heaps: dict[Any, list[tuple[int, int, str]]] = {}  # stratum -> [(-rank, row, key)]
        self.sizes: Counter = Counter()  # stratum -> distinct keys offered
        self.live: set[str] = set()  # keys that may still be sampled (wanted, not evicted or rejected)

    def offer(self, key: str, stratum: Any) -> bool:
        """Count a new distinct key of `stratum`; True when it ranks low enough to be a candidate (then `add` or
        `reject` it)."""
        self.sizes[stratum] += 1
        heap = self.heaps.setdefault(stratum, [])
        wanted = self.limit is None or len(heap) < self.limit or rank(self.seed, key) < -heap[0][0]
        if wanted:
            self.live.add(key)
        return wanted

    def reject(self, key: str) -> None:
        self.live.discard(key)

    def add(self, key: str, stratum: Any, row: int) -> None:
        heap = self.heaps.setdefault(stratum, [])
        entry = (-rank(self.seed, key), row, key)
        if self.limit is None or len(heap) < self.limit:
            heapq.heappush(heap, entry)
            return
        if entry > heap[0]:  # ranks lower than the highest kept: it replaces that one
            self.live.discard(heapq.heapreplace(heap, entry)[2])
        else:
            self.live.discard(key)

    def sample(self) -> tuple[list[int], dict[Any, dict[str, int]]]:
        """Row numbers of the sample (ascending: read order), and per stratum how many distinct keys were offered
        and how many are kept."""
        sizes = {s: self.sizes[s] for s in self.sizes}
        quota = allocate(self.limit, sizes) if self.limit is not None else sizes
        rows: list[int] = []
        strata = {}
        for s, n in sizes.items():
            kept = sorted(self.heaps.get(s, []), reverse=True)[: quota[s]]  # lowest ranks first
            rows.extend(row for _, row, _ in kept)
            strata[s] = {"available": n, "kept": len(kept)}
        return sorted(rows), strata
