"""Locality-sensitive hashing over MinHash signatures, and duplicate clusters by union-find.

Signatures are cut into ``bands`` bands of ``rows`` slots; two documents become a candidate
pair when all slots of at least one band agree, which happens with probability
``1 - (1 - J^rows)^bands`` for Jaccard similarity ``J``. ``choose_bands`` picks the split that
minimises the area of false positives below the threshold plus false negatives above it (the
criterion datasketch uses; for 0.8 and 128 slots it gives SlimPajama's 9 x 13).

Each band is independent: a band is a group-by on its key, which is why the same design runs
band-partitioned on a distributed engine (see the README).
"""

from __future__ import annotations

import numpy as np

MAX_ALL_PAIRS = 32  # buckets up to this size yield every pair for verification; bigger ones a chain and a star


def candidate_probability(similarity: np.ndarray | float, bands: int, rows: int) -> np.ndarray:
    """Probability that two documents of the given Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - np.asarray(similarity, np.float64) ** rows) ** bands


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with ``bands * rows <= num_perm`` minimising false-positive plus false-negative area."""
    s = np.linspace(0.0, 1.0, 2001)
    below = s <= threshold
    best, best_err = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = candidate_probability(s, bands, rows)
            # Riemann sums on a fine grid: false-positive area below, false-negative area above.
            err = (p[below].sum() + (1.0 - p[~below]).sum()) * (s[1] - s[0])
            if err < best_err - 1e-12:
                best, best_err = (bands, rows), err
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``[n, bands]`` 64-bit keys, each a hash of one band's ``rows`` signature slots."""
    sig = signatures.astype(np.uint64)
    keys = np.zeros((len(sig), bands), np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(len(sig), np.uint64(b + 1) * np.uint64(0x9E3779B97F4A7C15))
            for r in range(b * rows, (b + 1) * rows):
                h = (h ^ sig[:, r]) * np.uint64(0xBF58476D1CE4E5B9)
                h ^= h >> np.uint64(29)
            keys[:, b] = h
    return keys


def buckets(keys: np.ndarray) -> list[np.ndarray]:
    """Groups of two or more document ids sharing one band key (ids ascending in each group)."""
    groups = []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        ends = np.append(starts[1:], len(k))
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            groups.append(order[s:e])
    return groups


def star_edges(groups: list[np.ndarray]) -> np.ndarray:
    """Edges joining each bucket's members to its first: enough for connected components."""
    if not groups:
        return np.zeros((0, 2), np.int64)
    return np.concatenate([np.stack([np.full(len(g) - 1, g[0]), g[1:]], 1) for g in groups]).astype(np.int64)


def candidate_pairs(groups: list[np.ndarray]) -> np.ndarray:
    """Distinct ``(i < j)`` pairs to verify: all pairs of small buckets, a chain and a star for big ones."""
    parts = []
    for g in groups:
        if len(g) <= MAX_ALL_PAIRS:
            i, j = np.triu_indices(len(g), 1)
            parts.append(np.stack([g[i], g[j]], 1))
        else:
            parts.append(np.stack([g[:-1], g[1:]], 1))
            parts.append(np.stack([np.full(len(g) - 2, g[0]), g[2:]], 1))
    if not parts:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(np.concatenate(parts).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


class UnionFind:
    """Disjoint sets over ``0..n-1``; every set's root is its smallest member (the document kept)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, pairs: np.ndarray) -> None:
        for a, b in pairs.tolist():
            self.union(a, b)

    def roots(self) -> np.ndarray:
        """The root of every element (full path compression, vectorised)."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand
