"""Shared by the data tests: the CLI in this process, one-line error checks, tiny training flags,
and a check that a test corpus holds documents out."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import zstandard

from slimjax.config import DataConfig
from slimjax.data import loader

# A 2-layer model, 2 steps of batch 8 x 32: end-to-end CLI runs in seconds.
TINY_TRAIN = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=8",
              "--config.model.n_kv_heads=4", "--config.model.head_dim=8", "--config.model.d_ff=128",
              "--config.model.max_seq_len=64", "--config.model.dtype=float32", "--config.data.seq_len=32",
              "--config.train.global_batch_size=8", "--config.train.steps=2", "--config.train.log_every=1",
              "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.progress=false",
              "--config.optimizer.warmup_steps=1", "--config.train.sample_tokens=0"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The `slimjax` command in this process: (exit status, stdout, stderr)."""
    from slimjax.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(result: tuple[int, str, str]) -> str:
    """The single `slimjax: error: ...` line of a failed command (exit status 2)."""
    status, _, err = result
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: "), err[-2000:]
    return lines[0]


def train_losses(workdir: str) -> list[tuple[int, float]]:
    """(step, train loss) of every step logged in ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def assert_held_out(data: DataConfig) -> int:
    """A test corpus must hold documents out (membership depends only on file names and record
    indices, so this holds for good once it holds); returns how many it holds out."""
    held = loader.split_documents(data, "eval")
    assert held, f"the test corpus {[s.name for s in data.sources]} holds no document out; rename or add files"
    return len(held)


def mixed_corpus(root: pathlib.Path) -> str:
    """40 text files and two zstd JSON Lines files of pseudo-random words under ``root``; returns its path."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), int(n))) for n in rng.integers(2, 9, 300)]

    def doc(n):
        return " ".join(rng.choice(words, n)) + "\n"

    (root / "text").mkdir()
    for i in range(40):
        (root / "text" / f"{i:02d}.txt").write_text(doc(int(rng.integers(20, 80))))
    (root / "jsonl").mkdir()
    for f in range(2):
        lines = "".join(json.dumps({"text": doc(int(rng.integers(5, 60))), "meta": {"redpajama_set_name": "x"}}) + "\n"
                        for _ in range(80))
        (root / "jsonl" / f"part_{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return str(root)
