"""MinHash signatures over character n-grams (SlimPajama: 13-grams, 128 permutations).

Shingles are hashed in NumPy, vectorised over a whole document: a polynomial hash of every
n-character window from one prefix sum (``sum c[k] * B^-k`` modulo 2^64, so a window's hash is a
difference of two prefix values times ``B^i``), then a SplitMix64 finaliser to spread the bits.
The 128 minima are taken by ``rensa``'s R-MinHash in Rust (``digest_matrix_from_flat_token_hashes``):
each slot is the minimum of a seeded hash over the shingle set, so a slot agrees between two
documents with probability equal to their Jaccard similarity, as LSH needs. Rensa's fast
similarity sketching fills the 128 slots without evaluating 128 hashes per shingle, which is why
it is ~70x datasketch where a vectorised-NumPy classic MinHash managed ~5x
(``bench/minhash.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_BASE = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2^64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_SEED = 0x5EED


class _Powers:
    """Cached ``B^k`` and ``B^-k`` modulo 2^64, grown on demand."""

    def __init__(self) -> None:
        self.pos = np.ones(1, np.uint64)
        self.neg = np.ones(1, np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.pos) < n:
            size = max(n, 2 * len(self.pos))
            with np.errstate(over="ignore"):
                self.pos = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE, np.uint64))])
                self.neg = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE_INV, np.uint64))])
        return self.pos[:n], self.neg[:n]


_POWERS = _Powers()


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit affects every output bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shingle_hashes(text: str, n: int = 13) -> np.ndarray:
    """64-bit hashes of every ``n``-character window of ``text`` (one window if it is shorter)."""
    if not text:
        return np.zeros(0, np.uint64)
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.uint64)
    if len(codes) < n:
        n = len(codes)
    pos, neg = _POWERS.upto(len(codes) + 1)
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(codes * neg[: len(codes)], dtype=np.uint64)])
        windows = (prefix[n:] - prefix[: len(codes) - n + 1]) * pos[: len(codes) - n + 1]
        return mix64(windows + np.uint64(n))


def signatures(shingles: Sequence[np.ndarray], num_perm: int = 128) -> np.ndarray:
    """``[len(shingles), num_perm]`` uint32 MinHash signatures, one row per shingle set."""
    import rensa

    if not len(shingles):
        return np.zeros((0, num_perm), np.uint32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in shingles])]).astype(np.uint64)
    flat = np.concatenate(shingles).astype(np.uint64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, _SEED)
    return np.asarray(matrix.to_rows(), np.uint32).reshape(len(shingles), num_perm)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets (sorted unique arrays)."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
