"""Loader throughput (read + tokenize + pack + shard, then serving batches) against what the tiny
config's training consumes on this machine, measured in the same run.

Usage: python bench/data_loader.py [--steps=40]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax

import slimjax
from slimjax import config as C
from slimjax.configs import tiny
from slimjax.data import loader, pipeline
from table import print_table, write_result


def build_throughput(cfg: C.Config, workdir: str, label: str, serve_batches: int = 500) -> dict:
    """Tokens per second of ``loader.build`` (all shards, one process) and of serving batches."""
    t0 = time.perf_counter()
    data = loader.build(cfg.data, cfg.train.global_batch_size, cfg.train.seed, cfg.train.eval_batches,
                        cfg.model.vocab_size, workdir)
    build_s = time.perf_counter() - t0
    rows = sum(s["rows"] for s in data.stats["sources"].values())
    tokens = rows * cfg.data.seq_len
    it = pipeline.iterate(data.train, prefetch=cfg.data.prefetch)
    next(it)
    t0 = time.perf_counter()
    for _ in range(serve_batches):
        next(it)
    serve_s = time.perf_counter() - t0
    batch_tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return {"pipeline": label, "documents": sum(s["documents"] for s in data.stats["sources"].values()),
            "tokens": tokens, "build_s": build_s, "build_tok_s": tokens / build_s,
            "serve_tok_s": serve_batches * batch_tokens / serve_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps for the consumption figure")
    args = parser.parse_args()
    raw = tiny.get_config()
    raw.train.steps, raw.train.log_every, raw.train.eval_every = args.steps, 10, 10_000
    raw.checkpoint.every_steps, raw.train.progress = 10_000, False
    cfg = C.validate(raw)
    with tempfile.TemporaryDirectory() as workdir:
        summary = slimjax.train(cfg, workdir)  # also trains and caches the tokenizer the loader reuses
        train_tok_s = summary["tokens_per_s"]
        stdlib = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, sources=(C.parse_source("s", "stdlib"),), tokenizer_kind="byte", packing="first_fit"))
        rows = [build_throughput(cfg, workdir, "shakespeare, sentencepiece, concat-split"),
                build_throughput(stdlib, workdir, "stdlib, bytes, first-fit")]
    for r in rows:
        r["build_x_training"] = r["build_tok_s"] / train_tok_s
        r["serve_x_training"] = r["serve_tok_s"] / train_tok_s
    print(f"tiny config training: {train_tok_s:,.0f} tokens/s on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, data wait {summary['data_wait_frac']:.1%} of step time")
    print_table(rows, ["pipeline", "documents", "tokens", "build_s", "build_tok_s", "serve_tok_s",
                       "build_x_training", "serve_x_training"])
    print("wrote", write_result("data_loader", {
        "training_tokens_per_s": train_tok_s, "training_data_wait_frac": summary["data_wait_frac"],
        "devices": jax.device_count(), "rows": rows}))


if __name__ == "__main__":
    main()
