"""``slimjax eval``: perplexity and bits per byte of a run's checkpoint on any configured data source.

Results go to a JSON file (default ``<workdir>/eval.json``), to TensorBoard and ``metrics.jsonl``
(prefix ``evaluate/``, at the checkpoint's step) and to stdout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, choice, integer
from slimjax.config import parse_source
from slimjax.errors import SlimjaxError

RESULT_FILE = "eval.json"
COMMAND = Command("eval", "perplexity and bits per byte of a run's checkpoint on any data source", (
    Flag("workdir", "the run directory", metavar="RUN", required=True),
    Flag("source", "a data source to score instead of the run's data.sources (stdlib, shakespeare, text:GLOB, "
         "jsonl:GLOB, slimpajama:GLOB, tfds:NAME)", metavar="SPEC", repeated=True),
    Flag("split", "'eval' (held out) or 'train'", choice("eval", "train"), "eval", metavar="SPLIT"),
    Flag("max_docs", "score the first N documents (0: all)", integer(0), 0, metavar="N"),
    Flag("batch_size", "rows per forward pass (0: the run's global batch size)", integer(0), 0, metavar="N"),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
    Flag("tokenizer", "tokenizer file (default: the run's)", metavar="FILE"),
    Flag("out", f"result JSON (default: <workdir>/{RESULT_FILE})", metavar="FILE.json"),
), details="Results also go to TensorBoard and metrics.jsonl (prefix evaluate/) at the checkpoint's step.")


def run(argv: Sequence[str]) -> int:
    opts = COMMAND.parse(argv)
    sources = [parse_source(f"--source[{i}]", spec) for i, spec in enumerate(opts.source)]
    import jax

    from slimjax.cli.rundir import open_run, run_tokenizer
    from slimjax.infer import evaluate
    from slimjax.sharding import BATCH_AXES
    from slimjax.train.metrics import MetricsWriter, write_json

    rd = open_run(opts.workdir, opts.step)
    cfg = rd.cfg
    data = cfg.data
    if sources:
        data = dataclasses.replace(data, sources=tuple(sources))
    if opts.tokenizer:
        data = dataclasses.replace(data, tokenizer=opts.tokenizer)
    tok = run_tokenizer(data, rd.workdir, cfg.model.vocab_size, "eval")
    rows = opts.batch_size or cfg.train.global_batch_size
    ways = 1
    for axis in BATCH_AXES:
        ways *= rd.mesh.shape[axis]
    if rows % (ways * jax.process_count()):
        raise SlimjaxError(f"--batch_size={rows} must be a multiple of the {ways} batch-sharding devices "
                           f"x {jax.process_count()} processes")
    docs = evaluate.split_documents(data, opts.split, opts.max_docs)
    if not docs:
        raise SlimjaxError(f"no documents in the '{opts.split}' split of "
                           f"{', '.join(s.name for s in data.sources)}; try --split=train or another --source")

    params = rd.restore_params()
    step_fn = evaluate.compile_eval_step(rd.built.graphdef, rd.built.shapes, rd.shardings(), rd.mesh, rd.rules, rows,
                                         data.seq_len)
    score = evaluate.score_documents(step_fn, params, data, tok, docs, rows, rd.mesh, rd.rules)
    result = {"step": rd.step, "split": opts.split, "sources": [s.name for s in data.sources],
              "tokenizer": tok.path, "seq_len": data.seq_len, **score.as_dict()}
    if jax.process_index() == 0:
        write_json(opts.out or os.path.join(rd.workdir, RESULT_FILE), result)
        writer = MetricsWriter(rd.workdir)
        writer.write(rd.step, {k: result[k] for k in ("loss", "perplexity", "bits_per_byte")}, "evaluate")
        writer.close()
    print(f"step {rd.step} on {', '.join(result['sources'])} ({opts.split}, {score.documents} documents, "
          f"{score.tokens:,} tokens, {score.bytes:,} bytes): loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.3f}, bits/byte {result['bits_per_byte']:.4f}")
    return 0
