"""Quantization quality, size and speed against the float model, every variant through the CLI.

    python bench/quantize.py                      # the full table (a ~20M model; long on CPU)
    python bench/quantize.py --steps 20 --recover_steps 4 --d_model 64 --n_layers 2 --d_ff 128 \\
        --group 32 --small_group 16 --calibration_samples 16 --max_docs 1 --repeats 1   # a smoke run

1. Float base: a Llama-style decoder (``--d_model``/``--n_layers``/``--d_ff``; 8 query heads over 4
   kv heads, SentencePiece BPE vocabulary of 1024, untied output layer; default ~20M parameters)
   trained ``--steps`` on the bundled plays with ``slimjax train`` (reused when ``--workdir``
   already holds it).
2. ``slimjax quantize`` variants: int8 per-channel, int4 RTN with groups of ``--small_group`` and
   ``--group`` rows, int4 GPTQ (``--group``), adaptive widths (loss sensitivity, candidates
   2,3,4,8) at the int4-RTN-``--group`` byte budget and at 3 bits per weight.
3. QAT recovery: ``slimjax train --config.slim.recipe=('qat',)`` (int4, ``--group``) from the float
   run for ``--recover_steps``, then quantized by RTN int4 ``--group``.
4. qwix (0.1.8's array API: ``qwix.quantize`` / ``qwix.dequantize``, its model-level PTQ does not
   run on the slimjax decoder; see tests/test_quantize.py::test_matches_qwix) at int8 per-channel
   and int4 ``--group``: its dequantized weights written as a plain run.
5. Every variant: ``slimjax report --against=BASE`` on the same held-out documents: perplexity
   delta, parameter bytes as held, checkpoint bytes, forward latency.

Prints a table and writes ``bench/results/quantize.json`` with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune import cli, done, model_flags  # noqa: E402
from table import finish, print_table  # noqa: E402


def train(workdir: str, steps: int, extra: list[str], a, log: str) -> float:
    return cli("train", *model_flags(a), f"--workdir={workdir}", f"--config.train.steps={steps}",
               f"--config.checkpoint.every_steps={steps}", f"--config.optimizer.learning_rate={a.lr}", *extra, log=log)


def report(workdir: str, base: str, a, log: str) -> dict:
    out = os.path.join(workdir, "report.json")
    if not done(workdir):  # a rerun with the same --workdir reuses finished variants
        cli("report", f"--workdir={workdir}", f"--against={base}", f"--out={out}", f"--max_docs={a.max_docs}",
            f"--repeats={a.repeats}", log=log)
    return json.load(open(out))


def row(name: str, rep: dict, seconds: float, workdir: str) -> dict:
    run, r = rep["run"], rep["ratios"]
    q = os.path.join(workdir, "quantize.json")
    bits = json.load(open(q))["bits_per_weight"] if os.path.isfile(q) else None
    return {"variant": name, "perplexity": run["quality"]["perplexity"], "ppl_delta_pct": r["perplexity_delta_pct"],
            "bits_per_weight": bits, "weight_bytes": run["totals"]["weight_bytes"], "bytes_ratio": r["weight_bytes"],
            "checkpoint_param_bytes": run["disk"]["checkpoint_param_bytes"], "forward_ms": run["speed"]["forward_ms"],
            "forward_speedup": r["forward_speedup"], "seconds": round(seconds, 1),
            "verdict": "; ".join(v["verdict"] for v in rep["verdicts"])}


def qwix_run(base: str, out: str, bits: int, group: int) -> None:
    """Writes the float run ``base`` with every block kernel replaced by qwix's RTN (symmetric,
    absmax, per output channel, ``group`` input rows per tile; 0: per channel) dequantized."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix

    from slimjax.cli.rundir import open_run, write_run
    from slimjax.sharding import path_str
    from slimjax.slim.oneshot import _unflatten
    from slimjax.slim.ptq import PtqOptions, quant_matrices

    rd = open_run(base)
    params = rd.restore_params()
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    qtype = {8: jnp.int8, 4: jnp.int4}[bits]
    for lm in quant_matrices(rd.spec, PtqOptions()):
        w = np.asarray(jax.device_get(lm.read(flat)), np.float32)
        qa = qwix.quantize(jnp.asarray(w), qtype, channelwise_axes=(1,), tiled_axes={0: group} if group else None,
                           calibration_method="absmax")
        lm.write(flat, jnp.asarray(qwix.dequantize(qa), jnp.float32))
    new = jax.device_put(_unflatten(params, flat), rd.shardings())
    summary = {"source": rd.workdir, "qwix": getattr(qwix, "__version__", "?"),
               "bits": bits, "group_size": group, "line": f"qwix int{bits} g{group} dequantized"}
    write_run(rd, out, rd.cfg, rd.spec, new, None, summary, kind="qwix",
              report_file="qwix.json", doc="Block kernels replaced by qwix's dequantized RTN weights.\n")


def targets(rows: list[dict]) -> list[dict]:
    by = {r["variant"]: r for r in rows}

    def ppl(v: str) -> float:
        return by[v]["ppl_delta_pct"] if v in by else float("nan")

    def perp(v: str) -> float:
        return by[v]["perplexity"] if v in by else float("nan")

    out = [{"name": "int8 per-channel perplexity delta %", "value": ppl("int8"), "target": 0.3,
            "met": ppl("int8") <= 0.3},
           {"name": "int4 gptq g-large perplexity delta %", "value": ppl("int4-gptq-g"), "target": 3.0,
            "met": ppl("int4-gptq-g") <= 3.0},
           {"name": "int4 gptq better than int4 rtn (perplexity, rtn's)", "value": perp("int4-gptq-g"),
            "target": perp("int4-rtn-g"), "met": perp("int4-gptq-g") < perp("int4-rtn-g")},
           {"name": "adaptive at int4-rtn bytes better than int4 rtn (perplexity, uniform's)",
            "value": perp("adaptive-int4-bytes"), "target": perp("int4-rtn-g"),
            "met": perp("adaptive-int4-bytes") < perp("int4-rtn-g")}]
    for ours, theirs in (("int8", "qwix-int8"), ("int4-rtn-g", "qwix-int4-g")):
        out.append({"name": f"slimjax {ours} at least as good as {theirs} (perplexity, qwix's)",
                    "value": perp(ours), "target": perp(theirs), "met": perp(ours) <= perp(theirs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="float base steps")
    ap.add_argument("--recover_steps", type=int, default=100, help="QAT recovery steps")
    ap.add_argument("--d_model", type=int, default=384)
    ap.add_argument("--n_layers", type=int, default=12)
    ap.add_argument("--d_ff", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--group", type=int, default=128, help="the int4 group size (rows per scale)")
    ap.add_argument("--small_group", type=int, default=32)
    ap.add_argument("--calibration_samples", type=int, default=128)
    ap.add_argument("--max_docs", type=int, default=0, help="held-out documents per report (0: all three plays)")
    ap.add_argument("--repeats", type=int, default=10, help="timed forward calls per report")
    ap.add_argument("--workdir", default="", help="keep runs here (default: a temporary directory)")
    ap.add_argument("--qwix", nargs=4, metavar=("BASE", "OUT", "BITS", "GROUP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.qwix:  # the qwix variant, in its own process
        qwix_run(a.qwix[0], a.qwix[1], int(a.qwix[2]), int(a.qwix[3]))
        return
    root = a.workdir or tempfile.mkdtemp(prefix="bench_quantize_")
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "log.txt")
    print(f"runs and log in {root}", flush=True)
    base = os.path.join(root, "dense")
    seconds = 0.0 if os.path.isdir(os.path.join(base, "checkpoints", str(a.steps))) else train(base, a.steps, [], a, log)
    base_rep = report(base, base, a, log)
    rows = [row("float", base_rep, seconds, base)]
    print_table(rows, list(rows[0]))
    g, sg, cal = a.group, a.small_group, f"--calibration_samples={a.calibration_samples}"

    def variant(name: str, *flags: str, source: str = base) -> None:
        out = os.path.join(root, name)
        seconds = 0.0
        if not done(out):
            shutil.rmtree(out, ignore_errors=True)
            seconds = cli("quantize", f"--workdir={source}", f"--out={out}", *flags, log=log)
        rows.append(row(name, report(out, base, a, log), seconds, out))
        print_table(rows[-1:], list(rows[-1]))

    variant("int8", "--bits=8")
    variant("int4-rtn-sg", "--bits=4", f"--group_size={sg}")
    variant("int4-rtn-g", "--bits=4", f"--group_size={g}")
    variant("int4-gptq-g", "--bits=4", f"--group_size={g}", "--method=gptq", cal)
    int4_bytes = json.load(open(os.path.join(root, "int4-rtn-g", "quantize.json")))["bytes"]
    variant("adaptive-int4-bytes", f"--budget_bytes={int4_bytes}", f"--group_size={g}", cal)
    variant("adaptive-3bit", "--budget_bits=3", f"--group_size={g}", cal)

    qat = os.path.join(root, "qat")
    t0 = time.perf_counter()
    if not done(os.path.join(root, "qat-int4-rtn-g")):
        shutil.rmtree(qat, ignore_errors=True)
        train(qat, a.recover_steps, ["--config.slim.recipe=('qat',)", "--config.slim.qat.bits=4",
                                     f"--config.slim.qat.group_size={g}", f"--config.checkpoint.init_from={base}",
                                     f"--config.optimizer.warmup_steps={max(1, a.recover_steps // 10)}"], a, log)
    variant("qat-int4-rtn-g", "--bits=4", f"--group_size={g}", source=qat)
    rows[-1]["seconds"] = round(rows[-1]["seconds"] + time.perf_counter() - t0, 1)

    for name, bits, group in (("qwix-int8", 8, 0), ("qwix-int4-g", 4, g)):
        out = os.path.join(root, name)
        t0 = time.perf_counter()
        if not done(out):
            shutil.rmtree(out, ignore_errors=True)
            with open(log, "a") as f:
                result = subprocess.run([sys.executable, os.path.abspath(__file__), "--qwix", base, out, str(bits),
                                         str(group)], stdout=f, stderr=subprocess.STDOUT)
            if result.returncode:
                raise SystemExit(f"the qwix variant {name} failed; see {log}")
        rows.append(row(name, report(out, base, a, log), time.perf_counter() - t0, out))
        print_table(rows[-1:], list(rows[-1]))

    columns = ["variant", "perplexity", "ppl_delta_pct", "bits_per_weight", "weight_bytes", "bytes_ratio",
               "checkpoint_param_bytes", "forward_ms", "forward_speedup", "seconds"]
    finish("quantize", rows, columns, targets(rows), {
        "args": {k: v for k, v in vars(a).items() if k != "qwix"},
        "model": base_rep["run"]["model"], "float_params": base_rep["run"]["totals"]["params"],
        "held_out_documents": base_rep["documents"],
        "not_measured": "W8A8 (int8 activations) is not implemented; quantized layers dequantize then multiply "
                        "in float, so int storage saves bytes only (see each row's verdict and forward_speedup)"})


if __name__ == "__main__":
    main()
