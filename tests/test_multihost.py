"""Real multi-process training: two processes (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each)
train like one process with 8 devices, resume exactly from the checkpoint they wrote together, and
that checkpoint restores in one process."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from helpers import build_state, run_processes
from multihost_worker import multihost_config
from slimjax.checkpoint import Checkpointer
from slimjax.train.metrics import METRICS_FILE, SUMMARY_FILE
from slimjax.train.run import CHECKPOINT_DIR

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
STEPS = 4


def worker(workdir: str, n: int):
    return lambda i, port: [sys.executable, WORKER, str(i), str(n), str(port), workdir]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the same run on one process x 8 devices and on two processes x 4 devices."""
    root = tmp_path_factory.mktemp("multihost")
    one, two = str(root / "one"), str(root / "two")
    run_processes(worker(two, 2), 2)  # process 0 trains the SentencePiece model and shares it
    # SentencePiece training is not bit-reproducible from run to run, so the one-process run reads the
    # same model from its cache: the comparison is then about the distributed training alone.
    shutil.copytree(os.path.join(two, "tokenizer"), os.path.join(one, "tokenizer"))
    run_processes(worker(one, 1), 1)
    return one, two


def train_losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one_process(runs):
    one, two = runs
    ref, got = train_losses(one), train_losses(two)
    assert len(ref) == len(got) == STEPS  # process 0 alone wrote the metrics: one record per step
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert ref[-1] < ref[0]  # it trained
    with open(os.path.join(two, SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["processes"] == 2 and summary["final_step"] == STEPS
    assert summary["mesh"] == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
    for i in range(2):  # train() returned on each process only once process 0's outputs were complete
        with open(f"{two}.process{i}.json") as f:
            assert json.load(f) == {"final_step": STEPS, "processes": 2, "summary_written": True}
    # Process 0 alone trained and wrote the SentencePiece model (process 1 found the same bytes).
    assert os.listdir(os.path.join(two, "tokenizer")) == ["spm.model"]


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    one, two = runs
    cfg = multihost_config()
    _, _, setup, fresh = build_state(cfg)  # the 8-device mesh of this (single) test process
    assert jax.process_count() == 1 and jax.device_count() == 8
    restored = {}
    for name, workdir in (("one", one), ("two", two)):
        ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint)
        try:
            assert ckpt.latest_step() == STEPS
            state, data_state, meta = ckpt.restore(STEPS, setup.abstract.as_dict())
        finally:
            ckpt.close()
        assert meta["step"] == STEPS and data_state
        restored[name] = state
    leaves = {k: jax.tree.leaves_with_path(v["params"]) for k, v in restored.items()}
    init = jax.tree.leaves(fresh.params)
    assert len(leaves["one"]) == len(leaves["two"]) == len(init)
    for (path, a), (_, b), start in zip(leaves["one"], leaves["two"], init):
        a, b = np.asarray(a), np.asarray(b)  # gathered from the 8 devices: every shard was written
        assert a.shape == b.shape == start.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        assert not np.array_equal(b, np.asarray(start))  # trained away from the init
    assert int(restored["two"]["step"]) == STEPS


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint_exactly(runs, tmp_path):
    """Every process restores its own data-iterator state (data_<i>): steps 3-4 after resuming from the
    step-2 checkpoint repeat the uninterrupted run's losses."""
    one, two = runs
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, CHECKPOINT_DIR, str(STEPS)))
    os.remove(os.path.join(resumed, METRICS_FILE))
    assert {"data_0", "data_1"} <= set(os.listdir(os.path.join(resumed, CHECKPOINT_DIR, "2")))
    run_processes(worker(resumed, 2), 2)
    got = train_losses(resumed)
    assert len(got) == 2
    np.testing.assert_allclose(got, train_losses(one)[2:], rtol=1e-6, atol=0)


def test_hosts_without_a_shared_workdir_get_process_0s_tokenizer(tmp_path):
    """Process 0 trains the SentencePiece model; process 1, whose workdir is its own, receives the same
    bytes (it never trains one: SentencePiece training is not bit-reproducible)."""
    run_processes(lambda i, port: [sys.executable, WORKER, str(i), "2", str(port), str(tmp_path), "tokenizer"], 2)
    models = [(tmp_path / f"p{i}" / "tokenizer" / "spm.model").read_bytes() for i in range(2)]
    assert len(models[0]) > 1000 and models[0] == models[1]
    assert os.listdir(tmp_path / "p1" / "tokenizer") == ["spm.model"]  # no temporary file left
