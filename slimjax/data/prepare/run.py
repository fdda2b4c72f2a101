"""``slimjax prepare``: the SlimPajama recipe over any sources, writing SlimPajama-layout shards.

Stages: (1) read, NFC, drop short documents, MinHash (parallel over tasks); (2) LSH buckets;
(3) optionally verify candidate pairs by exact Jaccard; (4) clusters by union-find, keeping each
cluster's first document (dedup is global across sources); (5) held-out split and exact-hash
decontamination of train against it; (6) write (parallel). Everything is written under a
temporary directory renamed to ``out`` at the end, so ``out`` is complete or absent.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import shutil
from typing import Any

import numpy as np

from slimjax.config import SourceConfig
from slimjax.data import beam_runner
from slimjax.data.prepare import lsh, minhash, report, stages
from slimjax.data.prepare.report import CONTAMINATED, DROPPED, HELDOUT, TRAIN
from slimjax.errors import SlimjaxError


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Every knob of ``slimjax prepare`` (defaults: SlimPajama's)."""

    sources: tuple[SourceConfig, ...]
    out: str
    threshold: float = 0.8  # Jaccard similarity that makes two documents duplicates
    num_perm: int = 128  # MinHash slots
    ngram: int = 13  # characters per shingle
    bands: int = 0  # LSH bands (0: chosen for the threshold)
    rows: int = 0  # LSH rows per band (0: chosen for the threshold)
    verify: bool = False  # check candidate pairs by exact Jaccard (SlimPajama did not)
    dedup: bool = True  # near-duplicate removal (False: filter, split and decontaminate only)
    min_chars: int = 200  # short-document filter on the normal form
    heldout: float = 0.01  # share of kept documents written to validation/
    seed: int = 0  # seeds the held-out choice
    workers: int = 0  # worker processes (0: one per CPU core; 1: in this process)
    strict: bool = False  # malformed records fail with file:line instead of being counted
    runner: str = "local"  # local (this machine's process pool) or an Apache Beam runner: direct, prism, dataflow, flink, spark
    beam_options: str = ""  # Beam pipeline options passed through unchanged, e.g. '--project=P --region=R'
    cc_rounds: int = 12  # Beam: large-star/small-star rounds unrolled for clustering (fails if the last still changes)

    def check(self) -> None:
        if not self.sources:
            raise SlimjaxError("give at least one --source")
        if not 0.0 < self.threshold <= 1.0:
            raise SlimjaxError(f"--threshold must lie in (0, 1], got {self.threshold}")
        if not 0.0 <= self.heldout < 1.0:
            raise SlimjaxError(f"--heldout must lie in [0, 1), got {self.heldout}")
        if self.num_perm <= 0 or self.ngram <= 0 or self.min_chars < 0 or self.workers < 0:
            raise SlimjaxError("--num_perm and --ngram must be > 0, --min_chars and --workers >= 0")
        beam_runner.check_runner(self.runner)
        if self.cc_rounds <= 0:
            raise SlimjaxError(f"--cc_rounds must be > 0, got {self.cc_rounds}")
        if (self.bands or self.rows) and (self.bands <= 0 or self.rows <= 0 or self.bands * self.rows > self.num_perm):
            raise SlimjaxError(f"--bands={self.bands} x --rows={self.rows} must both be > 0 and fit in "
                               f"--num_perm={self.num_perm}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every runner starts from: the checked options, tasks and LSH split."""

    opts: PrepareOptions
    out: str  # absolute; absent or empty
    tmp: str  # written to, renamed to ``out`` when complete
    wopts: stages.Options
    tasks: list[stages.Task]
    bands: int
    rows: int


def plan(opts: PrepareOptions) -> Plan:
    """Checks the options and the output directory, and cuts the sources into tasks."""
    opts.check()
    out = os.path.abspath(os.path.expanduser(opts.out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SlimjaxError(f"--out '{opts.out}' already exists and is not empty; give a new directory")
    # A slimpajama source is read whole (every set) and as its own kind, so records without a set
    # name take their RedPajama set directory's: the output then names every record's set.
    wopts = stages.Options(opts.sources, opts.min_chars, opts.ngram, opts.num_perm, opts.strict)
    bands, rows = (opts.bands, opts.rows) if opts.bands else lsh.choose_bands(opts.threshold, opts.num_perm)
    tasks = stages.make_tasks(opts.sources)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return Plan(opts, out, f"{out}.tmp-{os.getpid()}", wopts, tasks, bands, rows)


def empty_corpus(opts: PrepareOptions) -> SlimjaxError:
    return SlimjaxError("the corpus is empty after filtering: no document has "
                        f"{opts.min_chars} characters or more (--min_chars) in "
                        f"{', '.join(s.name for s in opts.sources)}")


def publish(tmp: str, out: str, result: dict[str, Any]) -> dict[str, Any]:
    """Writes ``report.json`` into the complete ``tmp`` and renames it to ``out``."""
    try:
        report.write_json(os.path.join(tmp, "report.json"), result)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked by plan)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def prepare(opts: PrepareOptions) -> dict[str, Any]:
    """Runs the whole recipe; returns the report (also written to ``out/report.json``)."""
    timer = report.Timer()
    with timer("plan"):
        p = plan(opts)
    if opts.runner != "local":
        from slimjax.data.prepare import beam

        return beam.prepare(p, timer)
    tasks, wopts, bands, rows, tmp = p.tasks, p.wopts, p.bands, p.rows, p.tmp
    with timer("start workers"):
        pool = _pool(opts.workers)
    with pool:
        try:
            with timer("read, filter, minhash"):
                scans = sorted(pool.imap_unordered(functools.partial(stages.scan, opts=wopts), tasks),
                               key=lambda s: s.task)
            corpus = _Corpus.gather(scans)
            if not len(corpus.keys):
                raise empty_corpus(opts)
            with timer("lsh"):
                groups = lsh.buckets(lsh.band_keys(corpus.signatures, bands, rows)) if opts.dedup else []
            verified = None
            if opts.verify and groups:
                with timer("verify"):
                    edges, verified = _verify(pool, tasks, wopts, corpus, lsh.candidate_pairs(groups),
                                              opts.threshold)
            else:
                edges = lsh.star_edges(groups)
            with timer("clusters"):
                uf = lsh.UnionFind(len(corpus.keys))
                uf.union_pairs(edges)
                roots = uf.roots()
            with timer("split, decontaminate"):
                split = _split(corpus, roots, opts.heldout, opts.seed)
            with timer("write"):
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                decisions = corpus.decisions(split, tasks)
                written = list(pool.imap_unordered(_write_task, [(t, wopts, decisions[t.index], tmp) for t in tasks]))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # After the pool has exited, so the workers' peak memory is counted.
    tally = report.tally(scans, corpus.labels, corpus.label_names, corpus.nbytes, split, roots)
    result = report.build(tally, timer, opts, (bands, rows), verified, sum(len(w) for w in written),
                          opts.workers or os.cpu_count(), runner="local")
    return publish(tmp, p.out, result)


@dataclasses.dataclass
class _Corpus:
    """Everything stage 1 kept, concatenated in task order (document id = row)."""

    keys: np.ndarray
    task_of: np.ndarray
    labels: np.ndarray  # label index per document
    label_names: list[str]
    nbytes: np.ndarray
    exact: np.ndarray
    signatures: np.ndarray

    @classmethod
    def gather(cls, scans: list[stages.Scan]) -> _Corpus:
        names = sorted({label for s in scans for label in s.labels} | {k for s in scans for k in s.short})
        index = {n: i for i, n in enumerate(names)}
        return cls(
            keys=np.concatenate([s.keys for s in scans]),
            task_of=np.concatenate([np.full(len(s.keys), s.task) for s in scans]),
            labels=np.asarray([index[label] for s in scans for label in s.labels], np.int64),
            label_names=names,
            nbytes=np.concatenate([s.nbytes for s in scans]),
            exact=np.concatenate([s.exact for s in scans]),
            signatures=np.concatenate([s.signatures for s in scans]),
        )

    def decisions(self, split: np.ndarray, tasks: list[stages.Task]) -> list[dict[tuple[int, int], str]]:
        """Per task: key -> "train" / "validation" for every document to write."""
        out: list[dict[tuple[int, int], str]] = [{} for _ in tasks]
        # Only train and held-out documents: duplicates and contaminated train documents are dropped.
        for doc in np.flatnonzero((split == TRAIN) | (split == HELDOUT)):
            out[self.task_of[doc]][tuple(self.keys[doc].tolist())] = "train" if split[doc] == TRAIN else "validation"
        return out


def _split(corpus: _Corpus, roots: np.ndarray, heldout: float, seed: int) -> np.ndarray:
    """Outcome per document: duplicates dropped, a seeded ``heldout`` share of the rest held out,
    and train documents whose exact hash matches a held-out document removed."""
    n = len(roots)
    kept = roots == np.arange(n)
    out = np.where(kept, np.where(stages.heldout_draw(np.arange(n), seed) < heldout, HELDOUT, TRAIN), DROPPED)
    held = {bytes(h) for h in corpus.exact[out == HELDOUT]}
    contaminated = (out == TRAIN) & np.asarray([bytes(h) in held for h in corpus.exact], bool)
    out[contaminated] = CONTAMINATED
    return out


def _verify(pool, tasks: list[stages.Task], wopts: stages.Options, corpus: _Corpus, pairs: np.ndarray,
            threshold: float) -> tuple[np.ndarray, dict[str, int]]:
    """Keeps the candidate pairs whose exact Jaccard reaches the threshold."""
    docs = np.unique(pairs)
    wanted: list[set[tuple[int, int]]] = [set() for _ in tasks]
    for d in docs:
        wanted[corpus.task_of[d]].add(tuple(corpus.keys[d].tolist()))
    jobs = [(t, wopts, wanted[t.index]) for t in tasks if wanted[t.index]]
    sets: dict[tuple[int, tuple[int, int]], np.ndarray] = {}
    for task_index, found in pool.imap_unordered(_shingle_task, jobs):
        sets.update({(task_index, k): v for k, v in found.items()})

    def shingles(d: int) -> np.ndarray:
        return sets[(int(corpus.task_of[d]), tuple(corpus.keys[d].tolist()))]

    keep = np.asarray([minhash.jaccard(shingles(a), shingles(b)) >= threshold for a, b in pairs.tolist()], bool)
    return pairs[keep], {"candidate_pairs": len(pairs), "verified_pairs": int(keep.sum())}


def _shingle_task(job) -> tuple[int, dict]:
    task, wopts, wanted = job
    return task.index, stages.shingle_sets(task, wopts, wanted)


def _write_task(job) -> dict[str, int]:
    return stages.write(*job)


class _Inline:
    """A pool of one: the work runs in this process (``--workers=1``, and tests)."""

    def imap_unordered(self, fn, items):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return _Inline()
    # forkserver: workers fork from a clean server process that imported the stages module once.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload(["slimjax.data.prepare.stages"])
    return ctx.Pool(workers)
