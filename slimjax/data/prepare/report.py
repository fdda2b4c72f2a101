"""The prepare report: documents and bytes removed per source and why, the cluster-size
histogram, LSH parameters and the time and peak memory of each stage."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import time
from typing import Any

import numpy as np

from slimjax.data.prepare import lsh

SIMILARITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
# What happened to each document that passed the short-document filter.
DROPPED, TRAIN, HELDOUT, CONTAMINATED = 0, 1, 2, 3


class Timer:
    """Wall seconds per named stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def build(corpus, split: np.ndarray, roots: np.ndarray, timer: Timer, scans, opts, bands_rows: tuple[int, int],
          verified: dict[str, int] | None, written: list[dict[str, int]]) -> dict[str, Any]:
    """The report as a JSON-ready dict (``corpus`` and ``split`` as produced by ``prepare.run``)."""
    per_source: dict[str, dict[str, int]] = {}
    for i, name in enumerate(corpus.label_names):
        mine = corpus.labels == i
        row = {"short_docs": sum(s.short[name] for s in scans), "short_bytes": sum(s.short_bytes[name] for s in scans)}
        for outcome, code in (("duplicate", DROPPED), ("contaminated", CONTAMINATED), ("train", TRAIN),
                              ("heldout", HELDOUT)):
            sel = mine & (split == code)
            row[f"{outcome}_docs"], row[f"{outcome}_bytes"] = int(sel.sum()), int(corpus.nbytes[sel].sum())
        row["docs_in"] = row["short_docs"] + int(mine.sum())
        row["bytes_in"] = row["short_bytes"] + int(corpus.nbytes[mine].sum())
        after_filter = row["bytes_in"] - row["short_bytes"]
        row["duplicate_byte_rate"] = row["duplicate_bytes"] / after_filter if after_filter else 0.0
        per_source[name] = row
    sizes = np.bincount(roots, minlength=len(roots))
    histogram = collections.Counter(sizes[sizes > 1].tolist())
    bytes_in = sum(r["bytes_in"] for r in per_source.values())
    seconds = sum(timer.seconds.values())
    skipped = collections.Counter()
    first: dict[str, str] = {}
    for s in scans:
        skipped.update(s.read_stats.skipped)
        for reason, where in s.read_stats.first.items():
            first.setdefault(reason, where)
    bands, rows = bands_rows
    return {
        "sources": per_source,
        "totals": {k: sum(r[k] for r in per_source.values()) for k in next(iter(per_source.values()))
                   if k != "duplicate_byte_rate"},
        "clusters": {"count": int((sizes > 1).sum()), "largest": int(sizes.max(initial=0)),
                     "size_histogram": {str(k): histogram[k] for k in sorted(histogram)}},
        "lsh": {"threshold": opts.threshold, "num_perm": opts.num_perm, "ngram": opts.ngram, "bands": bands,
                "rows": rows, "verify": opts.verify, "dedup": opts.dedup,
                "candidate_probability": {str(s): round(float(lsh.candidate_probability(s, bands, rows)), 4)
                                          for s in SIMILARITIES}},
        "verification": verified,
        "skipped_records": dict(skipped), "first_skipped": first,
        "stages_s": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds": round(seconds, 3),
        "input_mb": bytes_in / 1e6,
        "mb_per_s": bytes_in / 1e6 / seconds if seconds else float("nan"),
        "peak_rss_mb": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                        "largest_worker": max(s.peak_rss_mb for s in scans)},
        "files_written": sum(len(w) for w in written),
        "tasks": len(scans),
        "workers": opts.workers or os.cpu_count(),
    }


def table(report: dict[str, Any]) -> str:
    """A plain-text summary: one line per source, then clusters, stages and throughput."""
    head = f"{'source':<28}{'docs in':>10}{'MB in':>9}{'short':>8}{'dup':>8}{'contam':>8}{'train':>8}{'held':>7}{'dup B%':>8}"
    lines = [head, "-" * len(head)]
    for name, r in [*report["sources"].items(), ("total", report["totals"])]:
        rate = r["duplicate_bytes"] / max(r["bytes_in"] - r["short_bytes"], 1)
        lines.append(f"{name[:27]:<28}{r['docs_in']:>10}{r['bytes_in'] / 1e6:>9.2f}{r['short_docs']:>8}"
                     f"{r['duplicate_docs']:>8}{r['contaminated_docs']:>8}{r['train_docs']:>8}"
                     f"{r['heldout_docs']:>7}{100 * rate:>7.1f}%")
    c, l = report["clusters"], report["lsh"]
    lines.append(f"clusters: {c['count']} (largest {c['largest']}); sizes {c['size_histogram']}")
    lines.append(f"lsh: {l['bands']} bands x {l['rows']} rows for J={l['threshold']}, verify={l['verify']}; "
                 f"P(candidate | J) = {l['candidate_probability']}")
    if report["skipped_records"]:
        lines.append(f"skipped records: {report['skipped_records']} (first: {report['first_skipped']})")
    lines.append("stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["stages_s"].items()))
    peak = report["peak_rss_mb"]
    lines.append(f"{report['input_mb']:.1f} MB in {report['seconds']:.1f}s = {report['mb_per_s']:.2f} MB/s; "
                 f"peak RSS {peak['main']:.0f} MB (main), {peak['largest_worker']:.0f} MB (largest worker)")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON under a temporary name, then renames it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
