"""`slimjax quantize` end to end on a small trained run: stored codes equal the math module's RTN,
eval / generate / report / export run from them, GPTQ's layer output error is below RTN's on the
same calibration inputs, the adaptive allocation is exact under its budget, recorded, and beats
uniform bits at equal bytes, QAT recovery from the float run (kill -9 and resume bit-exact), and
bad input (one line, exit 2, nothing written)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import flat, snapshot
from test_fault import fingerprints, kill9_then_resume, one_line_error
from test_prune_cli import base_run, cli_here, run, saved, train_argv  # noqa: F401  (base_run: module fixture)

from slimjax.slim import quantize as Q

BLOCK_KERNELS = ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/up", "mlp/gate", "mlp/down")


def quantize(capsys, base, out, *flags):
    result = cli_here(capsys, "quantize", f"--workdir={base}", f"--out={out}", *flags)
    assert result.returncode == 0, result.stderr
    return result


def dequantized(workdir):
    """{kernel path: float32 kernel} of a run's exported (dequantized) parameters."""
    from slimjax.cli.rundir import open_run

    _, params = open_run(workdir).exported_params()
    return {p: np.asarray(x) for p, x in flat(jax.device_get(params)).items()}


def as_matrix(path, layer):
    d_in = 128 if "/down/" in path else 64  # tiny model: d_model 64, d_ff 128; wo reads 8 heads x 8
    return np.asarray(layer).reshape(d_in, -1)


@pytest.fixture(scope="module")
def int4_run(base_run, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("q") / "int4")
    from slimjax.cli import main

    assert main(["quantize", f"--workdir={base_run}", f"--out={out}", "--bits=4", "--group_size=32"]) == 0
    return out


def test_rtn_run_stores_the_math_modules_codes_and_runs_everywhere(base_run, int4_run, tmp_path, capsys):  # noqa: F811
    spec, params, _ = saved(int4_run)
    _, dense, _ = saved(base_run)
    assert [name for name, _ in spec["recipe"]] == ["quant"]
    opts = dict(spec["recipe"][0][1])
    assert (opts["bits"], opts["group_size"], opts["symmetric"]) == (4, 32, True)
    for k in BLOCK_KERNELS:
        codes, scale = params[f"blocks/{k}/tap/codes"], params[f"blocks/{k}/tap/scale"]
        assert codes.dtype == np.uint8 and f"blocks/{k}/kernel" not in params
        for i in range(codes.shape[0]):  # every stacked layer: exactly RTN's codes and scales
            q, s, _ = Q.quantize(as_matrix(f"blocks/{k}/kernel", dense[f"blocks/{k}/kernel"][i]), 4, 32, True)
            np.testing.assert_array_equal(np.asarray(Q.unpack(codes[i], 4)).reshape(q.shape), np.asarray(q))
            np.testing.assert_array_equal(scale[i].reshape(s.shape), np.asarray(s))
    report = json.load(open(os.path.join(int4_run, "quantize.json")))
    assert report["bytes"] == sum(line["bytes"] for line in report["layers"]) and len(report["layers"]) == 14
    assert report["bits_per_weight"] == pytest.approx(5.0)  # 4-bit codes + a float32 scale per 32 weights

    # The quantized run evaluates, samples, reports and exports (dequantized) like any other run.
    assert cli_here(capsys, "eval", f"--workdir={int4_run}", "--max_docs=2").returncode == 0
    assert cli_here(capsys, "generate", f"--workdir={int4_run}", "--prompt=To be", "--max_new_tokens=4").returncode == 0
    rep = str(tmp_path / "report.json")
    result = cli_here(capsys, "report", f"--workdir={int4_run}", f"--against={base_run}", f"--out={rep}",
                      "--max_docs=2", "--repeats=1")
    assert result.returncode == 0, result.stderr
    r = json.load(open(rep))
    assert r["run"]["totals"]["weight_bytes"] < 0.5 * r["against"]["totals"]["weight_bytes"]
    assert [v["saving"] for v in r["verdicts"]][0] == "quantization"
    assert {row["bits"] for row in r["run"]["layers"] if row["name"].startswith("blocks/")} == {4}
    hf = str(tmp_path / "hf")
    assert cli_here(capsys, "export", f"--workdir={int4_run}", f"--out={hf}").returncode == 0
    assert os.path.isfile(os.path.join(hf, "model.safetensors"))
    exported = dequantized(int4_run)
    k = "blocks/mlp/down/kernel"
    want = Q.fake_quantize(as_matrix(k, dense[k][1]), 4, 32, True)
    np.testing.assert_array_equal(as_matrix(k, exported[k][1]), np.asarray(want))


def test_gptq_output_error_is_below_rtn_on_the_same_calibration_inputs(base_run, int4_run, tmp_path, capsys):  # noqa: F811
    from slimjax.cli.rundir import open_run
    from slimjax.slim.calibrate import calibration_batches, collect_stats

    out = str(tmp_path / "gptq")
    quantize(capsys, base_run, out, "--bits=4", "--group_size=32", "--method=gptq", "--calibration_samples=32")
    rd = open_run(base_run)
    dense = {p: np.asarray(x) for p, x in flat(jax.device_get(rd.restore_params())).items()}
    # Block 0's inputs do not depend on any quantized layer: the grams GPTQ was fitted on.
    batches = calibration_batches(rd.cfg, rd.workdir, 32)
    stats = collect_stats(rd.spec, rd.restore_params(), batches, rd.mesh, rd.rules, ["^blocks/0/"], gram=True)
    gptq, rtn = dequantized(out), dequantized(int4_run)
    for k in BLOCK_KERNELS:
        path, gram = f"blocks/{k}/kernel", stats[f"blocks/0/{k}"].gram
        w = as_matrix(path, dense[path][0])
        err_g = float(Q.output_error(w, as_matrix(path, gptq[path][0]), gram))
        err_r = float(Q.output_error(w, as_matrix(path, rtn[path][0]), gram))
        assert err_g < err_r, (k, err_g, err_r)
    report = json.load(open(os.path.join(out, "quantize.json")))
    assert all(0 < line["relative_error"] < 1 for line in report["layers"])


def test_adaptive_allocation_is_exact_recorded_and_beats_uniform_at_equal_bytes(base_run, tmp_path, capsys):  # noqa: F811
    uniform = str(tmp_path / "int3")
    quantize(capsys, base_run, uniform, "--bits=3")
    budget = json.load(open(os.path.join(uniform, "quantize.json")))["bytes"]
    out = str(tmp_path / "adaptive")
    result = quantize(capsys, base_run, out, f"--budget_bytes={budget}", "--calibration_samples=32")
    assert "cost@2" in result.stdout and "blocks/1/mlp/down" in result.stdout  # the table is printed
    report = json.load(open(os.path.join(out, "quantize.json")))
    layers = report["layers"]
    assert report["bytes"] == sum(line["bytes"] for line in layers) <= budget == report["budget_bytes"]
    # The recorded widths are the exact optimum of the recorded sensitivities under the budget.
    sizes = [(*line["shape"], 0, True) for line in layers]
    costs = [[line["sensitivity"][str(b)] for b in (2, 3, 4, 8)] for line in layers]
    bits, cost, used = Q.allocate_bits(sizes, costs, budget, (2, 3, 4, 8))
    assert [line["bits"] for line in layers] == bits and used == report["bytes"]
    assert cost == pytest.approx(report["predicted_cost"])
    assert report["predicted_cost"] < sum(c[1] for c in costs)  # below uniform 3-bit's predicted error
    # The spec carries the allocation; each stored layer decodes within its own width.
    spec, _, _ = saved(out)
    opts = dict(dict(spec["recipe"])["quant"])
    chosen = {line["layer"]: line["bits"] for line in layers}
    assert {e.split("=")[0]: int(e.split("=")[1]) for e in opts["layer_bits"]} == {
        n: b for n, b in chosen.items() if b != opts["bits"]}
    exported = dequantized(out)
    _, dense, _ = saved(base_run)
    for name, b in chosen.items():
        i, k = int(name.split("/")[1]), "/".join(name.split("/")[2:])
        path = f"blocks/{k}/kernel"
        want = Q.fake_quantize(as_matrix(path, dense[path][i]), b, 0, True)
        np.testing.assert_allclose(as_matrix(path, exported[path][i]), np.asarray(want), rtol=1e-6, atol=1e-7)

    def held_out_loss(workdir):
        result = cli_here(capsys, "eval", f"--workdir={workdir}", "--max_docs=4")
        assert result.returncode == 0, result.stderr
        return float(result.stdout.split("loss ")[-1].split(",")[0])

    assert held_out_loss(out) < held_out_loss(uniform)


QAT = ["--config.slim.recipe=('qat',)", "--config.slim.qat.bits=4", "--config.slim.qat.group_size=32"]


def test_qat_recovery_from_the_float_run_resumes_bit_exactly_after_kill9(base_run, tmp_path, capsys):  # noqa: F811
    init = [f"--config.checkpoint.init_from={base_run}", *QAT]
    straight, killed = kill9_then_resume(lambda wd: train_argv(wd, *init, steps=12, every=4), tmp_path, 12, 4)
    assert fingerprints(killed, 12) == fingerprints(straight, 12)
    # Started from the float run (not from scratch), trained through the fake-quantized view,
    # then quantized at the scheme it trained with.
    spec, tuned, _ = saved(straight)
    _, dense, _ = saved(base_run)
    assert [name for name, _ in spec["recipe"]] == ["qat"]
    w0, w1 = dense["blocks/mlp/up/kernel"], tuned["blocks/mlp/up/kernel"]
    assert 0 < np.linalg.norm(w1 - w0) < 0.5 * np.linalg.norm(w0)  # a fresh init would be ~1.4x away
    out = str(tmp_path / "qat_int4")
    quantize(capsys, straight, out, "--bits=4", "--group_size=32")
    spec, _, _ = saved(out)
    assert [name for name, _ in spec["recipe"]] == ["quant"]


BAD = [
    (["--bits=5"], "--bits=5"),
    (["--bits=4", "--group_size=48"], "--group_size=48"),
    (["--budget_bytes=1000"], "--budget_bytes=1000"),
    (["--budget_bits=0.5"], "--budget_bits=0.5"),
    (["--candidates=2,5"], "--candidates"),
    (["--target=nothing_matches"], "--target"),
    (["--method=awq"], "--method"),
    (["--budget_bits=3", "--budget_bytes=100000"], "--budget_bytes"),
    (["--budget_bits=3", "--calibration_samples=100000000"], "--calibration_samples"),
]


@pytest.mark.parametrize("flags,named", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base_run, tmp_path, capsys, flags, named):  # noqa: F811
    before = snapshot(base_run)
    out = str(tmp_path / "out")
    line = one_line_error(cli_here(capsys, "quantize", f"--workdir={base_run}", f"--out={out}", *flags))
    assert named in line, line
    assert not os.path.exists(out)
    assert snapshot(base_run) == before


def test_incompatible_requantization_and_a_used_out_are_refused(int4_run, tmp_path, capsys):
    before = snapshot(int4_run)
    out = str(tmp_path / "out")
    for flags in (["--bits=8", "--group_size=32"], ["--bits=4", "--group_size=16"], ["--bits=4", "--group_size=32", "--asymmetric=true"]):
        line = one_line_error(cli_here(capsys, "quantize", f"--workdir={int4_run}", f"--out={out}", *flags))
        assert "already quantized" in line, line
        assert not os.path.exists(out)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    line = one_line_error(cli_here(capsys, "quantize", f"--workdir={int4_run}", f"--out={used}"))
    assert "--out" in line and os.listdir(used) == ["keep.txt"]
    assert snapshot(int4_run) == before
    # The same scheme at fewer bits is compatible: re-quantized from the dequantized weights.
    again = str(tmp_path / "int2")
    assert cli_here(capsys, "quantize", f"--workdir={int4_run}", f"--out={again}", "--bits=2",
                    "--group_size=32").returncode == 0
    spec, params, _ = saved(again)
    assert dict(spec["recipe"][0][1])["bits"] == 2
    codes = np.asarray(Q.unpack(jnp.asarray(params["blocks/mlp/up/tap/codes"]), 2))
    assert codes.min() >= -2 and codes.max() <= 1
