"""``slimjax prepare --runner=direct|prism|dataflow|flink|spark``: the recipe on Apache Beam.

The same pure stage functions as the local pool (``stages``, ``lsh``, ``components``), each
stage a Beam transform:

1. one element per task (a file, or a group of small files): ``stages.scan`` reads, NFC-normalises,
   filters and MinHashes it; documents get the local pool's ids (task order, then read order) from
   per-task counts, so every later choice is the same;
2. band keys: one ``((band, key), id)`` per document and band, grouped into buckets;
3. edges: a star per bucket, or with ``--verify`` the candidate pairs kept by exact Jaccard (the
   shingle sets are re-read from the tasks that hold the candidates, joined to the pairs by id);
4. clusters: ``cc_rounds`` large-star/small-star rounds unrolled in the graph (Beam has no
   data-dependent loop). Every component is left a star around its smallest id, the document
   union-find keeps. A last comparison counts the edges the final round still changed; the run
   fails, writing nothing, unless that count is zero;
5. outcomes: a document with a root is a duplicate; the rest draw the held-out split from their
   id; a CoGroupByKey on the exact hash marks train documents whose text is held out;
6. ``stages.write`` per task writes its kept documents in the SlimPajama layout.

The counts the report needs travel back as one small tally. Everything is written under the
temporary directory the local runner uses, renamed to ``--out`` only after the pipeline
succeeded. Input and output paths must be visible to every worker (on Dataflow: a shared
filesystem mounted on the workers).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Iterator

import numpy as np

from slimjax.data import beam_runner
from slimjax.data.prepare import components, lsh, minhash, report, stages
from slimjax.data.prepare.report import CONTAMINATED, DROPPED, HELDOUT, TRAIN
from slimjax.data.prepare.run import Plan, empty_corpus, publish
from slimjax.errors import SlimjaxError

_OUTCOME_NAMES = {code: name for name, code in report.OUTCOMES}


def prepare(plan: Plan, timer: report.Timer) -> dict[str, Any]:
    """Runs the recipe as a Beam pipeline; returns the report, as ``run.prepare`` does."""
    opts = plan.opts
    options = beam_runner.pipeline_options(opts.runner, opts.beam_options)
    shutil.rmtree(plan.tmp, ignore_errors=True)
    os.makedirs(plan.tmp)
    try:
        with timer("beam pipeline"):
            beam_runner.run(opts.runner, options, lambda pipeline: _build(pipeline, plan))
        tally, verified, files_written, unsettled = _tally(beam_runner.gathered(plan.tmp))
        if not tally.docs or all(outcome == "short" for _, outcome in tally.docs):
            raise empty_corpus(opts)
        if unsettled:
            raise SlimjaxError(f"clustering did not converge in --cc_rounds={opts.cc_rounds} rounds ({unsettled} "
                               "edges still moving); raise --cc_rounds")
    except BaseException:
        shutil.rmtree(plan.tmp, ignore_errors=True)
        raise
    result = report.build(tally, timer, opts, (plan.bands, plan.rows), verified, files_written, 0, opts.runner)
    return publish(plan.tmp, plan.out, result)


# --- the pipeline -------------------------------------------------------------------------------

def _build(p, plan: Plan) -> None:
    beam = beam_runner.beam()
    from apache_beam.pvalue import AsSingleton

    opts, wopts = plan.opts, plan.wopts
    scans = (p | "tasks" >> beam.Create(plan.tasks) | "spread" >> beam.Reshuffle()
             | "read, filter, minhash" >> beam.Map(stages.scan, opts=wopts))
    offsets = AsSingleton(scans | "count" >> beam.Map(lambda s: (s.task, len(s.keys)))
                          | "counts" >> beam.combiners.ToDict() | "offsets" >> beam.Map(_offsets))
    # doc = (id, task, key, label, nbytes, exact hash)
    docs = scans | "documents" >> beam.FlatMap(_documents, offsets=offsets)
    verified = None
    if opts.dedup:
        buckets = (scans | "band keys" >> beam.FlatMap(_band_entries, offsets=offsets, bands=plan.bands, rows=plan.rows)
                   | "buckets" >> beam.GroupByKey() | "bucket ids" >> beam.FlatMap(_bucket))
        if opts.verify:
            pairs = (buckets | "candidates" >> beam.FlatMap(lambda g: map(tuple, lsh.candidate_pairs([g]).tolist()))
                     | "distinct candidates" >> beam.Distinct())
            edges = _verify(pairs, docs, plan)
            verified = {"candidate_pairs": _count(pairs, "candidate"), "verified_pairs": _count(edges, "verified")}
        else:
            edges = buckets | "stars" >> beam.FlatMap(lambda g: map(tuple, lsh.star_edges([g]).tolist()))
        roots, unsettled = _components(edges, opts.cc_rounds)
    else:
        roots = p | "no edges" >> beam.Create([])
        unsettled = p | "nothing to settle" >> beam.Create([0])
    outcomes = _outcomes(docs, roots, opts.heldout, opts.seed)
    written = (outcomes | "to write" >> beam.FlatMap(_decision) | "per task" >> beam.GroupByKey()
               | "write" >> beam.Map(_write, tasks=plan.tasks, wopts=wopts, root=plan.tmp))
    parts = {
        "docs": outcomes | "outcome sizes" >> beam.Map(lambda d: ((d[0][3], _OUTCOME_NAMES[d[1]]), (1, d[0][4])))
        | "sum outcomes" >> beam.CombinePerKey(_sum_pairs) | "outcome list" >> beam.combiners.ToList(),
        "scans": scans | "scan summaries" >> beam.Map(_scan_summary) | "scan list" >> beam.combiners.ToList(),
        "clusters": roots | "members" >> beam.Map(lambda e: (e[1], 1)) | "cluster sizes" >> beam.CombinePerKey(sum)
        | "size" >> beam.Map(lambda kv: kv[1] + 1) | "histogram" >> beam.combiners.Count.PerElement()
        | "histogram list" >> beam.combiners.ToList(),
        "files": written | "files" >> beam.Map(len) | "sum files" >> beam.CombineGlobally(sum),
        "unsettled": unsettled | "sum unsettled" >> beam.CombineGlobally(sum),
    }
    if verified is None:
        parts["verified"] = p | "unverified" >> beam.Create([None])
    else:
        parts["verified"] = (p | "verification" >> beam.Create([None])
                             | "verification counts" >> beam.Map(lambda _, c, v: {"candidate_pairs": c,
                                                                                   "verified_pairs": v},
                                                                 AsSingleton(verified["candidate_pairs"]),
                                                                 AsSingleton(verified["verified_pairs"])))
    beam_runner.gather(p, plan.tmp, **parts)


def _count(pcoll, name: str):
    beam = beam_runner.beam()
    return pcoll | f"count {name}" >> beam.combiners.Count.Globally()


def _offsets(counts: dict[int, int]) -> dict[int, int]:
    """First document id of every task: ids run in task order, as in the local pool."""
    out, total = {}, 0
    for task in sorted(counts):
        out[task] = total
        total += counts[task]
    return out


def _documents(scan: stages.Scan, offsets: dict[int, int]) -> Iterator[tuple]:
    base = offsets[scan.task]
    for i, (key, label, nbytes, exact) in enumerate(zip(scan.keys.tolist(), scan.labels, scan.nbytes.tolist(),
                                                        scan.exact)):
        yield base + i, scan.task, tuple(key), label, nbytes, bytes(exact)


def _band_entries(scan: stages.Scan, offsets: dict[int, int], bands: int, rows: int) -> Iterator[tuple]:
    """``((band, band key), document id)`` for every document and band: the LSH shuffle's key."""
    keys = lsh.band_keys(scan.signatures, bands, rows)
    base = offsets[scan.task]
    for i, row in enumerate(keys.tolist()):
        for b, k in enumerate(row):
            yield (b, k), base + i


def _bucket(kv) -> Iterator[np.ndarray]:
    """A bucket's ids in ascending order, if it holds two or more (``lsh.buckets``' groups)."""
    ids = np.sort(np.fromiter(kv[1], np.int64))
    if len(ids) > 1:
        yield ids


def _verify(pairs, docs, plan: Plan):
    """Candidate pairs whose exact Jaccard reaches the threshold: the shingle sets are re-read from
    the tasks holding the candidates, then joined to each pair by id, one side after the other."""
    beam = beam_runner.beam()
    ends = pairs | "pair ends" >> beam.FlatMap(lambda e: [(e[0], e), (e[1], e)])
    by_id = docs | "doc by id" >> beam.Map(lambda d: (d[0], (d[1], d[2])))
    wanted = (({"end": ends, "doc": by_id}) | "candidate docs" >> beam.CoGroupByKey()
              | "wanted" >> beam.FlatMap(lambda kv: [(kv[1]["doc"][0][0], (kv[0], kv[1]["doc"][0][1]))]
                                         if kv[1]["end"] else []))
    shingles = (wanted | "wanted per task" >> beam.GroupByKey()
                | "shingle sets" >> beam.FlatMap(_shingle_sets, tasks=plan.tasks, wopts=plan.wopts))
    first = (({"pair": pairs | "by first" >> beam.Map(lambda e: (e[0], e)), "set": shingles})
             | "join first" >> beam.CoGroupByKey()
             | "first set" >> beam.FlatMap(lambda kv: [(e[1], (e, kv[1]["set"][0])) for e in kv[1]["pair"]]))
    threshold = plan.opts.threshold
    return (({"half": first, "set": shingles}) | "join second" >> beam.CoGroupByKey()
            | "exact jaccard" >> beam.FlatMap(
                lambda kv: [e for e, a in kv[1]["half"] if minhash.jaccard(a, kv[1]["set"][0]) >= threshold]))


def _shingle_sets(kv, tasks: list[stages.Task], wopts: stages.Options) -> Iterator[tuple[int, np.ndarray]]:
    task, wanted = kv
    id_of = {key: doc_id for doc_id, key in wanted}
    for key, found in stages.shingle_sets(tasks[task], wopts, set(id_of)).items():
        yield id_of[key], found


def _components(edges, rounds: int):
    """``(child, root)`` for every non-root document, and the count of edges the last round moved."""
    beam = beam_runner.beam()
    edges = (edges | "normalise" >> beam.FlatMap(lambda e: components.normalise([e]))
             | "distinct edges" >> beam.Distinct())
    previous = edges
    for r in range(rounds):
        large = (previous | f"round {r}: both ways" >> beam.FlatMap(components.both_ways)
                 | f"round {r}: by node" >> beam.GroupByKey()
                 | f"round {r}: large-star" >> beam.FlatMapTuple(components.large_star)
                 | f"round {r}: distinct large" >> beam.Distinct())
        small = (large | f"round {r}: by child" >> beam.GroupByKey()
                 | f"round {r}: small-star" >> beam.FlatMapTuple(components.small_star)
                 | f"round {r}: distinct small" >> beam.Distinct())
        if r < rounds - 1:
            previous = small
    moved = (({"before": previous | "before" >> beam.Map(lambda e: (e, None)),
               "after": small | "after" >> beam.Map(lambda e: (e, None))})
             | "compare last round" >> beam.CoGroupByKey()
             | "moved" >> beam.Map(lambda kv: int(not (kv[1]["before"] and kv[1]["after"])))
             | "sum moved" >> beam.CombineGlobally(sum))
    return small, moved


def _outcomes(docs, roots, heldout: float, seed: int):
    """``(doc, outcome)`` for every document: the local pool's ``_split``, as two joins."""
    beam = beam_runner.beam()
    joined = (({"doc": docs | "key by id" >> beam.Map(lambda d: (d[0], d)), "root": roots})
              | "join roots" >> beam.CoGroupByKey())
    split = joined | "duplicates" >> beam.FlatMap(_drop_or_keep, heldout=heldout, seed=seed
                                                  ).with_outputs("dropped", main="kept")
    dropped, kept = split.dropped, split.kept
    resolved = kept | "by exact hash" >> beam.GroupByKey() | "decontaminate" >> beam.FlatMap(_decontaminate)
    return (dropped, resolved) | "all outcomes" >> beam.Flatten()


def _drop_or_keep(kv, heldout: float, seed: int):
    from apache_beam import pvalue

    (doc,), root = kv[1]["doc"], kv[1]["root"]
    if root:
        yield pvalue.TaggedOutput("dropped", (doc, DROPPED))
        return
    outcome = HELDOUT if stages.heldout_draw(np.array([doc[0]]), seed)[0] < heldout else TRAIN
    yield doc[5], (doc, outcome)


def _decontaminate(kv) -> Iterator[tuple]:
    group = list(kv[1])
    held = any(outcome == HELDOUT for _, outcome in group)
    for doc, outcome in group:
        yield doc, CONTAMINATED if held and outcome == TRAIN else outcome


def _decision(item) -> Iterator[tuple]:
    doc, outcome = item
    if outcome in (TRAIN, HELDOUT):
        yield doc[1], (doc[2], "train" if outcome == TRAIN else "validation")


def _write(kv, tasks: list[stages.Task], wopts: stages.Options, root: str) -> dict[str, int]:
    task, decisions = kv
    return stages.write(tasks[task], wopts, dict(decisions), root)


def _scan_summary(scan: stages.Scan) -> stages.Scan:
    """What the report needs of a scan: its counts, without the per-document arrays."""
    return dataclasses.replace(scan, keys=scan.keys[:0], labels=[], nbytes=scan.nbytes[:0], exact=scan.exact[:0],
                               signatures=scan.signatures[:0])


def _sum_pairs(pairs) -> tuple[int, int]:
    docs = nbytes = 0
    for d, b in pairs:
        docs += d
        nbytes += b
    return docs, nbytes


def _tally(parts: dict[str, Any]) -> tuple[report.Tally, dict[str, int] | None, int, int]:
    """The pipeline's tally parts -> (report tally, verification counts, files written, edges still moving)."""
    tally = report.Tally.from_scans(sorted(parts["scans"], key=lambda s: s.task))
    for key, (docs, nbytes) in parts["docs"]:
        tally.docs[key] = [docs, nbytes]
    tally.cluster_sizes = dict(parts["clusters"])
    tally.largest = max(tally.cluster_sizes, default=1)
    verified = parts["verified"] if parts["verified"] and parts["verified"]["candidate_pairs"] else None
    return tally, verified, parts["files"], parts["unsettled"]
