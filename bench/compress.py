"""Distillation, low-rank factorisation and ``slimjax compress`` against the teacher, every variant through the CLI.

    python bench/compress.py --teacher=RUN            # ~60 min on a quiet 2-core CPU with a 5M teacher
    python bench/compress.py --steps 20 --max_docs 2  # a smoke run (trains its own small teacher)

A rerun with the same ``--workdir`` reuses every variant that has its report (``--variants``
picks some by name).

1. Teacher: ``--teacher`` (a trained run), else a Llama-style decoder trained ``--teacher_steps``
   on the bundled plays (the shape of ``bench/prune.py``'s dense base).
2. The teacher trained ``--steps`` more (the same extra training every variant below gets), the
   fair reference of the trained variants.
3. Half-depth students (every other teacher layer, ``slimjax distill --layers``) trained
   ``--steps``: with KL distillation (T=2, alpha=0.5), with the seed documents' MSE mixture
   (beta * MSE of softened probabilities + gamma * MSE of logits, no KL), and without the teacher
   (the same start and schedule, ``slimjax train``).
4. Low-rank: ``slimjax lowrank`` at -20% of the block parameters, plain SVD and SVD-LLM whitening,
   one-shot and after ``--recover_steps`` of recovery by distillation from the teacher.
5. ``slimjax compress --preset=4x`` (SparseGPT 50% -> distillation -> GPTQ int4 g128), its
   distillation stage ``--steps`` long.
6. Every variant: ``slimjax report --against=TEACHER`` on the same held-out documents: perplexity
   delta, parameters, weight bytes, bytes on disk, forward and decode latency.

Prints a table and writes ``bench/results/compress.json`` with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune import cli, done, train  # noqa: E402
from table import finish, print_table  # noqa: E402

# beta weights a mean over the vocabulary of squared probability differences (each ~1/V^2):
# beta = V makes it the sum over the vocabulary, comparable in size to the hard-label loss.
MSE_MIXTURE = ["--alpha=0", "--mse_probs=1024", "--mse_logits=0.05"]
KL = ["--alpha=0.5", "--temperature=2"]


def report(workdir: str, teacher: str, a, log: str) -> dict:
    out = os.path.join(workdir, "report.json")
    if not done(workdir):
        cli("report", f"--workdir={workdir}", f"--against={teacher}", f"--out={out}", f"--max_docs={a.max_docs}",
            f"--repeats={a.repeats}", log=log)
    return json.load(open(out))


def row(name: str, stage: str, rep: dict, seconds: float) -> dict:
    run, r = rep["run"], rep["ratios"]
    return {"variant": name, "stage": stage, "perplexity": run["quality"]["perplexity"],
            "ppl_delta_pct": r["perplexity_delta_pct"], "params": run["totals"]["params"],
            "nonzero_params": run["totals"]["nonzero_params"], "weight_bytes": run["totals"]["weight_bytes"],
            "smaller_x": 1.0 / r["weight_bytes"], "checkpoint_param_bytes": run["disk"]["checkpoint_param_bytes"],
            "forward_ms": run["speed"]["forward_ms"], "forward_speedup": r["forward_speedup"],
            "decode_speedup": r["decode_speedup"], "seconds": round(seconds, 1),
            "verdict": "; ".join(v["verdict"] for v in rep["verdicts"])}


def targets(rows: list[dict]) -> list[dict]:
    by = {(r["variant"], r["stage"]): r for r in rows}
    nan = float("nan")

    def ppl(v, stage):
        return by[(v, stage)]["ppl_delta_pct"] if (v, stage) in by else nan

    out = []
    plain = ppl("half-depth", "no teacher")
    for name in ("KL", "MSE mixture"):
        got = ppl("half-depth", name)
        out.append({"name": f"half-depth student with {name} beats the undistilled one (ppl delta %, undistilled's)",
                    "value": got, "target": plain, "met": got < plain})
    one, rec = ppl("svd-20%-whitened", "one-shot"), ppl("svd-20%-whitened", "recovered")
    out += [{"name": "SVD -20% whitened one-shot perplexity delta %", "value": one, "target": 40.0, "met": one <= 40.0},
            {"name": "SVD -20% whitened recovered perplexity delta %", "value": rec, "target": 5.0, "met": rec <= 5.0},
            {"name": "whitened SVD better than plain one-shot (delta %, plain's)", "value": one,
             "target": ppl("svd-20%-plain", "one-shot"), "met": one < ppl("svd-20%-plain", "one-shot")}]
    preset = by.get(("compress-4x", "3-quantize"))
    smaller = preset["smaller_x"] if preset else nan
    delta = preset["ppl_delta_pct"] if preset else nan
    cont = [r for (v, st), r in by.items() if v == "teacher" and st.startswith("+")]
    ref = cont[0]["perplexity"] if cont else nan
    vs_cont = 100.0 * (preset["perplexity"] / ref - 1.0) if preset else nan
    out += [{"name": "compress --preset=4x weight bytes smaller (x)", "value": smaller, "target": 4.0,
             "met": smaller >= 4.0},
            {"name": "compress --preset=4x perplexity delta % vs the teacher", "value": delta, "target": 5.0,
             "met": delta <= 5.0},
            {"name": "compress --preset=4x perplexity delta % vs the teacher trained as many more steps",
             "value": vs_cont, "target": 5.0, "met": vs_cont <= 5.0}]
    return out


def fresh(workdir: str) -> bool:
    """True when a variant must be (re)made: not reported yet; a partial run is removed."""
    if done(workdir):
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="", help="a trained run to compress (default: train one here)")
    ap.add_argument("--teacher_steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="student training / recovery steps")
    ap.add_argument("--recover_steps", type=int, default=100, help="low-rank recovery (distillation) steps")
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--d_ff", type=int, default=768)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max_docs", type=int, default=0, help="held-out documents per report (0: all three plays)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per report")
    ap.add_argument("--workdir", default="", help="keep runs here (default: a temporary directory)")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    a = ap.parse_args()
    root = a.workdir or tempfile.mkdtemp(prefix="bench_compress_")
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "log.txt")
    print(f"runs and log in {root}", flush=True)
    teacher = os.path.abspath(a.teacher) if a.teacher else os.path.join(root, "teacher")
    if not a.teacher and not os.path.isdir(os.path.join(teacher, "checkpoints", str(a.teacher_steps))):
        train(teacher, a.teacher_steps, [], a, log)
    rows = []
    out = os.path.join(root, "teacher-report.json")  # written here: a given teacher's directory is not touched
    if not os.path.isfile(out):
        cli("report", f"--workdir={teacher}", f"--against={teacher}", f"--out={out}", f"--max_docs={a.max_docs}",
            f"--repeats={a.repeats}", log=log)
    teacher_rep = json.load(open(out))
    rows.append(row("teacher", "trained", teacher_rep, 0.0))
    print_table(rows, list(rows[0]))
    wanted = set(a.variants.split(",")) if a.variants else None
    want = lambda name: wanted is None or name in wanted  # noqa: E731
    train_flags = ["--config.train.sample_tokens=0", f"--config.checkpoint.every_steps={a.steps}",
                   f"--config.optimizer.warmup_steps={max(1, a.steps // 10)}"]
    recover_flags = ["--config.train.sample_tokens=0", f"--config.checkpoint.every_steps={a.recover_steps}",
                     f"--config.optimizer.warmup_steps={max(1, a.recover_steps // 10)}"]
    half = max(1, teacher_rep["run"]["model"]["n_layers"] // 2)

    # Every variant below trains more: its fair reference is the teacher trained as many more steps the same way.
    continued = os.path.join(root, "teacher-continued")
    seconds = 0.0
    if want("teacher") and fresh(continued):
        seconds = train(continued, a.steps, [f"--config.checkpoint.init_from={teacher}", *train_flags[1:]], a, log)
    if done(continued) or want("teacher"):
        rows.append(row("teacher", f"+{a.steps} steps", report(continued, teacher, a, log), seconds))
        print_table(rows[-1:], list(rows[-1]))

    # Half-depth students: with KL, with the MSE mixture, without the teacher (same start, same schedule).
    kd = os.path.join(root, "half-kd")
    if want("half-depth"):
        for stage, wd, flags in (("KL", kd, KL), ("MSE mixture", os.path.join(root, "half-mse"), MSE_MIXTURE)):
            seconds = 0.0
            if fresh(wd):
                seconds = cli("distill", f"--teacher={teacher}", f"--out={wd}", f"--layers={half}",
                              f"--steps={a.steps}", *flags, *train_flags, log=log)
            rows.append(row("half-depth", stage, report(wd, teacher, a, log), seconds))
            print_table(rows[-1:], list(rows[-1]))
        plain = os.path.join(root, "half-plain")
        seconds = 0.0
        if fresh(plain):
            seconds = cli("train", f"--config={kd}/student_init/config.py", f"--workdir={plain}",
                          f"--config.train.steps={a.steps}", *train_flags, log=log)
        rows.append(row("half-depth", "no teacher", report(plain, teacher, a, log), seconds))
        print_table(rows[-1:], list(rows[-1]))

    # Low-rank at -20% of the block parameters: plain and whitened, one-shot and recovered.
    for name, flags in (("svd-20%-plain", []), ("svd-20%-whitened", ["--method=whitened"])):
        if not want(name):
            continue
        wd = os.path.join(root, name)
        seconds = 0.0
        if fresh(wd):
            seconds = cli("lowrank", f"--workdir={teacher}", f"--out={wd}", "--budget=0.8", *flags, log=log)
        rows.append(row(name, "one-shot", report(wd, teacher, a, log), seconds))
        rec = wd + "-recovered"
        seconds = 0.0
        if fresh(rec):
            seconds = cli("distill", f"--teacher={teacher}", f"--student={wd}", f"--out={rec}",
                          f"--steps={a.recover_steps}", *KL, *recover_flags, log=log)
        rows.append(row(name, "recovered", report(rec, teacher, a, log), seconds))
        print_table(rows[-2:], list(rows[-1]))

    # The compress preset, its distillation stage --steps long.
    if want("compress-4x"):
        from slimjax.cli.compress import PRESETS, STAGES_DIR

        stages = PRESETS["4x"].replace("distill --steps=200", f"distill --steps={a.steps} " + " ".join(train_flags))
        wd = os.path.join(root, "compress-4x")
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(wd, "compress.json")):
            cli("compress", f"--workdir={teacher}", f"--out={wd}", f"--stages={stages}", "--report_docs=1",
                "--repeats=1", log=log)
        seconds = time.perf_counter() - t0
        for stage in sorted(os.listdir(os.path.join(wd, STAGES_DIR))):
            rows.append(row("compress-4x", stage, report(os.path.join(wd, STAGES_DIR, stage), teacher, a, log),
                            seconds if stage.startswith("3") else 0.0))
        print_table(rows[-3:], list(rows[-1]))

    columns = ["variant", "stage", "perplexity", "ppl_delta_pct", "params", "weight_bytes", "smaller_x",
               "checkpoint_param_bytes", "forward_speedup", "decode_speedup", "seconds"]
    finish("compress", rows, columns, targets(rows), {
        "args": vars(a), "teacher": teacher, "model": teacher_rep["run"]["model"],
        "teacher_params": teacher_rep["run"]["totals"]["params"], "held_out_documents": teacher_rep["documents"]})

if __name__ == "__main__":
    main()
