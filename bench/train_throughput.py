"""Training throughput and MFU, against the matmul peak measured in the same run.

    python bench/train_throughput.py                      # CPU: tiny and ~20M, 1 device and 8 fake devices
    python bench/train_throughput.py --gpu                # on a GPU host: ~1B Llama, seq 2048, bf16

For each case: compile time, then after 2 warm-up steps the median of >= 10 individually timed
steps -> tokens/s, achieved model FLOP/s (slimjax.train.flops formula) and MFU. The peer is the
hardware itself: on CPU, a float32 4096x4096 matmul timed in this same process right before each
measured step (the same cores under the same load; MFU is the median of the per-step ratios); on
GPU, the vendor bf16 peak. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if "--gpu" not in sys.argv:  # 8 fake CPU devices, set before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from slimjax import config as C  # noqa: E402
from slimjax.configs import base  # noqa: E402
from slimjax.data import pipeline  # noqa: E402
from slimjax.sharding import make_mesh  # noqa: E402
from slimjax.train import flops  # noqa: E402
from slimjax.train.run import build_fresh  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# MFU targets (issue 18): CPU cases on one device against the paired f32 matmul; GPU against the
# vendor bf16 peak.
MFU_TARGETS = {"llama_20m": 0.70, "tiny": 0.40, "llama_1b": 0.50}


def case_config(name: str, n_devices: int) -> C.Config:
    """The benchmarked shapes. ``llama_20m`` is a Llama-style model of ~20M parameters (untied
    output layer, as in Llama)."""
    c = base.get_config()
    m, t = c.model, c.train
    if name == "llama_20m":
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 8192, 384, 8, 6, 6
        m.head_dim, m.d_ff, m.max_seq_len, m.tie_embeddings = 64, 1024, 512, False
        c.data.seq_len, t.global_batch_size = 256, 16
    elif name == "llama_1b":
        from slimjax.configs import llama_1b

        c = llama_1b.get_config()
        c.model.dtype, c.model.remat = "bfloat16", "dots"
        c.data.seq_len, c.train.global_batch_size = 2048, 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = n_devices, 1, 1
    return C.validate(c)


def synthetic_batch(cfg: C.Config, seed: int) -> dict[str, np.ndarray]:
    """Random tokens packed like real data (documents of random length, segment ids, positions)."""
    rng = np.random.default_rng(seed)
    docs, need = [], cfg.train.global_batch_size * cfg.data.seq_len + 1
    while need > 0:
        n = int(rng.integers(16, 4 * cfg.data.seq_len))
        docs.append(rng.integers(4, cfg.model.vocab_size, size=n).astype(np.int32))
        need -= n
    rows = pipeline.pack_concat_split(docs, cfg.data.seq_len)
    return pipeline.to_example(rows[np.arange(cfg.train.global_batch_size)])


def matmul_timer(n: int = 4096):
    """A function that times one float32 ``n x n`` matmul and returns its FLOP/s."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()

    def timed() -> float:
        t = time.perf_counter()
        f(a, a).block_until_ready()
        return 2.0 * n**3 / (time.perf_counter() - t)

    return timed


def run_case(name: str, n_devices: int, steps: int, peak_timer) -> dict:
    """Times ``steps`` train steps, each right after a reference matmul (when ``peak_timer``)."""
    cfg = case_config(name, n_devices)
    mesh = make_mesh(cfg.mesh, jax.devices()[:n_devices])
    t0 = time.perf_counter()
    setup, state, train_step, _, sharding = build_fresh(cfg, mesh)
    compile_s = time.perf_counter() - t0  # init + AOT compile of train and eval steps
    batches = [pipeline.to_global(synthetic_batch(cfg, i), sharding) for i in range(2)]
    for i in range(2):
        state, metrics = train_step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    fpt = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    times, peaks = [], []
    for i in range(steps):
        if peak_timer is not None:
            peaks.append(peak_timer())
        t = time.perf_counter()
        state, metrics = train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    n_params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract.params))
    row = {"case": name, "devices": n_devices, "params": n_params, "seq_len": cfg.data.seq_len,
           "global_batch": cfg.train.global_batch_size, "dtype": cfg.model.dtype,
           "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
           "model_flops_per_s": fpt * tokens / step_s, "final_loss": float(metrics["loss"])}
    if peaks:
        # Each step is paired with the matmul timed just before it, so both saw the same load on
        # the shared cores; MFU is the median of the per-pair ratios.
        row["peak_flops_per_s"] = statistics.median(peaks)
        row["mfu"] = statistics.median(fpt * tokens / t / p for t, p in zip(times, peaks))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default="tiny:1,tiny:8,llama_20m:1,llama_20m:8",
                    help="comma-separated name:devices pairs (CPU)")
    ap.add_argument("--gpu", action="store_true", help="run the ~1B bf16 case on the local GPU")
    ap.add_argument("--out", default=os.path.join(RESULTS, "train_throughput.json"))
    args = ap.parse_args()

    if args.gpu:
        cases = [("llama_1b", 1)]
        peak, peak_source = flops.system_peak(jax.devices()[:1])
        peak_timer = None
    else:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
        peak_source = "f32 4096x4096 jnp matmul timed just before each measured step"
        peak_timer = matmul_timer(4096)
    rows = []
    for name, n in cases:
        row = run_case(name, n, args.steps, peak_timer)
        if peak_timer is None:
            row.update(peak_flops_per_s=peak, mfu=row["model_flops_per_s"] / peak)
        rows.append(row)
        print(f"{name:>10} x{n}: {row['tokens_per_s']:9.0f} tok/s  {row['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
              f"peak {row['peak_flops_per_s'] / 1e9:7.1f}  MFU {row['mfu']:6.1%}  compile {row['compile_s']:5.1f}s",
              flush=True)

    header = f"{'case':>10} {'dev':>3} {'params':>8} {'tok/s':>9} {'GFLOP/s':>8} {'peak':>8} {'MFU':>6} {'compile s':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['case']:>10} {r['devices']:>3} {r['params'] / 1e6:7.1f}M {r['tokens_per_s']:9.0f} "
              f"{r['model_flops_per_s'] / 1e9:8.1f} {r['peak_flops_per_s'] / 1e9:8.1f} {r['mfu']:6.1%} {r['compile_s']:9.1f}")
    payload = {"peak_source": peak_source, "device": jax.devices()[0].device_kind,
               "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "jax": jax.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "load_average_1min": os.getloadavg()[0], "command": " ".join(["python", *sys.argv]), "rows": rows,
               "targets": [{"name": f"MFU {r['case']} x{r['devices']}", "value": r["mfu"],
                            "target": MFU_TARGETS[r["case"]], "met": r["mfu"] >= MFU_TARGETS[r["case"]]}
                           for r in rows if r["case"] in MFU_TARGETS and (r["devices"] == 1 or args.gpu)]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
