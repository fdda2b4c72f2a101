"""End-to-end ``slimjax prepare`` on the Python standard library (~30 MB): MB/s, time per stage and
peak memory, with one worker and with one per core (each run a fresh ``slimjax`` process), against
datasketch's MinHash signatures alone on a sample of the same text, measured in the same run.

Usage: python bench/prepare.py [--workers=0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from minhash import corpus, datasketch_signatures
from table import print_table, write_result


def run_prepare(workers: int, out: str) -> dict:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "slimjax.cli", "prepare", "--source=stdlib", f"--out={out}",
                             f"--workers={workers}"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode:
        raise SystemExit(result.stderr)
    report = json.load(open(os.path.join(out, "report.json")))
    return {"run": f"slimjax prepare, {report['workers']} worker(s)", "mb": report["input_mb"],
            "process_s": wall, "mb_per_s": report["input_mb"] / wall, "stages_s": report["stages_s"],
            "peak_main_mb": report["peak_rss_mb"]["main"], "peak_worker_mb": report["peak_rss_mb"]["largest_worker"],
            "docs_in": report["totals"]["docs_in"], "duplicates": report["totals"]["duplicate_docs"],
            "short": report["totals"]["short_docs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="parallel run's workers (0: one per core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_prepare(1, os.path.join(tmp, "serial")), run_prepare(args.workers, os.path.join(tmp, "parallel"))]
    sample = corpus(1.0)
    t0 = time.perf_counter()
    datasketch_signatures(sample)
    seconds = time.perf_counter() - t0
    mb = sum(len(d.encode()) for d in sample) / 1e6
    rows.append({"run": "datasketch signatures only (1 MB sample)", "mb": mb, "process_s": seconds,
                 "mb_per_s": mb / seconds})
    for r in rows:
        r["x_datasketch"] = r["mb_per_s"] / rows[-1]["mb_per_s"]
    print_table(rows, ["run", "mb", "process_s", "mb_per_s", "x_datasketch", "peak_main_mb", "peak_worker_mb",
                       "docs_in", "short", "duplicates"])
    for r in rows[:2]:
        print(f"{r['run']}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["stages_s"].items()))
    print("wrote", write_result("prepare", {"rows": rows}))


if __name__ == "__main__":
    main()
