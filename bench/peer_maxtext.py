"""Training throughput side by side with MaxText on the same shape, on this machine's CPU.

    python bench/peer_maxtext.py --maxtext_python=/path/to/maxtext-venv/bin/python
    python bench/peer_maxtext.py --maxtext_python=... --slimjax_python=/path/to/py312-venv/bin/python

The script installs and builds nothing. MaxText needs Python >= 3.12 and its own virtualenv
(about 5 minutes and 2.8 GB):

    python3.12 -m venv mt && mt/bin/pip install "maxtext[tpu]==0.2.5"

Both sides train the same Llama-style decoder from ``SHAPE`` (MaxText's ``llama2`` decoder block:
pre-RMSNorm, RoPE base 10000, SwiGLU (``mlp_activations: [silu, linear]``), no biases, untied
output layer; f32 weights and compute, AdamW with weight decay 0.1 and global-norm clipping 1.0,
scan over layers, dropout off, one CPU device each) on synthetic unpacked rows. Each run is a fresh
process; runs alternate (slimjax with ``model.scan_unroll`` 1 and = layers, MaxText at each remat policy; ``--rounds`` times). Per run:
the median step time of the steps after ``--warmup`` (MaxText: its own ``completed step`` lines;
slimjax: each step timed to its metrics on the host), tokens/s, time from process start to the
first finished step, the 1-minute load average when the run ends, and an f32 4096x4096 matmul
timed by this process just before the run (the same cores, the same minute). Model FLOPs for both
come from one formula (``slimjax.train.flops``), so MFU = model FLOP/s / that matmul's FLOP/s.

Differences that remain: MaxText's loop runs its own metrics, and its synthetic data iterator; the
slimjax side feeds two pre-placed batches (its data path is measured in ``bench/data_loader.py``).
Writes ``bench/results/peer_maxtext.json`` (``--name``) with the per-run figures and the ``targets`` entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from table import print_table, write_result


# The shape: 6 layers, d_model 256, 4 heads x 64, SwiGLU 1024, vocab 8192 untied,
# sequence 256, global batch 16.
SHAPE = dict(layers=6, d_model=256, heads=4, head_dim=64, d_ff=1024, vocab=8192, seq_len=256, batch=16)
TARGET_RATIO = 1.5  # slimjax tokens/s over MaxText's at its fastest remat policy


def maxtext_overrides(remat: str, steps: int, out_dir: str) -> list[str]:
    """MaxText ``key=value`` overrides of ``base.yml`` for ``SHAPE``."""
    s = SHAPE
    return [f"run_name=peer_{remat}", f"base_output_directory={out_dir}", "hardware=cpu",
            "skip_jax_distributed_system=true", f"steps={steps}", "decoder_block=llama2",
            f"base_emb_dim={s['d_model']}", f"base_num_query_heads={s['heads']}",
            f"base_num_kv_heads={s['heads']}", f"head_dim={s['head_dim']}", f"base_mlp_dim={s['d_ff']}",
            f"base_num_decoder_layers={s['layers']}", f"vocab_size={s['vocab']}",
            f"max_target_length={s['seq_len']}", f"per_device_batch_size={s['batch']}",
            "dtype=float32", "weight_dtype=float32", "logits_via_embedding=false",
            "dataset_type=synthetic", "enable_checkpointing=false", "enable_dropout=false",
            "attention=dot_product", "scan_layers=true", f"remat_policy={remat}"]


def slimjax_config(unroll: int = 1):
    """The slimjax config for ``SHAPE`` (base config: pre-RMSNorm, RoPE, SwiGLU, no biases, AdamW);
    ``unroll`` is ``model.scan_unroll`` (layers per loop iteration of the scan)."""
    from slimjax import config as C
    from slimjax.configs import base

    c = base.get_config()
    m, s = c.model, SHAPE
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = s["vocab"], s["d_model"], s["layers"], s["heads"], s["heads"]
    m.head_dim, m.d_ff, m.max_seq_len, m.tie_embeddings = s["head_dim"], s["d_ff"], s["seq_len"], False
    m.dtype, m.remat, m.scan_layers, m.scan_unroll = "float32", "none", True, unroll
    c.data.seq_len, c.train.global_batch_size = s["seq_len"], s["batch"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return C.validate(c)


def slimjax_worker(steps: int, warmup: int, unroll: int) -> None:
    """Runs in a child process: trains ``steps`` steps and prints one JSON line."""
    import jax
    import numpy as np

    from slimjax.data import pipeline
    from slimjax.sharding import make_mesh
    from slimjax.train.run import build_fresh

    start = float(os.environ["PEER_START"])
    cfg = slimjax_config(unroll)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    t0 = time.perf_counter()
    _, state, train_step, _, sharding = build_fresh(cfg, mesh)
    compile_s = time.perf_counter() - t0  # init + AOT compile of the train and eval steps
    rng = np.random.default_rng(0)
    rows = SHAPE["batch"], SHAPE["seq_len"] + 1
    batches = [pipeline.to_global(pipeline.to_example({  # unpacked rows: one document each
        "tokens": rng.integers(4, SHAPE["vocab"], rows).astype(np.int32),
        "segment_ids": np.ones(rows, np.int32),
        "positions": np.broadcast_to(np.arange(rows[1], dtype=np.int32), rows).copy()}), sharding)
        for _ in range(2)]
    times, first = [], None
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = train_step(state, batches[i % 2])
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - t)
        first = first or time.time() - start
    print(json.dumps({"step_times": times[warmup:], "compile_s": compile_s, "first_step_s": first,
                      "final_loss": loss, "jax": jax.__version__}), flush=True)


def child_env() -> dict[str, str]:
    """One CPU device, no inherited XLA flags (the fake-device count of other benchmarks)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PEER_START=repr(time.time()))
    env.pop("XLA_FLAGS", None)
    return env


def run_slimjax(python: str, steps: int, warmup: int, unroll: int) -> dict:
    """One slimjax run in a fresh process."""
    out = subprocess.run([python, os.path.abspath(__file__), "--worker", f"--steps={steps}", f"--warmup={warmup}",
                          f"--unroll={unroll}"],
                         env=child_env(), capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"slimjax worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# MaxText's per-step log line (absl format): time stamp, step, seconds, loss.
STEP_LINE = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*completed step: (\d+), seconds: ([\d.]+),.*? loss: ([\d.]+)")


def run_maxtext(python: str, remat: str, steps: int, warmup: int) -> dict:
    """One MaxText run (``maxtext.trainers.pre_train.train``) in a fresh process; its step lines parsed."""
    code = ("import importlib.util, os, sys; "
            "print(os.path.dirname(importlib.util.find_spec('maxtext').origin))")
    pkg = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as out_dir:
        env = child_env()
        start = time.time()
        out = subprocess.run([python, "-m", "maxtext.trainers.pre_train.train", os.path.join(pkg, "configs", "base.yml"),
                              *maxtext_overrides(remat, steps, out_dir)],
                             env=env, capture_output=True, text=True, check=False)
    log = out.stdout + out.stderr
    parsed = [m for m in map(STEP_LINE.match, log.splitlines()) if m]
    if out.returncode or len(parsed) < steps:
        raise SystemExit(f"MaxText run failed (rc {out.returncode}):\n{log[-3000:]}")
    h, mi, se = (float(x) for x in parsed[0].groups()[:3])
    t0 = time.localtime(start)
    first = (h * 3600 + mi * 60 + se) - (t0.tm_hour * 3600 + t0.tm_min * 60 + t0.tm_sec + start % 1)
    seconds = [float(m.group(5)) for m in parsed]
    return {"step_times": seconds[warmup:], "first_step_s": first % 86400, "final_loss": float(parsed[-1].group(6)),
            "jax": subprocess.run([python, "-c", "import jax; print(jax.__version__)"], capture_output=True,
                                  text=True, env=env, check=True).stdout.strip()}


def summarise(run: dict, flops_per_token: float, peak: float) -> dict:
    step = statistics.median(run["step_times"])
    tokens = SHAPE["batch"] * SHAPE["seq_len"]
    return run | {"step_s": step, "tokens_per_s": tokens / step, "peak_flops_per_s": peak,
                  "mfu": flops_per_token * tokens / step / peak, "load_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maxtext_python", help="python of a virtualenv with maxtext installed (required)")
    ap.add_argument("--slimjax_python", default=sys.executable, help="python that runs the slimjax side")
    ap.add_argument("--remat", default="minimal_with_context,full", help="MaxText remat policies (comma-separated)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="peer_maxtext", help="writes bench/results/NAME.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unroll", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return slimjax_worker(args.steps, args.warmup, args.unroll)
    if not args.maxtext_python or not os.access(args.maxtext_python, os.X_OK):
        sys.exit(f"--maxtext_python={args.maxtext_python!r} is not an executable python; create one with "
                 "'python3.12 -m venv mt && mt/bin/pip install \"maxtext[tpu]==0.2.5\"' and pass mt/bin/python")

    from slimjax.train import flops

    fpt = flops.flops_per_token(slimjax_config().model, SHAPE["seq_len"])
    policies = args.remat.split(",")
    # Each side's settings: slimjax as configured by default (one layer per scan iteration) and
    # with model.scan_unroll = layers (the same stacked parameters, the loop unrolled by XLA);
    # MaxText at each remat policy.
    unrolls = {"scan_unroll=1": 1, f"scan_unroll={SHAPE['layers']}": SHAPE["layers"]}
    settings = [("slimjax", u) for u in unrolls] + [("maxtext", p) for p in policies]
    runs: list[dict] = []
    for r in range(args.rounds):
        for side, setting in settings:
            peak = flops.measured_matmul_peak.__wrapped__(4096)  # measured again each window, not cached
            raw = (run_slimjax(args.slimjax_python, args.steps, args.warmup, unrolls[setting]) if side == "slimjax"
                   else run_maxtext(args.maxtext_python, setting, args.steps, args.warmup))
            row = summarise(raw, fpt, peak) | {"side": side, "setting": setting, "round": r}
            runs.append(row)
            print(f"round {r} {side:>8} {setting:>21}: {row['tokens_per_s']:7.0f} tok/s  "
                  f"MFU {row['mfu']:6.1%}  first step {row['first_step_s']:5.1f}s  load {row['load_1min']:.1f}",
                  flush=True)

    def pick(side: str, setting: str, r: int | None = None) -> list[dict]:
        return [x for x in runs if x["side"] == side and x["setting"] == setting and r in (None, x["round"])]

    summary = [{"side": side, "setting": setting, "jax": pick(side, setting)[0]["jax"],
                **{k: statistics.median(x[k] for x in pick(side, setting))
                   for k in ("tokens_per_s", "mfu", "first_step_s", "load_1min")}} for side, setting in settings]
    # Ratios per round (runs next to each other share the load), then the median over rounds.
    ratios = {u: {p: statistics.median(pick("slimjax", u, r)[0]["tokens_per_s"] / pick("maxtext", p, r)[0]["tokens_per_s"]
                                       for r in range(args.rounds)) for p in policies} for u in unrolls}
    fastest = max(policies, key=lambda p: statistics.median(x["tokens_per_s"] for x in pick("maxtext", p)))
    print()
    print_table(summary, ["side", "setting", "jax", "tokens_per_s", "mfu", "first_step_s", "load_1min"])
    for u in unrolls:
        print(f"slimjax ({u}) / MaxText: " + ", ".join(f"{p} {ratios[u][p]:.2f}x" for p in policies))
    targets = [{"name": f"slimjax ({u}) tokens/s / MaxText's at its fastest remat policy ({fastest})",
                "value": ratios[u][fastest], "target": TARGET_RATIO, "met": ratios[u][fastest] >= TARGET_RATIO}
               for u in unrolls]
    print_table(targets, ["name", "value", "target", "met"])
    path = write_result(args.name, {"command": "python bench/peer_maxtext.py " + " ".join(sys.argv[1:]),
                                    "shape": SHAPE, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "ratios": ratios,
                                    "summary": summary, "runs": runs, "targets": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
