"""``slimjax eval``: perplexity and bits per byte of a run's checkpoint on any configured data source
(an encoder run: MLM and pair-task loss and accuracy, beside the unigram baseline; a classification
run, ``slim.classify``: accuracy and macro-F1 beside the majority-class baseline).

Results go to a JSON file (default ``<workdir>/eval.json``), to TensorBoard and ``metrics.jsonl``
(prefix ``evaluate/``, at the checkpoint's step) and to stdout.
"""

from __future__ import annotations

import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, choice, integer
from slimjax.config import parse_source

RESULT_FILE = "eval.json"
ENCODER_KEYS = ("mlm", "mlm_accuracy", "unigram_accuracy", "nsp", "nsp_accuracy")
COMMAND = Command("eval", "perplexity and bits per byte of a run's checkpoint on any data source (a classifier: "
                  "accuracy and macro-F1)", (
    Flag("workdir", "the run directory", metavar="RUN", required=True),
    Flag("source", "a data source to score instead of the run's data.sources (stdlib, shakespeare, text:GLOB, "
         "jsonl:GLOB, slimpajama:GLOB, tfds:NAME; a classifier: labels:GLOB, genre)", metavar="SPEC",
         repeated=True),
    Flag("split", "'eval' (held out) or 'train'", choice("eval", "train"), "eval", metavar="SPLIT"),
    Flag("max_docs", "score the first N documents (a classifier: examples) (0: all)", integer(0), 0, metavar="N"),
    Flag("batch_size", "rows per forward pass (0: the run's global batch size)", integer(0), 0, metavar="N"),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
    Flag("tokenizer", "tokenizer file (default: the run's)", metavar="FILE"),
    Flag("out", f"result JSON (default: <workdir>/{RESULT_FILE})", metavar="FILE.json"),
), details="Results also go to TensorBoard and metrics.jsonl (prefix evaluate/) at the checkpoint's step.")


def run(argv: Sequence[str]) -> int:
    opts = COMMAND.parse(argv)
    sources = [parse_source(f"--source[{i}]", spec) for i, spec in enumerate(opts.source)]
    import jax

    from slimjax.api import evaluate, load_run
    from slimjax.train.metrics import MetricsWriter, write_json

    run = load_run(opts.workdir, opts.step, tokenizer=opts.tokenizer)
    if "classify" in (name for name, _ in run.spec.recipe):
        return _classifier(run, opts, sources)
    result = evaluate(run, sources, opts.split, opts.max_docs, opts.batch_size)
    rd = run.rundir
    encoder = rd.spec.family == "encoder"
    logged = ENCODER_KEYS if encoder else ("loss", "perplexity", "bits_per_byte")
    if jax.process_index() == 0:
        write_json(opts.out or os.path.join(rd.workdir, RESULT_FILE), result)
        writer = MetricsWriter(rd.workdir)
        writer.write(rd.step, {k: result[k] for k in logged}, "evaluate")
        writer.close()
    if encoder:
        print(f"step {rd.step} on {', '.join(result['sources'])} ({opts.split}, {result['documents']:.0f} documents, "
              f"{result['pairs']:.0f} pairs, {result['masked_tokens']:,.0f} masked tokens): MLM loss {result['mlm']:.4f}, "
              f"accuracy {result['mlm_accuracy']:.4f} (unigram baseline {result['unigram_accuracy']:.4f}); pair loss "
              f"{result['nsp']:.4f}, accuracy {result['nsp_accuracy']:.4f}")
        return 0
    print(f"step {rd.step} on {', '.join(result['sources'])} ({opts.split}, {result['documents']:.0f} documents, "
          f"{result['tokens']:,.0f} tokens, {result['bytes']:,.0f} bytes): loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.3f}, bits/byte {result['bits_per_byte']:.4f}")
    return 0


def _classifier(run, opts, sources) -> int:
    """Accuracy and macro-F1 of a classification run on its labelled sources' (or ``--source``'s) ``--split``."""
    import jax

    from slimjax.api import evaluate_classifier
    from slimjax.train.metrics import MetricsWriter, write_json

    result = evaluate_classifier(run, opts.split, opts.batch_size, opts.max_docs, sources)
    if jax.process_index() == 0:
        write_json(opts.out or os.path.join(run.workdir, RESULT_FILE), result)
        writer = MetricsWriter(run.workdir)
        writer.write(run.step, {k: result[k] for k in ("accuracy", "macro_f1", "majority_accuracy",
                                                       "majority_macro_f1")}, "evaluate")
        writer.close()
    print(f"step {run.step} on {', '.join(result['sources'])} ({opts.split}, {result['examples']} examples): "
          f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} (majority class "
          f"'{result['majority_class']}': accuracy {result['majority_accuracy']:.4f}, macro-F1 "
          f"{result['majority_macro_f1']:.4f})")
    return 0
