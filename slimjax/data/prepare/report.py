"""The prepare report: documents and bytes removed per source and why, the cluster-size
histogram, LSH parameters and the time and peak memory of each stage."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import resource
import time
from typing import Any, Sequence

import numpy as np

from slimjax.data import sources
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


OUTCOMES = (("duplicate", DROPPED), ("contaminated", CONTAMINATED), ("train", TRAIN), ("heldout", HELDOUT))


@dataclasses.dataclass
class Tally:
    """The counts a report is made of, whichever runner gathered them.

    ``docs`` maps ``(source label, outcome)`` to ``[documents, bytes]``, outcomes being "short"
    and the names in ``OUTCOMES``; ``cluster_sizes`` maps a size above one to its clusters.
    """

    docs: dict[tuple[str, str], list[int]]
    cluster_sizes: dict[int, int]
    largest: int
    read_stats: sources.ReadStats
    peak_worker_mb: float
    tasks: int

    @classmethod
    def from_scans(cls, scans: Sequence[Any]) -> Tally:
        """A tally of the short documents and skipped records of ``scans`` (in task order)."""
        docs: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        stats = sources.ReadStats()
        for s in scans:
            for label, n in s.short.items():
                docs[(label, "short")][0] += n
                docs[(label, "short")][1] += s.short_bytes[label]
            stats.merge(s.read_stats)
        return cls(docs, {}, 0, stats, max((s.peak_rss_mb for s in scans), default=0.0), len(scans))


def tally(scans: Sequence[Any], labels: np.ndarray, label_names: Sequence[str], nbytes: np.ndarray,
          split: np.ndarray, roots: np.ndarray) -> Tally:
    """The local pool's tally: per-document arrays (``labels`` index ``label_names``)."""
    t = Tally.from_scans(scans)
    for i, name in enumerate(label_names):
        for outcome, code in OUTCOMES:
            sel = (labels == i) & (split == code)
            if sel.any():
                t.docs[(name, outcome)] = [int(sel.sum()), int(nbytes[sel].sum())]
    sizes = np.bincount(roots, minlength=len(roots))
    t.cluster_sizes = dict(collections.Counter(sizes[sizes > 1].tolist()))
    t.largest = int(sizes.max(initial=0))
    return t


def build(t: Tally, timer: Timer, opts, bands_rows: tuple[int, int], verified: dict[str, int] | None,
          files_written: int, workers: int, runner: str) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    per_source: dict[str, dict[str, int]] = {}
    for name in sorted({label for label, _ in t.docs}):
        row = {}
        for outcome in ("short", *(o for o, _ in OUTCOMES)):
            row[f"{outcome}_docs"], row[f"{outcome}_bytes"] = t.docs.get((name, outcome), [0, 0])
        row["docs_in"] = sum(row[f"{o}_docs"] for o in ("short", *(o for o, _ in OUTCOMES)))
        row["bytes_in"] = sum(row[f"{o}_bytes"] for o in ("short", *(o for o, _ in OUTCOMES)))
        after_filter = row["bytes_in"] - row["short_bytes"]
        row["duplicate_byte_rate"] = row["duplicate_bytes"] / after_filter if after_filter else 0.0
        per_source[name] = row
    bytes_in = sum(r["bytes_in"] for r in per_source.values())
    seconds = sum(timer.seconds.values())
    bands, rows = bands_rows
    return {
        "sources": per_source,
        "totals": {k: sum(r[k] for r in per_source.values()) for k in next(iter(per_source.values()))
                   if k != "duplicate_byte_rate"},
        "clusters": {"count": sum(t.cluster_sizes.values()), "largest": t.largest,
                     "size_histogram": {str(k): t.cluster_sizes[k] for k in sorted(t.cluster_sizes)}},
        "lsh": {"threshold": opts.threshold, "num_perm": opts.num_perm, "ngram": opts.ngram, "bands": bands,
                "rows": rows, "verify": opts.verify, "dedup": opts.dedup,
                "candidate_probability": {str(s): round(float(lsh.candidate_probability(s, bands, rows)), 4)
                                          for s in SIMILARITIES}},
        "verification": verified,
        "skipped_records": dict(t.read_stats.skipped), "first_skipped": dict(t.read_stats.first),
        "stages_s": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds": round(seconds, 3),
        "input_mb": bytes_in / 1e6,
        "mb_per_s": bytes_in / 1e6 / seconds if seconds else float("nan"),
        "peak_rss_mb": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                        "largest_worker": t.peak_worker_mb},
        "files_written": files_written,
        "tasks": t.tasks,
        "workers": workers,
        "runner": runner,
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
