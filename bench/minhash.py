"""MinHash signature throughput (13-character shingles, 128 permutations) on the Python standard
library's sources: slimjax (NumPy shingle hashing + rensa's R-MinHash in Rust) against datasketch,
the usual Python choice (SlimPajama used it), and a classic vectorised-NumPy MinHash (128
multiply-shift permutations) measured side by side in the same run.

Usage: python bench/minhash.py [--mb=4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slimjax.data import sources, text
from slimjax.data.prepare import minhash
from table import print_table, write_result

NUM_PERM, NGRAM = 128, 13
TARGET_X_DATASKETCH = 20.0  # the data-preparation issue's target: >= 20x datasketch's MB/s


def corpus(megabytes: float) -> list[str]:
    """Normal forms of standard-library files, in file order, up to ``megabytes`` of text."""
    docs, total = [], 0
    for path in sources.stdlib_files():
        try:
            normal = text.normal_form(open(path, encoding="utf-8").read())
        except UnicodeDecodeError:
            continue
        if len(normal) >= 200:
            docs.append(normal)
            total += len(normal.encode())
        if total >= megabytes * 1e6:
            break
    return docs


def slimjax_signatures(docs: list[str]) -> np.ndarray:
    return minhash.signatures([minhash.shingle_hashes(d, NGRAM) for d in docs], NUM_PERM)


def datasketch_signatures(docs: list[str]) -> np.ndarray:
    from datasketch import MinHash

    out = []
    for d in docs:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([d[i:i + NGRAM].encode() for i in range(len(d) - NGRAM + 1)])
        out.append(m.hashvalues)
    return np.asarray(out)


_RNG = np.random.default_rng(0)
_A = (_RNG.integers(0, 2**62, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1))[:, None]
_B = _RNG.integers(0, 2**62, NUM_PERM, dtype=np.uint64)[:, None]


def numpy_signatures(docs: list[str]) -> np.ndarray:
    """Classic MinHash: 128 multiply-shift permutations of every shingle hash, minimum per permutation."""
    out = []
    for d in docs:
        h = minhash.shingle_hashes(d, NGRAM)
        sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
        for s in range(0, len(h), 2048):  # blocks stay in cache
            np.minimum(sig, ((_A * h[None, s:s + 2048] + _B) >> np.uint64(32)).min(axis=1), out=sig)
        out.append(sig)
    return np.asarray(out)


def measure(fn, docs: list[str]) -> dict:
    t0 = time.perf_counter()
    sigs = fn(docs)
    seconds = time.perf_counter() - t0
    mb = sum(len(d.encode()) for d in docs) / 1e6
    return {"docs": len(docs), "mb": mb, "seconds": seconds, "mb_per_s": mb / seconds, "shape": list(sigs.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text for the fast implementations")
    parser.add_argument("--datasketch_mb", type=float, default=1.0, help="megabytes for datasketch (slow)")
    args = parser.parse_args()
    docs = corpus(args.mb)
    small = corpus(args.datasketch_mb)
    rows = [{"implementation": "datasketch 128 perms", **measure(datasketch_signatures, small)},
            {"implementation": "numpy classic 128 perms", **measure(numpy_signatures, small)},
            {"implementation": "slimjax (numpy shingles + rensa)", **measure(slimjax_signatures, docs)}]
    for r in rows:
        r["x_datasketch"] = r["mb_per_s"] / rows[0]["mb_per_s"]
    print_table(rows, ["implementation", "docs", "mb", "seconds", "mb_per_s", "x_datasketch"])
    ratio = rows[-1]["x_datasketch"]
    targets = [{"name": "slimjax MinHash MB/s / datasketch's", "value": ratio, "target": TARGET_X_DATASKETCH,
                "met": ratio >= TARGET_X_DATASKETCH}]
    print_table(targets, ["name", "value", "target", "met"])
    print("wrote", write_result("minhash", {"ngram": NGRAM, "num_perm": NUM_PERM, "rows": rows, "targets": targets}))


if __name__ == "__main__":
    main()
