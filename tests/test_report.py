"""The slimming report: exact per-layer counts of a run with half of one kernel zeroed, totals,
perplexity equal to `slimjax eval`'s, ratios and verdicts against the unpruned run, outputs, errors."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from helpers import build_state, small_config
from helpers import flat as helpers_flat

from slimjax.checkpoint import Checkpointer
from slimjax.cli import main
from slimjax.cli.report import build_report
from slimjax.cli.rundir import open_run
from slimjax.slim import report
from slimjax.slim.sparse_store import load_sparse, read_meta, store_bytes

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "ravens", "sing", "of", "winter", "rain"]
PRUNED_LAYER = "blocks/0/mlp/up"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_run(run, cfg, params, step=3):
    ck = Checkpointer(os.path.join(run, "checkpoints"), cfg.checkpoint)
    ck.save_params(step, params, {"config": cfg.to_dict(), "step": step})
    ck.wait()
    ck.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base run, pruned run: a copy with exactly half of each layer's mlp/up kernel zeroed and a
    sparse copy written by `slimjax export --sparse`, base params, pruned params)."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))))
    cfg = small_config(vocab_size=264)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer_kind="byte", eval_fraction=0.4,
        sources=(dataclasses.replace(cfg.data.sources[0], kind="text", path=str(corpus / "*.txt")),)))
    _, _, _, state = build_state(cfg)
    params = jax.device_get(state.model_params())
    base = str(root / "base")
    save_run(base, cfg, params)

    up = np.array(params["blocks"]["mlp"]["up"]["kernel"])  # [layers, d_model, d_ff]
    for layer in up:
        flat = layer.reshape(-1)
        flat[rng.permutation(flat.size)[: flat.size // 2]] = 0.0
    pruned_params = {**params, "blocks": {**params["blocks"], "mlp": {**params["blocks"]["mlp"], "up": {"kernel": up}}}}
    pruned = str(root / "pruned")
    save_run(pruned, cfg, pruned_params)
    assert main(["export", f"--workdir={pruned}", "--sparse"]) == 0
    return base, pruned, params, pruned_params


def test_export_sparse_round_trips_the_run(runs, capsys):
    _, pruned, _, pruned_params = runs
    sparse = os.path.join(pruned, report.SPARSE_DIR)
    got = load_sparse(sparse)
    for path, want in helpers_flat(pruned_params).items():
        np.testing.assert_array_equal(helpers_flat(got)[path], want, err_msg=path)
    meta = read_meta(sparse)
    assert meta["step"] == 3 and meta["spec"] == open_run(pruned).spec.to_json()
    with open(os.path.join(sparse, "index.json")) as f:
        formats = {e["name"]: e["format"] for e in json.load(f)["leaves"]}
    assert formats["blocks/mlp/up/kernel"] == "bitmask" and formats["blocks/mlp/gate/kernel"] == "dense"
    assert main(["export", f"--workdir={pruned}", "--sparse", "--out=x"]) == 2
    assert "--sparse writes a sparse store alone" in capsys.readouterr().err


def test_report_against_the_unpruned_run(runs, capsys):
    base, pruned, params, _ = runs
    out = os.path.join(pruned, "r.json")
    assert main(["report", f"--workdir={pruned}", f"--against={base}", "--max_docs=3", "--batch_size=8",
                 "--repeats=1", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    got = read_json(out)
    run, other = got["run"], got["against"]

    # Per layer: exact counts from the parameters themselves.
    rows = {r["name"]: r for r in run["layers"]}
    kernels = {"attn/wq": 4, "attn/wk": 4, "attn/wv": 4, "attn/wo": 4, "mlp/up": 3, "mlp/gate": 3, "mlp/down": 3}
    expected = {f"blocks/{i}/{k}" for i in range(2) for k in kernels} | {"embed", "lm_head"}
    assert set(rows) == expected
    up = rows[PRUNED_LAYER]
    assert up["shape"] == [64, 128] and up["params"] == 64 * 128
    assert up["nonzeros"] == 64 * 128 // 2 and up["sparsity"] == 0.5
    assert rows["blocks/1/mlp/up"]["sparsity"] == 0.5
    assert all(r["sparsity"] == 0.0 for name, r in rows.items() if not name.endswith("mlp/up"))
    assert rows["blocks/1/attn/wo"]["shape"] == [8, 8, 64] and rows["embed"]["shape"] == [264, 64]

    # Totals: every parameter, half of each layer's mlp/up kernel zeroed.
    leaves = jax.tree.leaves(params)
    total = sum(x.size for x in leaves)
    nonzero = sum(int(np.count_nonzero(x)) for x in leaves)
    assert other["totals"]["params"] == run["totals"]["params"] == total
    assert other["totals"]["nonzero_params"] == nonzero
    assert run["totals"]["nonzero_params"] == nonzero - 2 * (64 * 128 // 2)
    assert run["totals"]["weight_bytes"] == 4 * total
    assert run["totals"]["matrix_params"] == sum(r["params"] for r in rows.values())

    # Disk: the checkpoint step and the sparse copy, walked file by file.
    assert run["disk"]["checkpoint_bytes"] == store_bytes(os.path.join(pruned, "checkpoints", "3"))
    assert 0 < run["disk"]["checkpoint_param_bytes"] <= run["disk"]["checkpoint_bytes"]
    assert run["disk"]["sparse_bytes"] == store_bytes(os.path.join(pruned, "sparse")) > 0
    assert other["disk"]["sparse_bytes"] is None

    # Quality equals `slimjax eval` on the same documents and batch size.
    eval_out = os.path.join(pruned, "eval.json")
    assert main(["eval", f"--workdir={pruned}", "--max_docs=3", "--batch_size=8", f"--out={eval_out}"]) == 0
    evaluated = read_json(eval_out)
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents"):
        assert run["quality"][key] == pytest.approx(evaluated[key], rel=1e-6), key
    assert got["documents"] == evaluated["documents"] == 3

    # Speed: measured on this backend.
    assert run["speed"]["backend"] == jax.default_backend() and run["speed"]["forward_ms"] > 0
    assert run["speed"]["decode_tokens"] == 32 and run["speed"]["decode_ms_per_token"] >= 0

    # Ratios and verdicts: the zeros are a size-only saving; the speed-up is stated as measured.
    r = got["ratios"]
    assert r["params"] == 1.0 and r["weight_bytes"] == 1.0
    assert r["nonzero_params"] == pytest.approx((nonzero - 64 * 128) / nonzero)
    ppl, other_ppl = run["quality"]["perplexity"], other["quality"]["perplexity"]
    assert r["perplexity_delta_pct"] == pytest.approx(100 * (ppl / other_ppl - 1)) and ppl != other_ppl
    assert r["forward_speedup"] == pytest.approx(other["speed"]["forward_ms"] / run["speed"]["forward_ms"])
    kinds = {v["saving"]: v for v in got["verdicts"]}
    assert kinds["unstructured sparsity"]["verdict"] == report.SIZE_ONLY
    assert "2 layers at unchanged shapes hold 50.0% zeros (was 0.0%)" in kinds["unstructured sparsity"]["detail"]
    assert "structure" not in kinds
    assert kinds["forward latency"]["verdict"] == f"measured forward speed-up {r['forward_speedup']:.2f}x"

    # Outputs: the table, the chart.
    assert PRUNED_LAYER in printed and report.SIZE_ONLY in printed and "perplexity" in printed
    with open(os.path.join(pruned, report.PLOT_FILE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_verdict_for_shapes_that_shrank():
    """compare() on two hand-made reports: a smaller d_ff is a real saving, extra zeros size-only."""
    def rep(d_ff, up_nonzeros, forward_ms):
        layers = [{"name": "blocks/0/mlp/up", "shape": [64, d_ff], "params": 64 * d_ff, "nonzeros": 64 * d_ff},
                  {"name": "blocks/0/attn/wq", "shape": [64, 8, 8], "params": 4096, "nonzeros": up_nonzeros}]
        params = 64 * d_ff + 4096
        return {"workdir": "x", "step": 1, "model": {k: 1 for k in report.SHAPE_KEYS} | {"d_ff": d_ff},
                "layers": layers, "totals": {"params": params, "nonzero_params": params, "weight_bytes": 4 * params},
                "disk": {"checkpoint_bytes": 10, "checkpoint_param_bytes": 8, "sparse_bytes": None},
                "quality": {"perplexity": 2.0, "bits_per_byte": 1.0},
                "speed": {"backend": "cpu", "forward_ms": forward_ms}}

    ratios, verdicts = report.compare(rep(64, 2048, 1.0), rep(128, 4096, 1.5))
    kinds = {v["saving"]: v for v in verdicts}
    assert kinds["structure"]["verdict"] == report.REAL
    assert "model.d_ff 128 -> 64" in kinds["structure"]["detail"] and "1 layers changed shape" in kinds["structure"]["detail"]
    assert kinds["unstructured sparsity"]["verdict"] == report.SIZE_ONLY
    assert ratios["params"] == (64 * 64 + 4096) / (64 * 128 + 4096) and ratios["forward_speedup"] == 1.5
    assert kinds["forward latency"]["verdict"] == "measured forward speed-up 1.50x"
    assert ratios["decode_speedup"] is None and "decode latency" not in kinds
    _, same = report.compare(rep(128, 4096, 1.0), rep(128, 4096, 1.0))
    assert [v["kind"] for v in same] == ["none", "measured"]


def test_library_report_without_against(runs):
    base, _, _, _ = runs
    got = build_report(base, max_docs=2, batch_size=8, timing_repeats=1)
    assert "against" not in got and "ratios" not in got
    assert got["run"]["step"] == open_run(base).step == 3
    text = report.format_table(got)
    assert "blocks/1/mlp/down" in text and "decode_ms_per_token" in text


def test_report_command_errors(runs, tmp_path, capsys):
    base, _, _, _ = runs
    cases = [
        (["report", f"--workdir={base}", "--agianst=x"], "unknown flag --agianst (did you mean '--against'?)"),
        (["report", f"--workdir={tmp_path}"], "has no checkpoints/ directory"),
        (["report"], "slimjax report needs --workdir"),
        (["report", f"--workdir={base}", "--max_docs=two"], "--max_docs='two' must be an integer"),
        (["report", f"--workdir={base}", "--repeats=0"], "--repeats=0 must be >= 1"),
        (["report", f"--workdir={base}", "--batch_size=12", "--max_docs=1"], "--batch_size=12 must be a multiple"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
