"""`slimjax prune` end to end on a small trained run: exact one-shot masks (magnitude per layer and
global, Wanda and SparseGPT with N:M), recovery fine-tuning from the pruned run that never revives
a weight, structured pruning into a smaller model, eval / generate / export of pruned runs, a
RigL run killed with -9 and resumed bit-exactly, and bad input (one line, exit 2, nothing written)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import flat, snapshot
from test_fault import DRIVER, FLAGS, fingerprints, kill9_then_resume, one_line_error

BASE_STEPS = 30


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def cli_here(capsys, *args):
    """The CLI's entry point in this process (no interpreter start-up): a CompletedProcess."""
    from slimjax.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def train_argv(workdir, *extra, steps=BASE_STEPS, every=BASE_STEPS):
    return [sys.executable, DRIVER, "train", *FLAGS, f"--config.train.steps={steps}",
            f"--config.checkpoint.every_steps={every}", "--config.train.sample_tokens=0", f"--workdir={workdir}",
            *extra]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dense"))
    result = run(train_argv(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def saved(workdir):
    """(spec json, host params, host masks or None) of a run's latest checkpoint."""
    from slimjax.cli.rundir import open_run
    from slimjax.slim.prune import MASKS

    rd = open_run(workdir)
    params = jax.device_get(rd.restore_params())
    slim_abs = jax.eval_shape(lambda: rd.built.init_state(rd.built.shapes))
    shardings = rd.rules.tree_shardings(rd.built.state_axes(), slim_abs, rd.mesh) if slim_abs else {}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), slim_abs, shardings)
    slim = rd.checkpointer.restore_slim(rd.step, abstract) if slim_abs else None
    masks = flat(jax.device_get(slim["prune"][MASKS])) if slim else None
    return rd.meta["spec"], flat(params), masks


def test_magnitude_per_layer_is_exact_and_recovery_never_revives_a_weight(base_run, tmp_path, capsys):
    out = str(tmp_path / "magnitude")
    result = cli_here(capsys, "prune", f"--workdir={base_run}", f"--out={out}", "--method=magnitude",
                      "--sparsity=0.5")
    assert result.returncode == 0, result.stderr
    spec, params, masks = saved(out)
    _, dense, _ = saved(base_run)
    assert [name for name, _ in spec["recipe"]] == ["prune"]
    assert set(masks) == {p for p in params if p.startswith("blocks/") and p.endswith("kernel")}
    for path, m in masks.items():
        for i in range(m.shape[0]):  # every stacked layer alone at exactly 50%, keeping the largest
            w, keep = dense[path][i].reshape(-1), m[i].reshape(-1)
            assert keep.sum() == w.size // 2, path
            assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max(), path
        np.testing.assert_array_equal(params[path][~m], 0.0)
        np.testing.assert_array_equal(params[path][m], dense[path][m])
    report = json.load(open(os.path.join(out, "prune.json")))
    assert report["sparsity"] == pytest.approx(0.5) and len(report["layers"]) == 7 * 2

    # Recovery: the written config file fine-tunes from the pruned run with the masks fixed.
    rec = str(tmp_path / "recovered")
    result = run([sys.executable, "-m", "slimjax.cli", "train", f"--config={out}/config.py", f"--workdir={rec}",
                  "--config.train.steps=6", "--config.checkpoint.every_steps=6", "--config.optimizer.weight_decay=0.1"])
    assert result.returncode == 0, result.stderr[-3000:]
    _, tuned, tuned_masks = saved(rec)
    for path, m in masks.items():
        np.testing.assert_array_equal(tuned_masks[path], m)
        np.testing.assert_array_equal(tuned[path][~m], 0.0)
        assert not np.array_equal(tuned[path][m], params[path][m])

    # The compact sparse copy restores bit-exactly (so the same logits) and is smaller on disk.
    from slimjax.slim.sparse_store import load_sparse, store_bytes

    assert cli_here(capsys, "export", f"--workdir={out}", "--sparse").returncode == 0
    stored = flat(load_sparse(os.path.join(out, "sparse")))
    assert stored.keys() == params.keys()
    for path, x in params.items():
        np.testing.assert_array_equal(stored[path], x)
    dense_bytes = sum(x.nbytes for x in params.values())
    assert store_bytes(os.path.join(out, "sparse")) < 0.8 * dense_bytes

    # A pruned run evaluates, samples and exports (to a plain dense model) like any other.
    assert cli_here(capsys, "eval", f"--workdir={out}", "--max_docs=4").returncode == 0
    assert cli_here(capsys, "generate", f"--workdir={out}", "--prompt=To be", "--max_new_tokens=4").returncode == 0
    hf = str(tmp_path / "hf")
    assert cli_here(capsys, "export", f"--workdir={out}", f"--out={hf}").returncode == 0
    assert os.path.isfile(os.path.join(hf, "config.json"))


def test_global_magnitude_threshold_is_exact_over_all_layers(base_run, tmp_path, capsys):
    out = str(tmp_path / "global")
    assert cli_here(capsys, "prune", f"--workdir={base_run}", f"--out={out}", "--scope=global",
                    "--sparsity=0.7").returncode == 0
    _, params, masks = saved(out)
    _, dense, _ = saved(base_run)
    kept = np.concatenate([np.abs(dense[p][m]) for p, m in masks.items()])
    dropped = np.concatenate([np.abs(dense[p][~m]) for p, m in masks.items()])
    total = kept.size + dropped.size
    assert kept.size == total - round(0.7 * total)
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("method,nm", [("wanda", "2:4"), ("sparsegpt", "4:8"), ("sparsegpt", None)])
def test_calibrated_methods_give_exact_patterns(base_run, tmp_path, capsys, method, nm):
    out = str(tmp_path / method)
    args = ["prune", f"--workdir={base_run}", f"--out={out}", f"--method={method}", "--calibration_samples=32",
            "--sparsity=0.5"]
    result = cli_here(capsys, *args, *([f"--nm={nm}"] if nm else []))
    assert result.returncode == 0, result.stderr
    _, params, masks = saved(out)
    for path, m in masks.items():
        d_in = int(np.prod(m.shape[1:-1])) if path.endswith(("wo/kernel",)) else m.shape[1]
        per_layer = m.reshape(m.shape[0], d_in, -1)
        if nm:
            n, mm = map(int, nm.split(":"))
            groups = per_layer.reshape(m.shape[0], d_in // mm, mm, -1).sum(axis=2)
            assert np.all(groups == n), path
        else:  # SparseGPT keeps the same count in every output column
            assert np.all(per_layer.sum(axis=1) == d_in // 2), path
        np.testing.assert_array_equal(params[path][~m], 0.0)
    report = json.load(open(os.path.join(out, "prune.json")))
    if method == "sparsegpt":
        assert all(0 <= line["relative_error"] < 1 for line in report["layers"])


def test_structured_pruning_writes_a_smaller_model_that_runs(base_run, tmp_path, capsys):
    out = str(tmp_path / "structured")
    result = cli_here(capsys, "prune", f"--workdir={base_run}", f"--out={out}", "--heads=0.5", "--mlp=0.25",
                      "--calibration_samples=16")
    assert result.returncode == 0, result.stderr
    spec, params, masks = saved(out)
    assert masks is None and spec["recipe"] == []
    m = spec["model"]
    assert (m["n_heads"], m["n_kv_heads"], m["d_ff"]) == (4, 2, 96)
    assert params["blocks/attn/wq/kernel"].shape[-2] == 4 and params["blocks/mlp/up/kernel"].shape[-1] == 96
    assert cli_here(capsys, "eval", f"--workdir={out}", "--max_docs=4").returncode == 0
    rec = str(tmp_path / "structured_rec")
    result = run([sys.executable, "-m", "slimjax.cli", "train", f"--config={out}/config.py", f"--workdir={rec}",
                  "--config.train.steps=3", "--config.checkpoint.every_steps=3"])
    assert result.returncode == 0, result.stderr[-3000:]


RIGL = ["--config.slim.recipe=('prune',)", "--config.slim.prune.schedule=rigl", "--config.slim.prune.sparsity=0.6",
        "--config.slim.prune.begin_step=0", "--config.slim.prune.end_step=10", "--config.slim.prune.every=2"]


def test_kill9_then_resume_of_a_rigl_run_is_bit_identical(tmp_path):
    # Killed after step 3: the resumed part crosses the mask updates at steps 4, 6 and 8.
    straight, killed = kill9_then_resume(lambda wd: train_argv(wd, *RIGL, steps=12, every=3), tmp_path, 12, 3)
    got, want = fingerprints(killed, 12), fingerprints(straight, 12)
    assert {"params", "slim", "opt_state"} <= set(want) and got == want


BAD = [
    (["--sparsity=1.0"], "--sparsity"),
    (["--sparsity=-0.1"], "--sparsity"),
    (["--nm=3:5"], "--nm"),
    (["--nm=4:2"], "--nm"),
    (["--target=nothing_matches"], "slim.prune.targets"),
    (["--heads=0.9"], "--heads"),
    (["--mlp=1.0"], "--mlp"),
    (["--method=wanda", "--calibration_samples=100000000"], "--calibration_samples"),
    (["--method=obs"], "--method"),
    (["--scope=global", "--method=wanda"], "--scope"),
]


@pytest.mark.parametrize("flags,named", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base_run, tmp_path, capsys, flags, named):
    before = snapshot(base_run)
    out = str(tmp_path / "out")
    line = one_line_error(cli_here(capsys, "prune", f"--workdir={base_run}", f"--out={out}", *flags))
    assert named in line, line
    assert not os.path.exists(out)
    assert snapshot(base_run) == before
