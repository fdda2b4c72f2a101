"""`slimjax prepare` on Apache Beam (DirectRunner) against the local pool: the same kept documents,
files, clusters and report counts on planted-duplicate corpora split across many files; the
large-star/small-star clustering against union-find on adversarial graphs, in plain Python and in
Beam; and runner mistakes that fail in one line leaving nothing."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from data_helpers import cli, one_line_error
from test_prepare import mixed, read_out, specs  # noqa: F401  (mixed is a fixture)
from test_prepare_dedup import exact_jaccard, mutate, random_doc
from slimjax.config import parse_source
from slimjax.data.prepare import PrepareOptions, components, lsh, prepare

# The Beam tests need the beam extra (in .[test]); the clustering and import tests run without it.
needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache-beam is not installed (pip install 'slimjax[beam]')")

# Everything a report says about the data (not about time, memory or the runner).
COUNTS = ("sources", "totals", "clusters", "lsh", "verification", "skipped_records", "first_skipped",
          "files_written", "tasks")


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory):
    """12 JSON Lines files: 40 near-duplicate pairs (J >= 0.85), 15 pairs around J = 0.7, 20 pairs
    at J <= 0.6, a cluster of five variants of one document and 3 exact copies, the members of each
    spread over files."""
    rng = np.random.default_rng(11)
    docs, pairs = [], []
    for m in [*rng.integers(0, 10, 40), *rng.integers(20, 28, 15), *rng.integers(28, 70, 20)]:
        base = random_doc(rng)
        variant = mutate(rng, base, int(m))
        pairs.append((len(docs), len(docs) + 1, exact_jaccard(base, variant)))
        docs += [base, variant]
    base = random_doc(rng)
    docs += [mutate(rng, base, 2) for _ in range(5)] + [base] * 3 + [random_doc(rng) for _ in range(30)]
    root = tmp_path_factory.mktemp("planted_files")
    order = rng.permutation(len(docs))
    for f, ids in enumerate(np.array_split(order, 12)):
        lines = [json.dumps({"text": docs[i], "meta": {"redpajama_set_name": ["A", "B"][f % 2], "id": int(i)}})
                 for i in ids]
        (root / f"part{f:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            ("\n".join(lines) + "\n").encode()))
    return str(root), pairs


def both(sources, tmp_path, **kw):
    """(local report, Beam report) of the same run, after checking the outputs are byte for byte the same."""
    local = prepare(PrepareOptions(sources=sources, out=str(tmp_path / "local"), workers=1, **kw))
    beamed = prepare(PrepareOptions(sources=sources, out=str(tmp_path / "beam"), runner="direct", **kw))
    assert read_out(tmp_path / "local") == read_out(tmp_path / "beam")
    assert sorted(os.listdir(tmp_path / "beam")) == sorted(os.listdir(tmp_path / "local"))
    assert {k: local[k] for k in COUNTS} == {k: beamed[k] for k in COUNTS}
    assert beamed["runner"] == "direct" and json.load(open(tmp_path / "beam" / "report.json"))["totals"] == \
        beamed["totals"]
    return local, beamed


@needs_beam
def test_beam_keeps_exactly_what_the_local_pool_keeps_with_verification(planted_files, tmp_path):
    path, pairs = planted_files
    local, beamed = both((parse_source("s", f"jsonl:{path}/*.zst"),), tmp_path, threshold=0.7, verify=True,
                         heldout=0.2, cc_rounds=4)
    assert beamed["tasks"] == 12 and beamed["verification"]["verified_pairs"] < beamed["verification"]["candidate_pairs"]
    # The planted clusters were found: the 5 variants and 3 copies of one document are one cluster.
    assert beamed["clusters"]["largest"] == 8 and beamed["totals"]["duplicate_docs"] >= 40 + 7
    assert beamed["totals"]["heldout_docs"] > 0


@needs_beam
def test_beam_matches_the_local_pool_unverified_and_on_mixed_sources(planted_files, mixed, tmp_path):  # noqa: F811
    path, _ = planted_files
    both((parse_source("s", f"jsonl:{path}/*.zst"),), tmp_path / "planted", heldout=0.1, seed=3, cc_rounds=3)
    _, beamed = both(specs(mixed), tmp_path / "mixed", heldout=0.2, cc_rounds=3)
    assert beamed["skipped_records"] == {"malformed JSON": 1} and beamed["clusters"]["size_histogram"] == {"2": 5}


@needs_beam
def test_beam_decontaminates_like_the_local_pool_without_dedup(planted_files, tmp_path):
    path, _ = planted_files
    _, beamed = both((parse_source("s", f"jsonl:{path}/*.zst"),), tmp_path, dedup=False, heldout=0.5, seed=1)
    assert beamed["totals"]["duplicate_docs"] == 0 and beamed["totals"]["contaminated_docs"] > 0


def union_find_roots(pairs):
    """{node: root} of every non-root node, by the local pool's union-find."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    n = int(pairs.max()) + 1 if len(pairs) else 0
    uf = lsh.UnionFind(n)
    uf.union_pairs(pairs)
    roots = uf.roots()
    return {i: int(r) for i, r in enumerate(roots.tolist()) if r != i}


def adversarial_graphs():
    rng = np.random.default_rng(5)
    chain = rng.permutation(250)
    yield "ordered chain", [(i, i + 1) for i in range(299)]
    yield "shuffled chain", list(zip(chain[:-1].tolist(), chain[1:].tolist()))
    yield "star on a middle node", [(120, i) for i in range(240) if i != 120]
    yield "many small components", [(3 * i, 3 * i + 1 + (i % 2)) for i in range(300)]
    yield "two interleaved chains", [(i, i + 2) for i in range(400)]
    for seed in range(4):
        g = np.random.default_rng(seed)
        n = int(g.integers(50, 600))
        yield f"random {seed}", [tuple(e) for e in g.integers(0, n, (int(g.integers(n // 2, 2 * n)), 2)).tolist()]


@pytest.mark.parametrize("name,pairs", list(adversarial_graphs()), ids=[n for n, _ in adversarial_graphs()])
def test_large_star_small_star_equals_union_find(name, pairs):
    roots, rounds = components.connected_components(pairs)
    assert roots == union_find_roots(pairs)
    assert rounds <= 2 * int(np.ceil(np.log2(len(pairs) + 2))) + 2  # logarithmic in practice


@needs_beam
def test_beam_clustering_equals_union_find_and_reports_unsettled_rounds():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from slimjax.data.prepare.beam import _components

    chain = np.random.default_rng(2).permutation(200).tolist()
    pairs = list(zip(chain[:-1], chain[1:])) + [(500, 501), (502, 501), (700, 700)]
    expected = sorted(union_find_roots(pairs).items())
    with beam.Pipeline() as p:
        edges = p | beam.Create(pairs)
        roots, moved = _components(edges, rounds=10)
        assert_that(roots, equal_to(expected), label="roots")
        assert_that(moved, equal_to([0]), label="settled")
    with beam.Pipeline() as p:
        _, moved = _components(p | beam.Create(pairs), rounds=2)
        assert_that(moved | beam.Map(lambda m: m > 0), equal_to([True]))


@needs_beam
def test_runner_mistakes_fail_in_one_line_leaving_nothing(mixed, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    src = [f"--source=text:{mixed}/txt/*.txt", f"--out={out}"]
    assert "unknown --runner 'dirct'; use local or a Beam runner: direct, prism, dataflow" in one_line_error(
        cli(capsys, "prepare", *src, "--runner=dirct"))
    assert "Beam does not know --beam_options --no_such_flag" in one_line_error(
        cli(capsys, "prepare", *src, "--runner=direct", "--beam_options=--no_such_flag=1"))
    assert "Beam rejected --beam_options: argument --direct_num_workers: invalid int value: 'many'" in \
        one_line_error(cli(capsys, "prepare", *src, "--runner=direct", "--beam_options=--direct_num_workers=many"))
    assert "give the runner as --runner" in one_line_error(
        cli(capsys, "prepare", *src, "--runner=direct", "--beam_options=--runner=DataflowRunner"))
    dataflow = one_line_error(cli(capsys, "prepare", *src, "--runner=dataflow"))
    assert "--runner=dataflow" in dataflow and ("project" in dataflow or "not usable here" in dataflow)
    assert "did not converge in --cc_rounds=1 rounds" in one_line_error(
        cli(capsys, "prepare", f"--source=jsonl:{mixed}/jsonl/**/*.zst", f"--source=text:{mixed}/txt/*.txt",
            f"--out={out}", "--runner=direct", "--cc_rounds=1", "--threshold=0.05", "--min_chars=10"))
    # A stage's own error, raised inside the pipeline, arrives as that one line too.
    assert "example_train_0.jsonl.zst:47: malformed JSON" in one_line_error(
        cli(capsys, "prepare", f"--source=jsonl:{mixed}/jsonl/**/*.zst", f"--out={out}", "--runner=direct",
            "--strict"))
    assert not out.exists() and not glob.glob(f"{out}.tmp-*")


def test_slimjax_needs_beam_only_for_a_beam_runner(mixed, tmp_path):  # noqa: F811
    """Without apache_beam importable, slimjax imports and runs locally; a Beam runner says what to install."""
    code = f"""
import sys
sys.modules["apache_beam"] = None  # as if it were not installed
from slimjax.cli import main
import slimjax.data.prepare
assert main(["prepare", "--source=text:{mixed}/txt/*.txt", "--out={tmp_path}/local", "--workers=1"]) == 0
sys.exit(main(["prepare", "--source=text:{mixed}/txt/*.txt", "--out={tmp_path}/beam", "--runner=direct"]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install 'slimjax[beam]'" in result.stderr.strip().splitlines()[-1]
    assert os.path.exists(tmp_path / "local" / "report.json") and not os.path.exists(tmp_path / "beam")
