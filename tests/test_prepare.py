"""`slimjax prepare` end to end: SlimPajama layout, report, parallel = serial, decontamination,
and bad input that fails in one line without leaving a partial output."""

import glob
import json
import os

import numpy as np
import pytest
import zstandard

from data_helpers import cli, one_line_error
from slimjax import config as C
from slimjax.configs import base
from slimjax.config import parse_source
from slimjax.data import loader, sources, text
from slimjax.data.prepare import PrepareOptions, prepare

LOREM = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex the jovial kangaroos"


def words(rng, n):
    vocab = LOREM.split() + [f"w{i}" for i in range(200)]
    return " ".join(rng.choice(vocab, n))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Text files and a zstd JSON Lines file with planted exact/near duplicates and short documents."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(3)
    (root / "txt").mkdir()
    bodies = [words(rng, 120) for _ in range(30)]
    for i, body in enumerate(bodies):
        (root / "txt" / f"{i:02d}.txt").write_text(body + "\n")
    (root / "txt" / "short.txt").write_text("Too short, by far!\n")
    lines = []
    for i in range(40):
        lines.append({"text": words(rng, 150), "meta": {"redpajama_set_name": "RedPajamaC4"}})
    for i in range(5):  # copies of text files, differing only in case and punctuation: same normal form
        lines.append({"text": bodies[i].upper() + "!!!", "meta": {"redpajama_set_name": "RedPajamaC4"}})
    lines.append({"text": "tiny", "meta": {"redpajama_set_name": "RedPajamaC4"}})
    data = "".join(json.dumps(line) + "\n" for line in lines) + "{broken json\n"
    path = root / "jsonl" / "train" / "chunk1" / "example_train_0.jsonl.zst"
    path.parent.mkdir(parents=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(data.encode()))
    return root


def specs(root):
    return (parse_source("s", f"text:{root}/txt/*.txt"), parse_source("s", f"jsonl:{root}/jsonl/**/*.zst"))


def read_out(out):
    """{relative path: list of records} of every output shard."""
    found = {}
    for f in sorted(glob.glob(f"{out}/**/*.jsonl.zst", recursive=True)):
        with open(f, "rb") as fh:
            data = zstandard.ZstdDecompressor().stream_reader(fh).read().decode()
        found[os.path.relpath(f, out)] = [json.loads(line) for line in data.splitlines()]
    return found


def test_prepare_writes_the_slimpajama_layout_and_reports_what_it_removed(mixed, tmp_path):
    out = str(tmp_path / "out")
    report = prepare(PrepareOptions(sources=specs(mixed), out=out, heldout=0.2, workers=1))
    files = read_out(out)
    assert files and all(p.startswith(("train/chunk", "validation/chunk")) for p in files)
    assert any(p.startswith("validation/") for p in files)
    for path in files:
        assert os.path.basename(path).startswith("example_train_" if path.startswith("train") else "example_holdout_")
    records = [r for rs in files.values() for r in rs]
    assert all(set(r) == {"text", "meta"} and r["meta"]["redpajama_set_name"] for r in records)
    t, c4 = report["sources"]["text"], report["sources"]["RedPajamaC4"]
    assert (t["docs_in"], t["short_docs"], c4["docs_in"], c4["short_docs"]) == (31, 1, 46, 1)
    # The five upper-cased copies are removed as duplicates (the text files come first and are kept).
    assert c4["duplicate_docs"] == 5 and t["duplicate_docs"] == 0
    assert report["clusters"]["size_histogram"] == {"2": 5}
    assert len(records) == report["totals"]["train_docs"] + report["totals"]["heldout_docs"] == 31 + 46 - 2 - 5
    assert report["skipped_records"] == {"malformed JSON": 1}
    assert set(report["stages_s"]) >= {"read, filter, minhash", "lsh", "clusters", "write"}
    assert json.load(open(os.path.join(out, "report.json")))["totals"] == report["totals"]
    assert not glob.glob(f"{out}/**/*.tmp-*", recursive=True) and not glob.glob(f"{out}.tmp-*")
    # The output is a training source: the loader reads it back.
    c = base.get_config()
    c.data.sources = ({"kind": "jsonl", "path": f"{out}/train/**/*.zst", "eval_path": f"{out}/validation/**/*.zst"},)
    cfg = C.validate(c).data
    train = list(loader.documents(cfg, cfg.sources[0], "train", lambda key: True, sources.ReadStats()))
    assert len(train) == report["totals"]["train_docs"]


def test_two_workers_write_exactly_what_one_writes(mixed, tmp_path):
    one = prepare(PrepareOptions(sources=specs(mixed), out=str(tmp_path / "one"), workers=1))
    two = prepare(PrepareOptions(sources=specs(mixed), out=str(tmp_path / "two"), workers=2))
    assert read_out(tmp_path / "one") == read_out(tmp_path / "two")
    assert one["sources"] == two["sources"] and two["workers"] == 2


def test_exact_hash_decontamination_without_dedup(mixed, tmp_path):
    out = str(tmp_path / "out")
    report = prepare(PrepareOptions(sources=specs(mixed), out=out, dedup=False, heldout=0.5, seed=1, workers=1))
    assert report["totals"]["duplicate_docs"] == 0 and report["totals"]["contaminated_docs"] > 0
    files = read_out(out)
    held = {text.exact_hash(text.normal_form(r["text"])) for p, rs in files.items() if p.startswith("validation")
            for r in rs}
    train = [text.exact_hash(text.normal_form(r["text"])) for p, rs in files.items() if p.startswith("train")
             for r in rs]
    assert train and not held & set(train)
    # Contaminated train documents are dropped, not moved into validation/.
    assert sum(map(len, files.values())) == report["totals"]["train_docs"] + report["totals"]["heldout_docs"]


def test_cli_prepares_and_bad_input_fails_in_one_line_leaving_nothing(mixed, tmp_path, capsys):
    out = tmp_path / "out"
    src = [f"--source=text:{mixed}/txt/*.txt", f"--source=jsonl:{mixed}/jsonl/**/*.zst", "--workers=1"]
    strict = one_line_error(cli(capsys, "prepare", *src, f"--out={out}", "--strict"))
    assert "example_train_0.jsonl.zst:47: malformed JSON" in strict
    assert not out.exists() and not glob.glob(f"{out}.tmp-*")
    empty = one_line_error(cli(capsys, "prepare", f"--source=text:{mixed}/txt/short.txt", f"--out={out}"))
    assert "the corpus is empty after filtering" in empty and not out.exists()
    status, stdout, err = cli(capsys, "prepare", *src, f"--out={out}", "--verify", "--threshold=0.7")
    assert status == 0, err[-2000:]
    assert "RedPajamaC4" in stdout and "14 bands x 9 rows" in stdout
    before = sorted(glob.glob(f"{out}/**", recursive=True))
    again = one_line_error(cli(capsys, "prepare", *src, f"--out={out}"))
    assert "already exists and is not empty" in again and sorted(glob.glob(f"{out}/**", recursive=True)) == before
    assert "unknown flag --treshold (did you mean '--threshold'?)" in one_line_error(
        cli(capsys, "prepare", *src, f"--out={out}2", "--treshold=0.5"))
    assert "--threshold must lie in (0, 1]" in one_line_error(
        cli(capsys, "prepare", *src, f"--out={out}2", "--threshold=2"))
    assert "matches no file" in one_line_error(
        cli(capsys, "prepare", "--source=jsonl:/no/such/*.zst", f"--out={out}2"))
    assert not os.path.exists(f"{out}2")


def test_cli_trains_a_tokenizer_from_any_source(mixed, tmp_path, capsys):
    out = tmp_path / "tok.model"
    status, _, err = cli(capsys, "tokenizer", "train", f"--out={out}", f"--config.data.sources=text:{mixed}/txt/*.txt",
                             "--config.model.vocab_size=400", "--config.data.eval_fraction=0.0")
    assert status == 0, err[-2000:]
    from slimjax.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(out)
    assert tok.vocab_size == 400 and tok.decode(tok.encode("the lazy dog\n")) == "the lazy dog\n"
    assert "already exists" in one_line_error(cli(capsys, "tokenizer", "train", f"--out={out}"))
