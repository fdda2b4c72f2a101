"""Pruning quality, size and speed against the dense model, every variant through the CLI.

    python bench/prune.py                         # ~60 min on a quiet 2-core CPU
    python bench/prune.py --steps 100 --recover_steps 20 --max_docs 4   # a smoke run, ~10 min

A rerun with the same ``--workdir`` reuses every variant that has its report (``--variants``
picks some by name).

1. Dense base: a Llama-style decoder (``--d_model``/``--n_layers``/``--d_ff``; 8 query heads over 4
   kv heads, head_dim 32, SentencePiece BPE vocabulary of 1024, untied output layer; default ~5M
   parameters) trained ``--steps`` on the bundled plays with ``slimjax train``.
2. One-shot: ``slimjax prune`` with magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4
   (calibration: ``--calibration_samples`` rows of the training stream), and structured removal
   of 25% of heads (one kv group of four) and 25% of MLP neurons.
3. Recovery: each pruned run fine-tuned ``--recover_steps`` with ``slimjax train
   --config=PRUNED/config.py`` (masks fixed; structured: the smaller dense model). Recovery is
   more training, so recovered variants are compared with the dense base trained the same
   ``--recover_steps`` more (``checkpoint.init_from``, the same schedule): "dense +N steps".
4. Sparse training from scratch: gradual magnitude pruning (cubic schedule, Zhu & Gupta) and RigL
   (ERK) to 50% and 80%, each trained ``--sparse_steps`` (default ``--steps``) and compared with a
   dense model trained as many steps.
5. Every variant: ``slimjax export --sparse`` then ``slimjax report --against=REFERENCE`` on the same
   held-out documents (``--max_docs`` of hamlet, the-tempest, twelfth-night): perplexity delta,
   parameters, bytes on disk (checkpoint and sparse store), forward latency speed-up (median of
   ``--repeats``) and the report's verdict (size-only or real).

Prints a table and writes ``bench/results/prune.json`` with the issue's targets.
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
from table import finish, print_table  # noqa: E402

ONESHOT = [("magnitude-50%", ["--method=magnitude", "--sparsity=0.5"]),
           ("wanda-50%", ["--method=wanda", "--sparsity=0.5"]),
           ("sparsegpt-50%", ["--method=sparsegpt", "--sparsity=0.5"]),
           ("magnitude-2:4", ["--method=magnitude", "--nm=2:4"]),
           ("wanda-2:4", ["--method=wanda", "--nm=2:4"]),
           ("sparsegpt-2:4", ["--method=sparsegpt", "--nm=2:4"]),
           ("structured-25%", ["--heads=0.25", "--mlp=0.25"])]
SPARSE_TRAINING = [("gradual-50%", "gradual", 0.5), ("gradual-80%", "gradual", 0.8),
                   ("rigl-50%", "rigl", 0.5), ("rigl-80%", "rigl", 0.8)]


def cli(*args: str, log: str) -> float:
    """Runs ``slimjax ARGS`` in a subprocess (output appended to ``log``); returns its seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ slimjax {' '.join(args)}\n")
        f.flush()
        result = subprocess.run([sys.executable, "-m", "slimjax.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"slimjax {args[0]} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - t0


def model_flags(a: argparse.Namespace) -> list[str]:
    m = {"d_model": a.d_model, "n_layers": a.n_layers, "n_heads": 8, "n_kv_heads": 4, "head_dim": a.d_model // 8,
         "d_ff": a.d_ff, "tie_embeddings": False, "vocab_size": 1024}
    t = {"global_batch_size": 16, "log_every": 25, "eval_every": 100_000, "eval_batches": 4, "progress": False,
         "sample_tokens": 0}
    return ([f"--config.model.{k}={v}" for k, v in m.items()] + [f"--config.train.{k}={v}" for k, v in t.items()]
            + ["--config.data.seq_len=128", "--config.checkpoint.async_save=False"])


def train(workdir: str, steps: int, extra: list[str], a, log: str, config: str | None = None) -> float:
    flags = [f"--config={config}"] if config else model_flags(a)
    return cli("train", *flags, f"--workdir={workdir}", f"--config.train.steps={steps}",
               f"--config.checkpoint.every_steps={steps}", f"--config.optimizer.learning_rate={a.lr}",
               *extra, log=log)


def recover_flags(a) -> list[str]:
    return [f"--config.optimizer.warmup_steps={max(1, a.recover_steps // 10)}"]


def done(workdir: str) -> bool:
    """Whether a variant's run and report are complete (a rerun with the same --workdir reuses them)."""
    return os.path.isfile(os.path.join(workdir, "report.json"))


def report(workdir: str, base: str, a, log: str) -> dict:
    out = os.path.join(workdir, "report.json")
    if done(workdir):
        return json.load(open(out))
    if not os.path.isdir(os.path.join(workdir, "sparse")):
        cli("export", f"--workdir={workdir}", "--sparse", log=log)
    cli("report", f"--workdir={workdir}", f"--against={base}", f"--out={out}", f"--max_docs={a.max_docs}",
        f"--repeats={a.repeats}", log=log)
    return json.load(open(out))


def row(name: str, stage: str, rep: dict, seconds: float) -> dict:
    run, r = rep["run"], rep["ratios"]
    sparse = run["disk"]["sparse_bytes"]
    return {"variant": name, "stage": stage, "perplexity": run["quality"]["perplexity"],
            "ppl_delta_pct": r["perplexity_delta_pct"], "sparsity": run["totals"]["sparsity"],
            "params": run["totals"]["params"], "nonzero_params": run["totals"]["nonzero_params"],
            "checkpoint_bytes": run["disk"]["checkpoint_param_bytes"], "sparse_bytes": sparse,
            "bytes_ratio": r["smallest_copy_bytes"], "forward_ms": run["speed"]["forward_ms"],
            "forward_speedup": r["forward_speedup"], "seconds": round(seconds, 1),
            "verdict": "; ".join(v["verdict"] for v in rep["verdicts"])}


def targets(rows: list[dict]) -> list[dict]:
    by = {(r["variant"], r["stage"]): r for r in rows}

    def ppl(v, stage):
        return by[(v, stage)]["ppl_delta_pct"] if (v, stage) in by else float("nan")

    out = []
    for m in ("wanda", "sparsegpt"):
        one, rec = ppl(f"{m}-50%", "one-shot"), ppl(f"{m}-50%", "recovered")
        out += [{"name": f"{m} 50% one-shot perplexity delta %", "value": one, "target": 25.0, "met": one <= 25.0},
                {"name": f"{m} 50% recovered perplexity delta %", "value": rec, "target": 5.0, "met": rec <= 5.0},
                {"name": f"{m} 50% one-shot better than magnitude (delta %, magnitude's)", "value": one,
                 "target": ppl("magnitude-50%", "one-shot"), "met": one < ppl("magnitude-50%", "one-shot")}]
    ran24 = [ppl(f"{m}-2:4", "recovered") for m in ("magnitude", "wanda", "sparsegpt") if (f"{m}-2:4", "recovered") in by]
    best24 = min(ran24) if ran24 else float("nan")
    out.append({"name": "best 2:4 recovered perplexity delta %", "value": best24, "target": 10.0,
                "met": best24 <= 10.0})
    sp = by.get(("structured-25%", "one-shot"), {}).get("forward_speedup") or float("nan")
    out.append({"name": "structured 25% forward speed-up", "value": sp, "target": 1.2, "met": sp >= 1.2})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="dense base and sparse-training steps")
    ap.add_argument("--recover_steps", type=int, default=100)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--d_ff", type=int, default=768)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--calibration_samples", type=int, default=128)
    ap.add_argument("--max_docs", type=int, default=0, help="held-out documents per report (0: all three plays)")
    ap.add_argument("--repeats", type=int, default=10, help="timed forward calls per report")
    ap.add_argument("--workdir", default="", help="keep runs here (default: a temporary directory)")
    ap.add_argument("--sparse_steps", type=int, default=0,
                    help="gradual / RigL training steps (0: --steps; else a dense run of as many steps is the reference)")
    ap.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    a = ap.parse_args()
    root = a.workdir or tempfile.mkdtemp(prefix="bench_prune_")
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "log.txt")
    print(f"runs and log in {root}", flush=True)
    base = os.path.join(root, "dense")
    rows = []
    if not os.path.isdir(os.path.join(base, "checkpoints", str(a.steps))):
        seconds = train(base, a.steps, [], a, log)
    else:
        seconds = 0.0
    base_rep = report(base, base, a, log)  # its own report: reused by a rerun with the same --workdir
    rows.append(row("dense", "trained", base_rep, seconds))
    print_table(rows[-1:], list(rows[-1]))
    # Recovery is extra training: its reference is the dense model trained as many more steps the same way.
    continued = os.path.join(root, "dense-continued")
    seconds = 0.0
    if not done(continued):
        shutil.rmtree(continued, ignore_errors=True)
        seconds = train(continued, a.recover_steps, [f"--config.checkpoint.init_from={base}", *recover_flags(a)], a, log)
    rows.append(row("dense", f"+{a.recover_steps} steps", report(continued, base, a, log), seconds))
    wanted = set(a.variants.split(",")) if a.variants else None
    for name, flags in ONESHOT:
        if wanted is not None and name not in wanted:
            continue
        pruned = os.path.join(root, name)
        seconds = 0.0
        if not done(pruned):
            shutil.rmtree(pruned, ignore_errors=True)
            calib = [] if "magnitude" in flags[0] else [f"--calibration_samples={a.calibration_samples}"]
            seconds = cli("prune", f"--workdir={base}", f"--out={pruned}", *flags, *calib, log=log)
        rows.append(row(name, "one-shot", report(pruned, base, a, log), seconds))
        recovered = os.path.join(root, name + "-recovered")
        seconds = 0.0
        if not done(recovered):
            shutil.rmtree(recovered, ignore_errors=True)
            seconds = train(recovered, a.recover_steps, recover_flags(a), a, log,
                            config=os.path.join(pruned, "config.py"))
        rows.append(row(name, "recovered", report(recovered, continued, a, log), seconds))
        print_table(rows[-2:], list(rows[-1]))
    steps = a.sparse_steps or a.steps
    reference = base
    if steps != a.steps:  # sparse training is compared with a dense model trained as many steps
        reference = os.path.join(root, f"dense-{steps}")
        seconds = 0.0 if done(reference) else train(reference, steps, [], a, log)
        rows.append(row("dense", f"{steps} steps", report(reference, reference, a, log), seconds))
    for name, schedule, sparsity in SPARSE_TRAINING:
        if wanted is not None and name not in wanted:
            continue
        wd = os.path.join(root, name)
        seconds = 0.0
        if not done(wd):
            shutil.rmtree(wd, ignore_errors=True)
            extra = ["--config.slim.recipe=('prune',)", f"--config.slim.prune.schedule={schedule}",
                     f"--config.slim.prune.sparsity={sparsity}", "--config.slim.prune.begin_step=0",
                     f"--config.slim.prune.end_step={int(steps * 0.75)}",
                     f"--config.slim.prune.every={max(1, steps // 30)}",
                     f"--config.slim.prune.distribution={'erk' if schedule == 'rigl' else 'uniform'}"]
            seconds = train(wd, steps, extra, a, log)
        rows.append(row(name, f"{steps} steps", report(wd, reference, a, log), seconds))
        print_table(rows[-1:], list(rows[-1]))
    columns = ["variant", "stage", "perplexity", "ppl_delta_pct", "sparsity", "params", "checkpoint_bytes",
               "sparse_bytes", "bytes_ratio", "forward_speedup", "seconds"]
    finish("prune", rows, columns, targets(rows), {
        "args": vars(a), "model": base_rep["run"]["model"], "dense_params": base_rep["run"]["totals"]["params"],
        "held_out_documents": base_rep["documents"]})

if __name__ == "__main__":
    main()
