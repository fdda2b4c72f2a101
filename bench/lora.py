"""LoRA fine-tuning against full fine-tuning, on a domain shift from the plays to Python source.

    python bench/lora.py                                  # ~12 min on a quiet 2-core CPU
    python bench/lora.py --before /tmp/before             # + train_throughput there vs here (~12 min more)

1. Base: the tiny config (configs/base.py: ~0.9M-parameter Llama-style decoder, SentencePiece BPE
   vocabulary of 1024 trained on the plays) trained ``--base_steps`` on the plays.
2. Adaptation corpus: ``stdlib`` (Python's own sources), tokenised with the *base run's* tokenizer;
   2% of its documents are held out, and every eval below is the mean NLL per token over the same
   ``--eval_batches`` held-out batches.
3. Base eval on stdlib: the base parameters restored through ``checkpoint.init_from`` with no
   transform, evaluated before any step.
4. Fine-tunes, each in a fresh workdir and its own subprocess (so peak RSS is per variant), all from
   the base run (``checkpoint.init_from``) for ``--ft_steps`` on the same data in the same order:
   full fine-tuning at each of ``--full_lrs``, LoRA r=8 at each of ``--lora_lrs`` (a small sweep),
   then LoRA at the other ``--ranks`` with the lr that was best at r=8, and r=8 on the projections
   alone (embedding table frozen) as a reference. LoRA targets (``--lora_targets``): every
   projection and the embedding table. The best full-FT lr is the reference. Recovered improvement = (base_eval - lora_eval) / (base_eval - full_eval).
   Per variant: trainable parameters (leaves of the state's ``params``) against the base model's,
   optimizer-state bytes (``make_setup(...).abstract.opt_state``), median step time (slimjax's
   summary), process peak RSS (``ru_maxrss`` of the variant's subprocess, which includes the data
   pipeline) and XLA's memory analysis of the compiled train step (arguments + outputs - aliased
   + temporaries).
5. With ``--before TREE`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/before
   b7cbda5``): ``bench/train_throughput.py`` run from that tree and from this one, alternately for
   ``--tp_rounds`` rounds, in subprocesses that import slimjax from the respective tree; the median
   tokens/s and MFU per case and their after/before ratios.

Prints a table and writes ``bench/results/lora.json`` with the targets of the issue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import print_table, write_result  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every attention and MLP projection, and the (tied) embedding table: on a vocabulary shift the
# table is what moves most (see the README: without it LoRA recovers ~68%).
LORA_TARGETS = ("attn/w[qkvo]$", "mlp/(gate|up|down)$", "^embed$")


# --------------------------------------------------------------------------- child jobs (one process each)

def _ft_config(args: dict, lr: float, recipe: tuple, rank: int, targets: tuple = ()):
    from slimjax.configs import base
    from slimjax.data import tokenizer

    c = base.get_config()
    base_dir = os.path.join(args["workdir"], "base")
    c.data.sources = ({"kind": "stdlib", "weight": 1.0},)
    c.data.tokenizer_kind = "sentencepiece"
    c.data.tokenizer = str(tokenizer.cached_model_path(base_dir))
    c.checkpoint.init_from = base_dir
    c.checkpoint.every_steps = args["ft_steps"]
    c.checkpoint.async_save = False
    t = c.train
    t.steps, t.eval_every, t.log_every = args["ft_steps"], args["ft_steps"], 10
    t.eval_batches, t.sample_tokens, t.progress = args["eval_batches"], 0, False
    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = max(1, args["ft_steps"] // 10)
    c.slim.recipe = recipe
    c.slim.lora.rank = rank
    if targets:
        c.slim.lora.targets = tuple(targets)
    return c


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001  (backends without it)
        return {"error": repr(e)}
    if m is None:
        return {"error": "memory_analysis() returned None"}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    out = {k: int(getattr(m, k, 0) or 0) for k in keys}
    out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                          - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def _state_counts(setup) -> dict:
    import jax

    from slimjax.train.step import tree_bytes

    a = setup.abstract
    n = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    return {"trainable_params": n(a.params), "frozen_params": n(a.frozen), "opt_state_bytes": tree_bytes(a.opt_state),
            "param_bytes": tree_bytes(a.params) + tree_bytes(a.frozen), "state_bytes": tree_bytes(a)}


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(job: dict) -> dict:
    import slimjax
    from slimjax.configs import base

    args = job["args"]
    kind = job["kind"]
    if kind == "base":
        c = base.get_config()
        c.train.steps, c.train.eval_every, c.checkpoint.every_steps = args["base_steps"], args["base_steps"], args["base_steps"]
        c.train.eval_batches, c.train.sample_tokens, c.train.progress = args["eval_batches"], 0, False
        s = slimjax.train(c, os.path.join(args["workdir"], "base"))
        return {"eval_loss_plays": s["final_eval_loss"], "final_train_loss": s["final_train_loss"],
                "steps": s["final_step"], "n_params": s["n_params"], "tokens_per_s": s["tokens_per_s"],
                "step_time_s": s["step_time_s"], "wall_time_s": s["wall_time_s"]}
    if kind == "base_eval":
        from slimjax.config import validate
        from slimjax.train.loop import evaluate_loss
        from slimjax.train.run import build_run, prepare_workdir

        cfg = validate(_ft_config(args, 1e-3, (), 8))
        run = build_run(cfg, prepare_workdir(job["workdir"]))
        try:
            loss = evaluate_loss(run)
        finally:
            run.checkpointer.close()
        return {"eval_loss": loss, "data": run.data_stats, **_state_counts(run.setup)}
    if kind == "scale":  # trainable share of LoRA r=8 at larger shapes: abstract only, nothing trained
        from slimjax.config import validate
        from slimjax.models import compute_dtype
        from slimjax.sharding import Rules, make_mesh
        from slimjax.slim.spec import spec_from_config
        from slimjax.train import optimizer as optim
        from slimjax.train.state import make_setup

        out = {}
        for name in ("llama_1b",):
            import importlib

            c = importlib.import_module(f"slimjax.configs.{name}").get_config()
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
            counts = {}
            for recipe in ((), ("lora",)):
                c.slim.recipe, c.slim.lora.rank = recipe, 8
                c.slim.lora.targets = tuple(job.get("targets", LORA_TARGETS))
                cfg = validate(c)
                setup = make_setup(spec_from_config(cfg), compute_dtype("float32"),
                                   optim.make_optimizer(cfg.optimizer, cfg.train.steps), Rules.from_config(cfg.mesh),
                                   make_mesh(cfg.mesh))
                counts["lora" if recipe else "full"] = _state_counts(setup)
            out[name] = {"n_params": counts["full"]["trainable_params"],
                         "lora_r8_trainable_params": counts["lora"]["trainable_params"],
                         "lora_r8_trainable_fraction": counts["lora"]["trainable_params"] / counts["full"]["trainable_params"],
                         "lora_r8_opt_state_fraction": counts["lora"]["opt_state_bytes"] / counts["full"]["opt_state_bytes"]}
        return out
    # kind == "ft"
    from slimjax.train.hooks import Hook

    seen = {}

    def grab(ctx):
        seen["memory"] = _memory(ctx.run.train_step)
        seen.update(_state_counts(ctx.run.setup))

    recipe = ("lora",) if job["lora"] else ()
    c = _ft_config(args, job["lr"], recipe, job.get("rank", 8), tuple(job.get("targets", ())))
    shutil.rmtree(job["workdir"], ignore_errors=True)  # a fresh run, never a resume
    s = slimjax.train(c, job["workdir"], hooks=[Hook(0, grab, "bench_mem")])
    return {"eval_loss": s["final_eval_loss"], "final_train_loss": s["final_train_loss"], "steps": s["final_step"],
            "step_time_s": s["step_time_s"], "tokens_per_s": s["tokens_per_s"], "compile_time_s": s["compile_time_s"],
            "wall_time_s": s["wall_time_s"], "peak_rss_bytes": _peak_rss_bytes(), **seen}


def run_child(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job), "--child_out", out],
                   check=True, cwd=REPO)
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- throughput before/after

LAUNCH = r"""
import importlib.util, runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
import slimjax
assert slimjax.__file__.startswith(root), slimjax.__file__
spec = importlib.util.spec_from_file_location("slimjax.configs", root + "/configs/__init__.py",
                                              submodule_search_locations=[root + "/configs"])
mod = importlib.util.module_from_spec(spec); sys.modules["slimjax.configs"] = mod; spec.loader.exec_module(mod)
script = root + "/bench/train_throughput.py"
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def throughput(tree: str, cases: str, steps: int) -> dict:
    """``bench/train_throughput.py`` of ``tree`` with slimjax (and its configs) imported from ``tree``."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    subprocess.run([sys.executable, "-c", LAUNCH, tree, "--cases", cases, "--steps", str(steps), "--out", out],
                   check=True, cwd=tempfile.gettempdir(), env=env)
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    return res


def git_rev(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "slimjax_bench_lora"))
    ap.add_argument("--base_steps", type=int, default=200)
    ap.add_argument("--ft_steps", type=int, default=100)
    ap.add_argument("--eval_batches", type=int, default=16)
    ap.add_argument("--full_lrs", default="1e-3,3e-3,1e-2", help="full fine-tuning lrs (best is the reference)")
    ap.add_argument("--lora_lrs", default="5e-3,1e-2,2e-2", help="LoRA r=8 lr sweep (best is used at every rank)")
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                    help="slim.lora.targets of every LoRA variant (default: every projection and the embedding table)")
    ap.add_argument("--before", default="", help="a checkout of the 'before' commit for the throughput comparison")
    ap.add_argument("--tp_cases", default="tiny:1,llama_20m:1")
    ap.add_argument("--tp_steps", type=int, default=20)
    ap.add_argument("--tp_rounds", type=int, default=3)
    ap.add_argument("--child", default="")
    ap.add_argument("--child_out", default="")
    a = ap.parse_args()
    if a.child:
        res = child(json.loads(a.child))
        with open(a.child_out, "w") as f:
            json.dump(res, f)
        return

    t_all = time.perf_counter()
    args = {"workdir": os.path.abspath(a.workdir), "base_steps": a.base_steps, "ft_steps": a.ft_steps,
            "eval_batches": a.eval_batches}
    wd = lambda name: os.path.join(args["workdir"], name)  # noqa: E731
    print(f"base: {a.base_steps} steps on the plays", flush=True)
    base_res = run_child({"kind": "base", "args": args})
    print(f"  plays eval loss {base_res['eval_loss_plays']:.4f}", flush=True)
    base_eval = run_child({"kind": "base_eval", "args": args, "workdir": wd("base_eval")})
    print(f"  stdlib eval loss before fine-tuning {base_eval['eval_loss']:.4f}", flush=True)

    variants = []

    targets = tuple(a.lora_targets.split(","))

    def ft(name, lora, lr, rank=8, lora_targets=targets):
        print(f"{name}: lr {lr:g}", flush=True)
        r = run_child({"kind": "ft", "args": args, "lora": lora, "lr": lr, "rank": rank, "workdir": wd(name),
                       "targets": list(lora_targets)})
        r.update(variant=name, method="lora" if lora else "full", rank=rank if lora else None, lr=lr,
                 targets=list(lora_targets) if lora else None)
        print(f"  eval {r['eval_loss']:.4f}  step {r['step_time_s'] * 1e3:.0f} ms  rss {r['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
        variants.append(r)
        return r

    fulls = [ft(f"full_lr{lr}", False, float(lr)) for lr in a.full_lrs.split(",")]
    full = min(fulls, key=lambda r: r["eval_loss"])
    lora8s = [ft(f"lora_r8_lr{lr}", True, float(lr), 8) for lr in a.lora_lrs.split(",")]
    lora8 = min(lora8s, key=lambda r: r["eval_loss"])
    by_rank = {8: lora8}
    for rank in [int(r) for r in a.ranks.split(",") if int(r) != 8]:
        by_rank[rank] = ft(f"lora_r{rank}_lr{lora8['lr']:g}", True, lora8["lr"], rank)
    # Reference: r=8 on the projections alone (PEFT's usual target set), the embedding table frozen.
    proj = tuple(t for t in targets if "embed" not in t)
    if proj != targets:
        ft(f"lora_r8_projections_only_lr{lora8['lr']:g}", True, lora8["lr"], 8, proj)

    base_loss, full_gain = base_eval["eval_loss"], base_eval["eval_loss"] - full["eval_loss"]
    n_base = full["trainable_params"]
    for r in variants:
        r["trainable_fraction"] = r["trainable_params"] / n_base
        r["opt_state_fraction"] = r["opt_state_bytes"] / full["opt_state_bytes"]
        r["improvement"] = base_loss - r["eval_loss"]
        r["improvement_recovered"] = r["improvement"] / full_gain if full_gain > 0 else float("nan")

    scale = run_child({"kind": "scale", "args": args, "targets": list(targets)})

    tp = None
    if a.before:
        # Alternate before/after for --tp_rounds rounds (the machine's load drifts): per case, the
        # median over rounds of tokens/s and of MFU (each step paired with a reference matmul).
        trees = {"before": os.path.abspath(a.before), "after": REPO}
        runs = {"before": [], "after": []}
        for i in range(a.tp_rounds):
            for label in ("before", "after"):
                print(f"train_throughput round {i + 1} at {label} ({git_rev(trees[label])}): {a.tp_cases}", flush=True)
                runs[label].append(throughput(trees[label], a.tp_cases, a.tp_steps))
        cases = []
        for j, row in enumerate(runs["after"][0]["rows"]):
            med = {label: {k: statistics.median(r["rows"][j][k] for r in runs[label]) for k in ("tokens_per_s", "mfu")}
                   for label in runs}
            cases.append({"case": row["case"], "devices": row["devices"], "params": row["params"],
                          "rounds": a.tp_rounds,
                          "before_tokens_per_s": med["before"]["tokens_per_s"],
                          "after_tokens_per_s": med["after"]["tokens_per_s"],
                          "before_mfu": med["before"]["mfu"], "after_mfu": med["after"]["mfu"],
                          "after_over_before": med["after"]["tokens_per_s"] / med["before"]["tokens_per_s"],
                          "after_over_before_mfu": med["after"]["mfu"] / med["before"]["mfu"]})
        tp = {"before_commit": git_rev(trees["before"]), "after_commit": git_rev(REPO), "steps": a.tp_steps,
              "cases": cases, "raw": runs}

    rows = [{"variant": "base (no fine-tuning)", "lr": "", "trainable": base_eval["trainable_params"],
             "eval loss": base_loss}]
    for r in variants:
        rows.append({"variant": r["variant"] + (" *" if r is full or r is lora8 else ""), "lr": r["lr"],
                     "trainable": r["trainable_params"], "% params": 100 * r["trainable_fraction"],
                     "opt state KiB": r["opt_state_bytes"] / 1024, "% opt state": 100 * r["opt_state_fraction"],
                     "eval loss": r["eval_loss"], "recovered": r["improvement_recovered"],
                     "step ms": 1e3 * r["step_time_s"], "peak RSS MiB": r["peak_rss_bytes"] / 2**20,
                     "XLA step MiB": r["memory"].get("total_bytes", float("nan")) / 2**20})
    print()
    print_table(rows, ["variant", "lr", "trainable", "% params", "opt state KiB", "% opt state", "eval loss",
                       "recovered", "step ms", "peak RSS MiB", "XLA step MiB"])
    print("(* the reference full fine-tune and the r=8 LoRA the targets use: best eval loss of their lr sweeps)")
    if tp:
        print()
        print_table([{"case": f"{c['case']} x{c['devices']}", "before tok/s": c["before_tokens_per_s"],
                      "after tok/s": c["after_tokens_per_s"], "after/before": c["after_over_before"],
                      "MFU before": c["before_mfu"], "MFU after": c["after_mfu"]} for c in tp["cases"]],
                    ["case", "before tok/s", "after tok/s", "after/before", "MFU before", "MFU after"])

    targets = [
        {"name": "lora_r8_trainable_fraction", "value": lora8["trainable_fraction"], "target": "<= 0.01",
         "met": lora8["trainable_fraction"] <= 0.01},
        {"name": "lora_r8_opt_state_fraction_of_full", "value": lora8["opt_state_fraction"], "target": "<= 0.02",
         "met": lora8["opt_state_fraction"] <= 0.02},
        {"name": "lora_r8_improvement_recovered", "value": lora8["improvement_recovered"], "target": ">= 0.90",
         "met": bool(lora8["improvement_recovered"] >= 0.90)},
    ]
    for c in (tp or {}).get("cases", []):  # item 5: the seam must not slow training (3% allowed for noise)
        targets.append({"name": f"train_throughput_{c['case']}_x{c['devices']}_mfu_after_over_before",
                        "value": c["after_over_before_mfu"], "target": ">= 0.97",
                        "met": bool(c["after_over_before_mfu"] >= 0.97)})
    print()
    for t in targets:
        print(f"{t['name']}: {t['value']:.4f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    import jax

    path = write_result("lora", {
        "command": "python bench/lora.py" + (f" --before {a.before}" if a.before else ""),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_rev(REPO), "jax": jax.__version__,
        "settings": {k: v for k, v in vars(a).items() if not k.startswith("child")},
        "base": base_res, "base_stdlib_eval": base_eval, "reference_full": full["variant"],
        "lora_r8": lora8["variant"], "variants": variants, "larger_shapes_abstract": scale,
        "throughput_item5": tp, "total_wall_s": time.perf_counter() - t_all, "targets": targets})
    print(f"\nwrote {path}  ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
