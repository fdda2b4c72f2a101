"""Two real processes (jax.distributed on 127.0.0.1) assemble the same global batches as one, and a
run restored from its Orbax checkpoint at step k sees exactly the batches of an uninterrupted run."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import slimjax
from data_helpers import assert_held_out, mixed_corpus
from helpers import child_env, run_processes, small_config, with_train
from slimjax import config as C
from slimjax.data import pipeline
from slimjax.train.run import build_run

WORKER = os.path.join(os.path.dirname(__file__), "data_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 text files and two zstd JSON Lines files of pseudo-random words."""
    return mixed_corpus(tmp_path_factory.mktemp("corpus"))


def test_two_processes_assemble_the_single_process_global_batches(corpus, tmp_path):
    one = tmp_path / "one.json"
    single = subprocess.run([sys.executable, WORKER, "0", "1", "0", corpus, str(one)], env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    run_processes(lambda i, port: [sys.executable, WORKER, str(i), "2", str(port), corpus, str(outs[i])], 2,
                  timeout=300)
    ref = json.loads(one.read_text())
    got = [json.loads(o.read_text()) for o in outs]
    assert ref["processes"] == 1 and [g["processes"] for g in got] == [2, 2]
    assert ref["devices"] == got[0]["devices"] == 8
    assert ref["local_rows"] == 8 and [g["local_rows"] for g in got] == [4, 4]
    assert len(set(ref["hashes"])) == 6  # six different batches
    assert got[0]["hashes"] == got[1]["hashes"] == ref["hashes"]
    # Each process read, tokenized and packed only its own shards: together exactly the whole.
    for name, whole in ref["stats"]["sources"].items():
        halves = [g["stats"]["sources"][name] for g in got]
        assert all(0 < h["documents"] < whole["documents"] for h in halves)
        assert sum(h["documents"] for h in halves) == whole["documents"]
        assert sum(h["rows"] for h in halves) == whole["rows"]


def batch_hash(batch) -> str:
    digest = hashlib.sha256()
    for key in pipeline.BATCH_KEYS:
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()


def test_resuming_from_the_orbax_checkpoint_replays_the_uninterrupted_batches(corpus, tmp_path):
    cfg = small_config("llama", vocab_size=512)
    data = dataclasses.replace(cfg.data, tokenizer_kind="byte", packing="first_fit", shards=4, sources=(
        C.parse_source("s", f"text:{corpus}/text/*.txt"),
        C.parse_source("s", {"kind": "jsonl", "path": f"{corpus}/jsonl/*.zst", "weight": 2.0})))
    cfg = with_train(dataclasses.replace(cfg, data=data), steps=3, eval_every=100, eval_batches=1, log_every=1,
                     progress=False)
    assert_held_out(cfg.data)  # the run evaluates: its corpus must hold documents out
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=3))
    workdir = str(tmp_path / "run")
    slimjax.train(cfg, workdir)  # interrupted after step 3: its checkpoint holds the iterator state
    run = build_run(with_train(cfg, steps=6), workdir)  # restores state and data iterator from Orbax
    try:
        assert run.start_step == 3 and run.data_state is not None
        resumed = pipeline.iterate(run.train_data, run.data_state)
        after_restore = [batch_hash(next(resumed)) for _ in range(3)]
        uninterrupted = pipeline.iterate(run.train_data)
        straight = [batch_hash(next(uninterrupted)) for _ in range(6)]
    finally:
        run.checkpointer.close()
    assert after_restore == straight[3:]
    assert len(set(straight)) == 6
