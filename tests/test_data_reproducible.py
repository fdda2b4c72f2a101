"""Reproducible data: the held-out split does not depend on where the corpus lives or how its glob
is spelled, and a trained SentencePiece model (hence a run's losses) is the same in every run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from data_helpers import TINY_TRAIN, cli, train_losses
from slimjax import config as C
from slimjax.configs import base
from slimjax.data import loader, sources, tokenizer


def write_corpus(root):
    """60 text files (two in a subdirectory) and a JSON Lines file of 50 records, pseudo-random words."""
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(100)]
    (root / "sub").mkdir(parents=True)
    for i in range(60):
        (root / ("sub" if i < 2 else ".") / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, 30)) + "\n")
    lines = "".join(json.dumps({"text": " ".join(rng.choice(words, 20))}) + "\n" for _ in range(50))
    (root / "j.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


def split_of(*specs, fraction=0.25):
    """{source index: (train texts, held-out texts)} for sources given as "kind:glob"."""
    c = base.get_config()
    c.data.sources, c.data.eval_fraction = specs, fraction
    cfg = C.validate(c).data
    out = {}
    for k, src in enumerate(cfg.sources):
        train, held = ([doc for _, doc in loader.documents(cfg, src, split, lambda key: True, sources.ReadStats())]
                       for split in ("train", "eval"))
        out[k] = (train, held)
    return out


def test_held_out_membership_does_not_depend_on_where_the_corpus_lives(tmp_path, monkeypatch):
    write_corpus(tmp_path / "a" / "data")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    monkeypatch.chdir(tmp_path / "a")
    relative = split_of("text:./data/**/*.txt", "jsonl:data/*.zst")
    absolute = split_of(f"text:{tmp_path}/elsewhere/b/data/**/*.txt", f"jsonl:{tmp_path}/elsewhere/b/data/j.jsonl.zst")
    directory = split_of(f"text:{tmp_path}/elsewhere/b/data", "jsonl:data/j.jsonl.*")[0]
    assert relative == absolute
    # A directory is read as every file below it: same text files, same split.
    assert directory == relative[0]
    for train, held in relative.values():
        assert held and train and not set(held) & set(train)
        assert 0.1 < len(held) / (len(held) + len(train)) < 0.4  # about the fraction asked for
    # Adding a file leaves every other file's membership as it was (names, not positions, decide).
    (tmp_path / "a" / "data" / "000.txt").write_text("a new first file\n")
    grown = split_of("text:./data/**/*.txt")[0]
    assert set(relative[0][1]) <= set(grown[1]) and set(relative[0][0]) <= set(grown[0])


@pytest.mark.parametrize("pattern,root", [
    ("/d/x/*.txt", "/d/x"), ("/d/x/**/*.txt", "/d/x"), ("/d/x/a?/b.txt", "/d/x"), ("/d/x/b.txt", "/d/x"),
    ("/d/[xy]/b.txt", "/d"),
])
def test_glob_root_is_the_fixed_prefix(pattern, root):
    assert sources.glob_root(pattern) == root


def test_sample_sentences_is_a_seeded_sample_in_input_order():
    sentences = [f"s{i}" for i in range(1000)]
    sample = tokenizer.sample_sentences(iter(sentences), 100)
    assert len(sample) == 100 and sample == tokenizer.sample_sentences(iter(sentences), 100)
    assert sample == sorted(sample, key=sentences.index)  # a subset, kept in input order
    assert max(int(s[1:]) for s in sample) > 800  # drawn from the whole input, not its head
    assert sample != tokenizer.sample_sentences(iter(sentences), 100, seed=1)
    assert tokenizer.sample_sentences(iter(sentences[:50]), 100) == sentences[:50]


TRAIN_TOKENIZER = """
import sys
from slimjax.data import tokenizer
docs = [line for line in open(sys.argv[1])]
tokenizer.train_sentencepiece(docs, 300, "unigram", sys.argv[2], max_sentences=400)
"""


def test_two_tokenizer_trainings_give_the_same_model_bytes(tmp_path):
    """In this process and in a fresh one (SentencePiece's own sampler seeded itself per process),
    sampling (more sentences than max_sentences) and the unigram trainer (thread-count dependent)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)] + ["the", "of", "and", "to"]
    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(" ".join(rng.choice(words, 12)) + "\n" for _ in range(1500)))
    docs = corpus.read_text().splitlines(keepends=True)
    here = tokenizer.train_sentencepiece(docs, 300, "unigram", tmp_path / "one" / "spm.model", max_sentences=400)
    result = subprocess.run([sys.executable, "-c", TRAIN_TOKENIZER, str(corpus), str(tmp_path / "two.model")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "one" / "spm.model").read_bytes() == (tmp_path / "two.model").read_bytes()
    assert here.vocab_size == 300 and os.listdir(tmp_path / "one") == ["spm.model"]  # no temporary left


def test_two_fresh_workdirs_train_bit_identical_losses(tmp_path, capsys):
    """The same config and seed in two fresh workdirs: the same tokenizer bytes and per-step losses."""
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(80)]
    (tmp_path / "corpus").mkdir()
    for i in range(40):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, 60)) + "\n")
    flags = [*TINY_TRAIN, f"--config.data.sources=text:{tmp_path}/corpus/*.txt", "--config.data.eval_fraction=0.2",
             "--config.model.vocab_size=320", "--config.data.shards=2"]
    for name in ("one", "two"):
        status, _, err = cli(capsys, "train", *flags, f"--workdir={tmp_path / name}")
        assert status == 0, err[-2000:]
    model = [(tmp_path / name / "tokenizer" / "spm.model").read_bytes() for name in ("one", "two")]
    assert model[0] == model[1]
    losses = [train_losses(str(tmp_path / name)) for name in ("one", "two")]
    assert [step for step, _ in losses[0]] == [1, 2] and losses[0] == losses[1]
