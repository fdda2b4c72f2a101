"""Parallel layouts side by side on 8 devices: memory and communication, predicted and compiled.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/parallel.py   # ~10 min on 2 CPU cores
    python bench/parallel.py --only dp,fsdp,tp                                    # some rows

One fixed Llama-style model (``--d_model``, ``--n_layers``; float32) and one global batch, laid out
as data parallelism, FSDP, tensor parallelism, pipeline parallelism (GPipe and circular), sequence
parallelism (all-gather and ring attention) and mixes of them. For each layout:

- per-device memory predicted by ``slimjax explain`` (parameters, gradients, optimizer state and
  the activation estimate) and the compiler's peak for the real train step;
- bytes moved per step by collectives in the compiled step (loops counted per iteration) beside
  the theory for the layout (``slimjax.train.explain.expected_collectives``);
- the pipeline's bubble: in theory, and measured as the share of the compiled pipeline loop's
  iterations (read from the program) that carry no microbatch;
- the median step time. On fake CPU devices the 8 "devices" share the host's cores, so step
  times say what the layout costs in work, not what it would gain on real chips.

Ring attention's memory is measured separately: the compiled attention's temporary bytes per
device at sequence-axis sizes 1, 2, 4 and 8 for a long sequence.

Writes ``bench/results/parallel.json`` with the issue's targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import finish  # noqa: E402
from train_throughput import synthetic_batch  # noqa: E402

import jax  # noqa: E402

from slimjax import configs  # noqa: E402
from slimjax.config import validate  # noqa: E402
from slimjax.data import pipeline  # noqa: E402
from slimjax.sharding import make_mesh  # noqa: E402
from slimjax.train import explain  # noqa: E402
from slimjax.train.run import build_fresh, pipeline_schedule  # noqa: E402

# name -> mesh.* overrides (axes not named stay 1; "data" fills the rest)
LAYOUTS: dict[str, dict] = {
    "dp": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "tp": dict(data=2, tensor=4),
    "fsdp+tp": dict(data=1, fsdp=2, tensor=4),
    "pp gpipe": dict(data=2, stage=4, pipeline_schedule="gpipe", pipeline_microbatches=4),
    "pp circular": dict(data=2, stage=4, pipeline_schedule="circular", pipeline_microbatches=4,
                        pipeline_repeats=2),
    "pp+fsdp+tp": dict(data=1, stage=2, fsdp=2, tensor=2, pipeline_microbatches=4),
    "sp allgather": dict(data=2, sequence=4, sequence_attention="allgather"),
    "sp ring": dict(data=2, sequence=4, sequence_attention="ring"),
    "sp ring+fsdp": dict(data=1, fsdp=2, sequence=4, sequence_attention="ring"),
}
THEORY_TARGETS = ("dp", "fsdp", "tp")


def config(args: argparse.Namespace, mesh: dict, seq_len: int | None = None):
    """The benchmark's model with these mesh settings, validated."""
    c = configs.base.get_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 1024, args.d_model, args.n_layers, 8, 4
    m.head_dim, m.d_ff, m.dtype, m.tie_embeddings = args.d_model // 8, 4 * args.d_model, "float32", False
    c.data.seq_len = seq_len or args.seq_len
    m.max_seq_len = c.data.seq_len
    c.train.global_batch_size = args.batch
    c.mesh.update(mesh)
    return validate(c)


def step_time(cfg, repeats: int) -> float:
    """Median seconds of the compiled train step on a fixed batch (after one warm-up step)."""
    mesh = make_mesh(cfg.mesh)
    _, state, train_step, _, sharding = build_fresh(cfg, mesh)
    batch = pipeline.to_global(synthetic_batch(cfg, 0), sharding)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layout_row(args: argparse.Namespace, name: str) -> dict:
    cfg = config(args, LAYOUTS[name])
    plan = explain.layout(cfg)
    predicted = {r["kind"]: r["bytes"] for r in plan.memory.records()}["total"]
    step = explain.compile_step(cfg)
    memory, collectives, expected = explain.compiled(cfg, step=step)
    peak = {r["kind"]: r["bytes"] for r in memory.records()}["peak"]
    moved = sum(r["bytes per device"] for r in collectives.records())
    theory = sum(nbytes for nbytes, _ in expected.values())
    row = {"layout": name, "mesh": " ".join(f"{a}={s}" for a, s in plan.mesh.items() if s > 1),
           "predicted MiB": predicted / 2**20, "compiled peak MiB": peak / 2**20,
           "collective MiB": moved / 2**20, "theory MiB": theory / 2**20,
           "compiled/theory": round(moved / theory, 3) if theory else None,
           "by kind": {r["collective"]: r["bytes per device"] for r in collectives.records() if r["bytes per device"]},
           "step ms": 1000 * step_time(cfg, args.repeats)}
    if cfg.mesh.stage > 1:
        row["bubble theory"], row["bubble measured"] = pipeline_bubble(cfg, step[0].as_text())
    print(row, flush=True)
    return row


def pipeline_bubble(cfg, hlo_text: str) -> tuple[float, float]:
    """(theory, measured) bubble: the share of pipeline iterations that carry no microbatch. The
    measured one reads the iteration count from the compiled program (the loop whose body
    permutes activations between stages) against the microbatch-stage slots of useful work."""
    schedule = pipeline_schedule(cfg, make_mesh(cfg.mesh))
    iterations = max(explain.permute_loop_trips(hlo_text))
    return schedule.bubble, 1 - schedule.microbatches * schedule.repeats / iterations


def ring_memory(args: argparse.Namespace) -> list[dict]:
    """Compiled temporary bytes of the train step per device with ring attention over a long
    sequence, at sequence-axis sizes 1, 2, 4, 8 (the rest of the devices data-parallel)."""
    rows = []
    for size in (1, 2, 4, 8):
        cfg = config(args, dict(data=8 // size, sequence=size, sequence_attention="ring"), seq_len=args.long_seq_len)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=8 // size))
        memory, _, _ = explain.compiled(cfg)
        temp = {r["kind"]: r["bytes"] for r in memory.records()}["temporaries"]
        rows.append({"sequence": size, "rows per device": 1, "temp MiB": temp / 2**20})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--long_seq_len", type=int, default=2048, help="ring attention's memory scaling")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated layout names (default: all, and the ring scaling)")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(LAYOUTS)
    rows = [layout_row(args, n) for n in names]
    by_name = {r["layout"]: r for r in rows}
    targets = [{"name": f"{n}: compiled collective bytes / theory", "value": by_name[n]["compiled/theory"],
                "target": "<= 1.1", "met": by_name[n]["compiled/theory"] <= 1.1}
               for n in THEORY_TARGETS if n in by_name]
    if {"pp gpipe", "pp circular"} <= set(by_name):
        g, c = by_name["pp gpipe"]["bubble measured"], by_name["pp circular"]["bubble measured"]
        targets.append({"name": "circular bubble < GPipe bubble (4 microbatches, 4 stages)",
                        "value": f"{c:.3f} vs {g:.3f}", "target": "<", "met": c < g})
    ring = ring_memory(args) if not args.only else []
    if ring:
        worst = max(r["temp MiB"] * r["sequence"] / ring[0]["temp MiB"] for r in ring[1:])
        targets.append({"name": "ring attention: temp bytes x sequence size / temp bytes at 1 (worst of 2, 4, 8)",
                        "value": round(worst, 3), "target": "<= 1.25 (memory falls as 1/sequence)",
                        "met": worst <= 1.25})
    columns = ["layout", "mesh", "predicted MiB", "compiled peak MiB", "collective MiB", "theory MiB",
               "compiled/theory", "bubble theory", "bubble measured", "step ms"]
    finish("parallel", rows, columns, targets, {"model": vars(args), "ring_memory": ring})


if __name__ == "__main__":
    main()
