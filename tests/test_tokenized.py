"""``slimjax tokenize`` and the ArrayRecord loader: batch-for-batch equality with the in-memory loader
(one process and two real ``jax.distributed`` processes), kill -9 and resume, memory that does
not grow with the corpus, and bad prepared directories through the CLI (one line, exit 2)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import TINY_TRAIN, cli, mixed_corpus, one_line_error
from helpers import child_env, run_processes, snapshot
from slimjax import config as C
from slimjax.cli import main
from slimjax.configs import base
from slimjax.data import loader, pipeline, tokenized
from slimjax.errors import SlimjaxError
from test_fault import DRIVER, FLAGS, fingerprints, kill9_then_resume

WORKER = os.path.join(os.path.dirname(__file__), "data_worker.py")
# The data of tests/data_worker.py: two sources weighted 1:3, bytes, first-fit, 4 shards, batch 8.
BATCH = 8


def corpus_flags(corpus: str) -> list[str]:
    sources = (f"({{'kind': 'text', 'path': '{corpus}/text/*.txt', 'weight': 1.0}}, "
               f"{{'kind': 'jsonl', 'path': '{corpus}/jsonl/*.jsonl.zst', 'weight': 3.0}})")
    return [f"--config.data.sources={sources}", "--config.data.tokenizer_kind=byte", "--config.data.packing=first_fit",
            "--config.data.seq_len=32", "--config.data.shards=4", f"--config.train.global_batch_size={BATCH}"]


def data_config(sources, **kw) -> C.DataConfig:
    c = base.get_config()
    c.data.sources = sources
    c.data.tokenizer_kind, c.data.packing, c.data.seq_len, c.data.shards = "byte", "first_fit", 32, 4
    for key, value in kw.items():
        setattr(c.data, key, value)
    c.train.global_batch_size = BATCH
    return C.validate(c).data


def tokenize(out: str, *flags: str) -> str:
    status = main(["tokenize", *flags, f"--out={out}"])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return mixed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    return tokenize(str(tmp_path_factory.mktemp("p") / "prepared"), *corpus_flags(corpus))


def both(corpus, prepared, workdir, vocab_size=512, **kw):
    """(in-memory, prepared) data of the same corpus, config and seed."""
    docs = ({"kind": "text", "path": f"{corpus}/text/*.txt", "weight": 1.0},
            {"kind": "jsonl", "path": f"{corpus}/jsonl/*.jsonl.zst", "weight": 3.0})
    made = []
    for sources, sub in ((docs, "mem"), (({"kind": "prepared", "path": prepared},), "prep")):
        cfg = data_config(sources, **kw)
        made.append(loader.build(cfg, BATCH, seed=5, max_eval_batches=0, vocab_size=vocab_size,
                                 workdir=os.path.join(workdir, sub)))
    return made


def assert_same_batches(a, b, steps):
    for step in range(steps):
        x, y = a[step], b[step]
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), (step, key)


def test_prepared_rows_are_the_in_memory_loaders_batch_for_batch(corpus, prepared, tmp_path):
    mem, prep = both(corpus, prepared, str(tmp_path))
    assert_same_batches(mem.train, prep.train, 16)
    assert len({mem.train[s]["inputs"].tobytes() for s in range(16)}) == 16
    # Through Grain's prefetching iterator too, and resumed from its state as a checkpoint holds it.
    it_mem, it_prep = pipeline.iterate(mem.train), pipeline.iterate(prep.train)
    for _ in range(3):
        assert_same_batches([next(it_mem)], [next(it_prep)], 1)
    resumed = pipeline.iterate(prep.train, it_prep.get_state())
    assert_same_batches([next(it_mem) for _ in range(3)], [next(resumed) for _ in range(3)], 3)
    assert len(mem.eval) == len(prep.eval) >= 1
    assert_same_batches(list(mem.eval), list(prep.eval), len(mem.eval))
    for key in ("sources", "shards", "eval_documents", "eval_rows"):
        assert mem.stats[key] == prep.stats[key]
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    assert manifest["shards"] == 4 and manifest["tokenizer"]["kind"] == "byte"
    assert [len(s["rows"]) for s in manifest["sources"]] == [4, 4]
    assert sorted(os.listdir(prepared)) == ["eval.array_record", "manifest.json", "train"]


def test_a_trained_sentencepiece_tokenizer_travels_with_the_rows(corpus, tmp_path):
    flags = [*corpus_flags(corpus), "--config.data.tokenizer_kind=sentencepiece", "--config.model.vocab_size=300",
             "--config.data.packing=concat_split"]
    prepared = tokenize(str(tmp_path / "spm"), *flags)
    mem, prep = both(corpus, prepared, str(tmp_path), 300, tokenizer_kind="sentencepiece", packing="concat_split")
    assert_same_batches(mem.train, prep.train, 6)
    model = (tmp_path / "mem" / "tokenizer" / "spm.model").read_bytes()
    assert (tmp_path / "prep" / "tokenizer" / "spm.model").read_bytes() == model  # cached in the run's workdir
    assert open(os.path.join(prepared, "tokenizer", "spm.model"), "rb").read() == model
    # A run that names another tokenizer file is refused before anything is read.
    other = tmp_path / "other.model"
    other.write_bytes(model[:-1] + b"x")
    cfg = data_config(({"kind": "prepared", "path": prepared},), tokenizer_kind="sentencepiece",
                      packing="concat_split", tokenizer=str(other))
    with pytest.raises(SlimjaxError, match=f"data.tokenizer '{other}' is not the tokenizer prepared directory"):
        loader.build(cfg, BATCH, 5, 0, 300, str(tmp_path / "other"))


def test_two_processes_read_their_own_shards_into_the_in_memory_global_batches(corpus, prepared, tmp_path):
    one = tmp_path / "one.json"
    single = subprocess.run([sys.executable, WORKER, "0", "1", "0", corpus, str(one)], env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    run_processes(lambda i, port: [sys.executable, WORKER, str(i), "2", str(port), corpus, str(outs[i]), prepared],
                  2, timeout=300)
    ref = json.loads(one.read_text())  # the in-memory loader, one process
    got = [json.loads(o.read_text()) for o in outs]
    assert [g["processes"] for g in got] == [2, 2] and [g["local_rows"] for g in got] == [4, 4]
    assert len(set(ref["hashes"])) == 6
    assert got[0]["hashes"] == got[1]["hashes"] == ref["hashes"]
    for name, whole in ref["stats"]["sources"].items():  # each process opened only its own shards
        halves = [g["stats"]["sources"][name] for g in got]
        assert all(0 < h["rows"] < whole["rows"] for h in halves)
        assert sum(h["rows"] for h in halves) == whole["rows"]


def test_kill9_then_resume_on_a_prepared_directory_is_bit_identical(tmp_path):
    prepared = tokenize(str(tmp_path / "plays"), *FLAGS)  # the bundled plays, as tests/test_fault.py trains on

    def argv_for(workdir):
        return [sys.executable, DRIVER, "train", *FLAGS, f"--config.data.sources=prepared:{prepared}",
                "--config.train.steps=12", "--config.checkpoint.every_steps=4", f"--workdir={workdir}"]

    straight, killed = kill9_then_resume(argv_for, tmp_path, 12, 4)
    assert fingerprints(killed, 12) == fingerprints(straight, 12)  # params, optimizer, step, RNG bit for bit
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert 4 <= summary["start_step"] < 12 and summary["data"]["prepared"] == prepared


# Peak RSS from VmHWM: ru_maxrss would also count the pytest process this one was forked from (Linux
# carries the pre-exec high-water mark over an exec).
RSS_PROBE = """
import sys
from slimjax import config as C
from slimjax.configs import base
from slimjax.data import loader, pipeline
c = base.get_config()
c.data.sources = ({"kind": "prepared", "path": sys.argv[1]},)
c.data.tokenizer_kind, c.data.seq_len, c.data.shards, c.train.global_batch_size = "byte", 64, 8, 8
data = loader.build(C.validate(c).data, 8, 0, 0, 260, sys.argv[2])
it = pipeline.iterate(data.train)
for _ in range(300):
    next(it)
for batch in data.eval:
    pass
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def words_corpus(root, files: int) -> str:
    """``files`` text files of 25 kB of pseudo-random words (one document each)."""
    rng = np.random.default_rng(1)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnop"), int(n))) for n in rng.integers(2, 9, 2000)])
    os.makedirs(root)
    for i in range(files):
        with open(os.path.join(root, f"{i:04d}.txt"), "w") as f:
            f.write(" ".join(rng.choice(vocab, 4200)))
    return root


def test_loader_memory_does_not_grow_with_the_corpus(tmp_path):
    rss, tokens = {}, {}
    for scale in (1, 10):
        corpus = words_corpus(str(tmp_path / f"c{scale}"), 40 * scale)
        cfg = data_config((f"text:{corpus}",), packing="concat_split", seq_len=64, shards=8)
        manifest = tokenized.write(cfg, BATCH, 260, str(tmp_path / f"p{scale}"))
        tokens[scale] = manifest["tokens"]
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / f"p{scale}"), str(tmp_path / f"w{scale}")],
                               env=child_env(), capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr[-3000:]
        rss[scale] = int(probe.stdout.split()[-1])
    assert tokens[10] > 9 * tokens[1] > 8_000_000
    # Holding the rows (as the in-memory loader does) would cost 12 bytes per token: > 100 MB more
    # at 10x. The prepared loader may grow by at most a fifth of that (reader buffers, noise).
    assert rss[10] - rss[1] < 12 * (tokens[10] - tokens[1]) / 5, (rss, tokens)


def train_on(prepared: str, workdir: str, *extra: str) -> list[str]:
    return ["train", *TINY_TRAIN, f"--config.data.sources=prepared:{prepared}", "--config.data.tokenizer_kind=byte",
            "--config.data.packing=first_fit", "--config.data.shards=4", f"--workdir={workdir}", *extra]


@pytest.mark.parametrize("case, expected", [
    ("no manifest", "is not a prepared directory (no manifest.json); make one with slimjax tokenize"),
    ("seq_len", "was tokenized with data.seq_len=32 but the config says 64; set --config.data.seq_len=32"),
    ("tokenizer", "was tokenized with data.tokenizer_kind=byte but the config says sentencepiece"),
    ("shards", "was tokenized with data shards=4 but the config says 8"),
    ("truncated", "shard-00001.array_record' has "),
    ("mixed", "a 'prepared' source must be the only source"),
])
def test_bad_prepared_directories_are_one_line_errors_and_write_nothing(capsys, prepared, tmp_path, case, expected):
    target, extra = prepared, []
    if case == "no manifest":
        target = str(tmp_path / "copy")
        shutil.copytree(prepared, target)
        os.remove(os.path.join(target, "manifest.json"))
    elif case == "truncated":
        target = str(tmp_path / "copy")
        shutil.copytree(prepared, target)
        shard = os.path.join(target, tokenized.shard_file(1, 1))
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    extra = {"seq_len": ["--config.data.seq_len=64"], "tokenizer": ["--config.data.tokenizer_kind=sentencepiece"],
             "shards": ["--config.data.shards=8"],
             "mixed": [f"--config.data.sources=('prepared:{prepared}', 'shakespeare')"]}.get(case, [])
    before = snapshot(target)
    workdir = str(tmp_path / "run")
    line = one_line_error(cli(capsys, *train_on(target, workdir, *extra)))
    assert expected in line, line
    assert not os.path.exists(workdir) and snapshot(target) == before


def test_tokenize_refuses_an_existing_output_and_leaves_nothing_when_it_fails(capsys, corpus, prepared, tmp_path):
    before = snapshot(prepared)
    line = one_line_error(cli(capsys, "tokenize", *corpus_flags(corpus), f"--out={prepared}"))
    assert f"--out '{prepared}' already exists" in line and snapshot(prepared) == before
    out = str(tmp_path / "too_many_shards")
    line = one_line_error(cli(capsys, "tokenize", *corpus_flags(corpus), "--config.data.shards=512",
                              "--config.train.global_batch_size=512", f"--out={out}"))
    assert "gives no rows of data.seq_len=32 in shard" in line and "lower data.shards" in line
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary directory


needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache-beam is not installed (pip install 'slimjax[beam]')")


@needs_beam
@pytest.mark.parametrize("kind, packing", [("byte", "first_fit"), ("sentencepiece", "concat_split")])
def test_tokenize_on_beam_writes_the_local_runners_bytes(corpus, tmp_path, kind, packing):
    # Two sources in 4 shards; some documents too short (skipped records travel back from the workers),
    # and a SentencePiece model trained by the driver that every worker loads.
    flags = [*corpus_flags(corpus), f"--config.data.tokenizer_kind={kind}", f"--config.data.packing={packing}",
             "--config.model.vocab_size=300", "--config.data.min_doc_chars=120"]
    local = tokenize(str(tmp_path / "local"), *flags)
    beamed = tokenize(str(tmp_path / "beam"), *flags, "--runner=direct", "--beam_options=--direct_num_workers=1")
    assert snapshot(beamed) == snapshot(local)  # every shard file, the tokenizer and the manifest, byte for byte
    manifest = json.load(open(os.path.join(beamed, "manifest.json")))
    assert [len(s["rows"]) for s in manifest["sources"]] == [4, 4] and all(
        r > 0 for s in manifest["sources"] for r in s["rows"])
    assert manifest["skipped"]["shorter than data.min_doc_chars=120"] > 0
    assert sorted(os.listdir(tmp_path)) == ["beam", "local"]  # no temporary directory left behind


@needs_beam
def test_tokenize_runner_mistakes_are_one_line_errors_writing_nothing(capsys, corpus, tmp_path):
    out = str(tmp_path / "out")
    for flags, expected in ((["--runner=dirct"], "unknown --runner 'dirct'; use local or a Beam runner: direct, "),
                            (["--runner=direct", "--beam_options=--no_such_flag=1"],
                             "Beam does not know --beam_options --no_such_flag"),
                            (["--runner=direct", "--beam_options=--direct_num_workers=many"],
                             "Beam rejected --beam_options: argument --direct_num_workers: invalid int value")):
        line = one_line_error(cli(capsys, "tokenize", *corpus_flags(corpus), *flags, f"--out={out}"))
        assert expected in line, line
    # An error inside the pipeline (a shard no rows fall into) arrives as the local runner's line.
    line = one_line_error(cli(capsys, "tokenize", *corpus_flags(corpus), "--config.data.shards=512",
                              "--config.train.global_batch_size=512", "--runner=direct", f"--out={out}"))
    assert "gives no rows of data.seq_len=32 in shard" in line and "lower data.shards" in line
    assert os.listdir(tmp_path) == []


@needs_beam
def test_a_beam_shard_is_packed_in_the_local_order_whatever_order_its_group_arrives_in(corpus, tmp_path):
    from slimjax.data import sources, tokenize_beam, tokenizer

    cfg = data_config(({"kind": "text", "path": f"{corpus}/text/*.txt"},))
    keyed = list(loader.documents(cfg, loader.expand(cfg.sources)[0], "train", lambda key: True, sources.ReadStats()))
    tok = tokenizer.get_tokenizer("byte", "", str(tmp_path), 260, cfg.tokenizer_type, lambda: iter(()))
    local = tokenized.write_shard(cfg, tok, 0, 2, keyed, str(tmp_path / "local"))
    (_, beamed) = tokenize_beam._write_shard(((0, 2), keyed[::-1]), cfg, 260, {"file": None}, str(tmp_path / "beam"))
    assert beamed == local and local["documents"] == len(keyed) > 1
    assert snapshot(str(tmp_path / "beam")) == snapshot(str(tmp_path / "local"))
