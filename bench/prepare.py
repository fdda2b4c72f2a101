"""``slimjax prepare`` on one machine (the local process pool) and on Apache Beam's DirectRunner,
against datatrove's MinHash deduplication (FineWeb's) measured in the same run on the same
corpus with the same shingles (13 characters of the normal form), permutations and bands
(SlimPajama's 9 x 13): wall time, MB/s and peak RSS of each run (a fresh process each), recall on
planted pairs at exact Jaccard >= 0.85 and false positives on pairs at J <= 0.6, and the
per-document costs the README's SlimPajama estimate is made from.

The corpus: ``--pairs`` near-duplicate pairs (J >= 0.85), as many dissimilar pairs (J <= 0.6) and
singletons, 1,500-character documents, in 12 JSON Lines files.

Usage: python bench/prepare.py [--pairs=600] [--workers=0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import zstandard

from table import print_table, write_result

HERE = os.path.dirname(os.path.abspath(__file__))
# The planted-pair generator the dedup tests check their own quality bounds with.
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from test_prepare_dedup import exact_jaccard, mutate, random_doc  # noqa: E402

BANDS, ROWS, NUM_PERM, NGRAM = 9, 13, 128, 13
FILES = 12


def make_corpus(root: str, pairs: int, seed: int = 0) -> list[tuple[int, int, float]]:
    """Writes the corpus under ``root``; returns (id a, id b, exact J) of every planted pair."""
    rng = np.random.default_rng(seed)
    docs, planted = [], []
    for m in [*rng.integers(0, 10, pairs), *rng.integers(28, 70, pairs)]:
        base = random_doc(rng)
        variant = mutate(rng, base, int(m))
        planted.append((len(docs), len(docs) + 1, exact_jaccard(base, variant)))
        docs += [base, variant]
    docs += [random_doc(rng) for _ in range(pairs)]
    order = rng.permutation(len(docs))
    os.makedirs(root)
    for f, ids in enumerate(np.array_split(order, FILES)):
        with open(os.path.join(root, f"part{f:02d}.jsonl"), "w") as out:
            for i in ids:
                out.write(json.dumps({"text": docs[i], "id": str(i), "meta": {"id": int(i)}}) + "\n")
    return planted


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the process and its largest waited-for descendant)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def slimjax_run(corpus: str, out: str, extra: list[str]) -> dict:
    wall, peak = timed([sys.executable, "-m", "slimjax.cli", "prepare", f"--source=jsonl:{corpus}/*.jsonl",
                        f"--out={out}", "--heldout=0", f"--bands={BANDS}", f"--rows={ROWS}", *extra])
    report = json.load(open(os.path.join(out, "report.json")))
    kept = set()
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith(".jsonl.zst"):
                with open(os.path.join(root, name), "rb") as fh:
                    data = zstandard.ZstdDecompressor().stream_reader(fh).read().decode()
                kept |= {json.loads(line)["meta"]["id"] for line in data.splitlines()}
    return {"wall_s": wall, "peak_rss_mb": peak, "kept": kept, "stages_s": report["stages_s"]}


def datatrove_run(corpus: str, out: str, workers: int) -> dict:
    wall, peak = timed([sys.executable, __file__, "--datatrove-child", corpus, out, str(workers)])
    kept = set()
    for root, _, files in os.walk(os.path.join(out, "kept")):
        for name in files:
            with open(os.path.join(root, name)) as fh:
                kept |= {int(json.loads(line)["id"]) for line in fh}
    return {"wall_s": wall, "peak_rss_mb": peak, "kept": kept}


def datatrove_child(corpus: str, out: str, workers: int) -> None:
    """datatrove's four MinHash stages (signatures, buckets, clusters, filter), 9 x 13 hashes over
    13-character shingles of its own simplified text."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import simplify_text
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CharShingles(MinhashDedupSignature):
        """Character 13-gram shingles (datatrove's default is word 5-grams), as slimjax and SlimPajama."""

        def get_shingles(self, text: str) -> np.ndarray:
            s = simplify_text(text, self.config.norm_config)
            grams = [s[i:i + NGRAM] for i in range(max(len(s) - NGRAM + 1, 1))]
            return np.fromiter(map(self._hash_func, grams), np.uint64).reshape(-1, 1)

    class Unused(WordTokenizer):
        """Character shingles need no word tokenizer (datatrove's English one needs spaCy)."""

        def word_tokenize(self, text):
            raise NotImplementedError

        sent_tokenize = span_tokenize = word_tokenize

    config = MinhashConfig(num_buckets=BANDS, hashes_per_bucket=ROWS)
    read = lambda: JsonlReader(corpus, glob_pattern="*.jsonl")  # noqa: E731
    logs = os.path.join(out, "logs")
    stages = [
        ([read(), CharShingles(os.path.join(out, "sigs"), config=config, language=Unused())], FILES, workers),
        ([MinhashDedupBuckets(os.path.join(out, "sigs"), os.path.join(out, "buckets"), config=config)], BANDS, workers),
        ([MinhashDedupCluster(os.path.join(out, "buckets"), os.path.join(out, "remove"), config=config)], 1, 1),
        ([read(), MinhashDedupFilter(os.path.join(out, "remove")), JsonlWriter(os.path.join(out, "kept"),
                                                                               compression=None)], FILES, workers),
    ]
    for i, (pipeline, tasks, w) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=w, logging_dir=f"{logs}/{i}").run()


def quality(planted: list[tuple[int, int, float]], kept: set[int]) -> dict:
    merged = {(a, b): (a in kept) != (b in kept) for a, b, _ in planted}
    high = [merged[(a, b)] for a, b, j in planted if j >= 0.85]
    low = [merged[(a, b)] for a, b, j in planted if j <= 0.6]
    return {"recall_j85": float(np.mean(high)), "false_pos_j60": float(np.mean(low)), "pairs_high": len(high),
            "pairs_low": len(low)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=600, help="near-duplicate pairs (as many far pairs, singletons)")
    parser.add_argument("--workers", type=int, default=0, help="parallel runs' workers (0: one per core)")
    parser.add_argument("--datatrove-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.datatrove_child:
        corpus, out, workers = args.datatrove_child
        return datatrove_child(corpus, out, int(workers))
    workers = args.workers or os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        planted = make_corpus(corpus, args.pairs)
        mb = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus)) / 1e6
        runs = [("slimjax local, 1 worker", lambda o: slimjax_run(corpus, o, ["--workers=1"])),
                (f"slimjax local, {workers} workers", lambda o: slimjax_run(corpus, o, [f"--workers={workers}"])),
                ("slimjax Beam DirectRunner", lambda o: slimjax_run(corpus, o, ["--runner=direct", "--cc_rounds=4"])),
                (f"datatrove MinHash, {workers} workers", lambda o: datatrove_run(corpus, o, workers))]
        for i, (name, fn) in enumerate(runs):
            r = fn(os.path.join(tmp, f"out{i}"))
            rows.append({"run": name, "mb": mb, "wall_s": r["wall_s"], "mb_per_s": mb / r["wall_s"],
                         "peak_rss_mb": r["peak_rss_mb"], **quality(planted, r["kept"]),
                         **({"stages_s": r["stages_s"]} if "stages_s" in r else {})})
    print_table(rows, ["run", "mb", "wall_s", "mb_per_s", "peak_rss_mb", "recall_j85", "false_pos_j60"])
    serial, parallel, _, peer = rows
    docs = 5 * args.pairs
    # Per-document costs of the local pool's stages (one worker), for the README's estimate.
    per_doc_ms = {k: 1e3 * v / docs for k, v in serial["stages_s"].items()}
    print("per document, 1 worker (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in per_doc_ms.items()))
    # Whole runs per document, start-up included: the DirectRunner's per-element overhead shows here.
    whole_ms = {r["run"]: 1e3 * r["wall_s"] / docs for r in rows}
    targets = [
        {"name": "recall at J>=0.85: slimjax local / datatrove (same 9x13 bands)",
         "value": serial["recall_j85"] / max(peer["recall_j85"], 1e-9), "target": ">= 1.0",
         "met": serial["recall_j85"] >= peer["recall_j85"]},
        {"name": "false positives at J<=0.6: slimjax local - datatrove",
         "value": serial["false_pos_j60"] - peer["false_pos_j60"], "target": "<= 0",
         "met": serial["false_pos_j60"] <= peer["false_pos_j60"]},
        {"name": f"throughput: slimjax local ({workers} workers) / datatrove ({workers} workers)",
         "value": parallel["mb_per_s"] / peer["mb_per_s"], "target": ">= 2.0",
         "met": parallel["mb_per_s"] >= 2 * peer["mb_per_s"]},
    ]
    for t in targets:
        print(f"target {t['name']}: {t['value']:.3f} ({t['target']}) {'met' if t['met'] else 'NOT met'}")
    print("wrote", write_result("prepare", {
        "corpus": {"pairs": args.pairs, "docs": docs, "mb": rows[0]["mb"], "files": FILES},
        "settings": {"bands": BANDS, "rows": ROWS, "num_perm": NUM_PERM, "ngram": NGRAM, "workers": workers},
        "rows": rows, "per_doc_ms_1_worker": per_doc_ms, "per_doc_ms_whole_run": whole_ms,
        "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "targets": targets}))


if __name__ == "__main__":
    main()
