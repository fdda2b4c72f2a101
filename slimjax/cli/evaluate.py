"""``slimjax eval``: perplexity and bits per byte of a run's checkpoint on any configured data source.

Results go to a JSON file (default ``<workdir>/eval.json``), to TensorBoard and ``metrics.jsonl``
(prefix ``evaluate/``, at the checkpoint's step) and to stdout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from slimjax.cli.flags import iter_flags, number_flag
from slimjax.config import parse_source, suggest
from slimjax.errors import SlimjaxError

USAGE = ("slimjax eval --workdir=RUN [--source=SPEC ...] [--split=eval|train] [--max_docs=N] [--batch_size=N] "
         "[--step=N] [--tokenizer=FILE] [--out=FILE.json]   (default sources: the run's data.sources)")
FLAGS = ("workdir", "source", "split", "max_docs", "batch_size", "step", "tokenizer", "out")
RESULT_FILE = "eval.json"


def parse(argv: Sequence[str]) -> dict:
    values: dict = {"sources": [], "split": "eval", "max_docs": 0, "batch_size": 0, "step": None,
                    "tokenizer": None, "out": None, "workdir": None}
    for name, value in iter_flags(argv, example="--workdir=RUN"):
        if name not in FLAGS:
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, FLAGS)}")
        if name == "source":
            values["sources"].append(parse_source(f"--source[{len(values['sources'])}]", value))
        elif name in ("max_docs", "batch_size", "step"):
            values[name] = number_flag(name, value, int, 0)
        else:
            values[name] = value
    if not values["workdir"]:
        raise SlimjaxError(f"slimjax eval needs --workdir; usage: {USAGE}")
    if values["split"] not in ("eval", "train"):
        raise SlimjaxError(f"--split={values['split']!r}: choose 'eval' (held out) or 'train'")
    return values


def run(argv: Sequence[str]) -> int:
    opts = parse(argv)
    import jax

    from slimjax.cli.rundir import open_run, run_tokenizer
    from slimjax.infer import evaluate
    from slimjax.sharding import BATCH_AXES
    from slimjax.train.metrics import MetricsWriter, write_json

    rd = open_run(opts["workdir"], opts["step"])
    cfg = rd.cfg
    data = cfg.data
    if opts["sources"]:
        data = dataclasses.replace(data, sources=tuple(opts["sources"]))
    if opts["tokenizer"]:
        data = dataclasses.replace(data, tokenizer=opts["tokenizer"])
    tok = run_tokenizer(data, rd.workdir, cfg.model.vocab_size, "eval")
    rows = opts["batch_size"] or cfg.train.global_batch_size
    ways = 1
    for axis in BATCH_AXES:
        ways *= rd.mesh.shape[axis]
    if rows % (ways * jax.process_count()):
        raise SlimjaxError(f"--batch_size={rows} must be a multiple of the {ways} batch-sharding devices "
                           f"x {jax.process_count()} processes")
    docs = evaluate.split_documents(data, opts["split"], opts["max_docs"])
    if not docs:
        raise SlimjaxError(f"no documents in the '{opts['split']}' split of "
                           f"{', '.join(s.name for s in data.sources)}; try --split=train or another --source")

    params = rd.restore_params()
    step_fn = evaluate.compile_eval_step(rd.built.graphdef, rd.built.shapes, rd.shardings(), rd.mesh, rd.rules, rows,
                                         data.seq_len)
    score = evaluate.score_documents(step_fn, params, data, tok, docs, rows, rd.mesh, rd.rules)
    result = {"step": rd.step, "split": opts["split"], "sources": [s.name for s in data.sources],
              "tokenizer": tok.path, "seq_len": data.seq_len, **score.as_dict()}
    if jax.process_index() == 0:
        write_json(opts["out"] or os.path.join(rd.workdir, RESULT_FILE), result)
        writer = MetricsWriter(rd.workdir)
        writer.write(rd.step, {k: result[k] for k in ("loss", "perplexity", "bits_per_byte")}, "evaluate")
        writer.close()
    print(f"step {rd.step} on {', '.join(result['sources'])} ({opts['split']}, {score.documents} documents, "
          f"{score.tokens:,} tokens, {score.bytes:,} bytes): loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.3f}, bits/byte {result['bits_per_byte']:.4f}")
    return 0
