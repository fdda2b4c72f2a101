"""A source that yields no usable documents stops `slimjax train` and `slimjax tokenizer train` with
one line naming the source and why (skipped counts by reason), exit 2, and nothing written."""

import pytest

from data_helpers import TINY_TRAIN, cli, one_line_error
from helpers import snapshot
from slimjax.data import tokenizer

GOOD = " ".join(f"w{i % 50}" for i in range(300)) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """good/ (documents), empty/ (one empty file), binary/ (one file of non-UTF-8 bytes), short/."""
    for name, files in {"good": {f"{i:02d}.txt": GOOD for i in range(8)}, "empty": {"e.txt": ""},
                        "binary": {"b.txt": b"\xff\xfe\x80" * 100}, "short": {"s.txt": "too short\n"}}.items():
        (tmp_path / name).mkdir()
        for f, body in files.items():
            path = tmp_path / name / f
            path.write_bytes(body) if isinstance(body, bytes) else path.write_text(body)
    return tmp_path


def source(corpus, train, **fields):
    entry = {"kind": "text", "path": f"{corpus}/{train}/*.txt", **fields}
    return f"--config.data.sources=({entry!r},)"


CASES = {
    # (training dir, source fields, extra flags): what the message must say
    "empty file, eval_path given": ("empty", {"eval_path": "GOOD"}, [], "skipped 1 empty (first: "),
    "non-UTF-8 file": ("binary", {"eval_path": "GOOD"}, [], "skipped 1 non-UTF-8 bytes (first: "),
    "empty file, eval_fraction > 0": ("empty", {}, ["--config.data.eval_fraction=0.5"], "skipped 1 empty"),
    "too short": ("short", {"eval_path": "GOOD"}, ["--config.data.min_doc_chars=50"],
                  "skipped 1 shorter than data.min_doc_chars=50"),
}


def case_flags(corpus, case):
    train, fields, extra, _ = CASES[case]
    fields = {k: f"{corpus}/good/*.txt" if v == "GOOD" else v for k, v in fields.items()}
    return [source(corpus, train, **fields), *extra], train


@pytest.mark.parametrize("case", list(CASES))
def test_train_on_a_source_without_usable_documents_fails_in_one_line(corpus, case, tmp_path, capsys):
    flags, train = case_flags(corpus, case)
    workdir = tmp_path / "fresh"
    line = one_line_error(cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320", *flags,
                              f"--workdir={workdir}"))
    assert f"data source 'text:{corpus}/{train}/*.txt' yields no usable train documents" in line, line
    assert CASES[case][-1] in line and f"{corpus}/{train}/" in line.split("first: ")[1]
    assert "SentencePiece" not in line and "eval_fraction > 0" not in line
    assert snapshot(str(workdir)) == {}  # nothing written into the fresh workdir


def test_an_existing_workdir_is_left_as_it_was(corpus, tmp_path, capsys):
    workdir = tmp_path / "existing"
    tokenizer.train_sentencepiece([GOOD] * 20, 300, "bpe", tokenizer.cached_model_path(workdir))
    (workdir / "notes.txt").write_text("mine\n")
    before = snapshot(str(workdir))
    flags, _ = case_flags(corpus, "non-UTF-8 file")
    line = one_line_error(cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320", *flags,
                              f"--workdir={workdir}"))
    assert "yields no usable train documents" in line and snapshot(str(workdir)) == before


def test_tokenizer_train_on_an_empty_source_fails_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "tok.model"
    line = one_line_error(cli(capsys, "tokenizer", "train", f"--out={out}", source(corpus, "empty"),
                              "--config.model.vocab_size=320", "--config.data.eval_fraction=0.0"))
    assert f"data source 'text:{corpus}/empty/*.txt' yields no usable train documents" in line
    assert "skipped 1 empty" in line and not out.exists() and list(tmp_path.glob("tok.model*")) == []


def test_no_held_out_documents_says_where_they_would_have_come_from(corpus, tmp_path, capsys):
    """eval_path yielding nothing, and a fraction too small for the corpus, each named as such."""
    eval_empty = source(corpus, "good", eval_path=f"{corpus}/binary/*.txt")
    line = one_line_error(cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320", eval_empty,
                              f"--workdir={tmp_path / 'a'}"))
    assert "no held-out documents to evaluate on" in line
    assert f"its eval_path '{corpus}/binary/*.txt' yields no usable eval documents" in line
    assert "skipped 1 non-UTF-8 bytes" in line
    line = one_line_error(cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320",
                              source(corpus, "good"), "--config.data.eval_fraction=0.001",
                              f"--workdir={tmp_path / 'b'}"))
    assert f"'text:{corpus}/good/*.txt': data.eval_fraction=0.001 of its documents selects none" in line
    assert snapshot(str(tmp_path / "a")) == {} and snapshot(str(tmp_path / "b")) == {}
