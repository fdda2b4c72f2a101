"""``slimjax report``: a run's weights (per-layer sparsity, bytes), quality and speed, optionally
against another run, with a verdict per saving (``slimjax.slim.report``).

Writes JSON (default ``<workdir>/report.json``), prints a table and draws per-layer sparsity to
``<workdir>/sparsity.png``. ``build_report`` is the same from Python (it lives here because it
opens run directories, which the ``slim`` layer below may not).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from slimjax.cli.command import Command, Flag, integer
from slimjax.errors import SlimjaxError
from slimjax.slim.report import PLOT_FILE, REPORT_FILE

COMMAND = Command("report", "a run's weights, quality and speed, optionally against another run, with verdicts", (
    Flag("workdir", "the run directory", metavar="RUN", required=True),
    Flag("against", "another run to compare with (e.g. the unpruned one)", metavar="OTHER_RUN"),
    Flag("out", f"result JSON (default: <workdir>/{REPORT_FILE})", metavar="FILE.json"),
    Flag("max_docs", "score the first N held-out documents (0: all)", integer(0), 0, metavar="N"),
    Flag("batch_size", "rows per forward pass (0: each run's global batch size)", integer(0), 0, metavar="N"),
    Flag("repeats", "timings are medians of this many calls", integer(1), 5, metavar="N"),
), details=f"Prints a table and draws per-layer sparsity to <workdir>/{PLOT_FILE}.")


def build_report(workdir: str, against: str | None = None, *, max_docs: int = 0, batch_size: int = 0,
                 timing_repeats: int = 5) -> dict[str, Any]:
    """The report of run ``workdir`` (latest checkpoint), optionally against run ``against``.

    Quality uses the first ``max_docs`` (0: all) documents of the run's held-out split, scored
    ``batch_size`` rows at a time (0: each run's global batch size); the other run is scored on
    the same documents with its own tokenizer. Timings are medians of ``timing_repeats`` calls.
    Returns ``{"device", "documents", "run"}`` plus ``"against"``, ``"ratios"`` and ``"verdicts"``
    with another run (see ``slimjax.slim.report``).
    """
    import jax

    from slimjax.cli.rundir import open_run, run_tokenizer
    from slimjax.infer import evaluate
    from slimjax.slim import report
    from slimjax.train.run import CHECKPOINT_DIR

    if timing_repeats < 1:
        raise SlimjaxError(f"timing_repeats={timing_repeats} must be >= 1")
    rd = open_run(workdir)
    if against and not os.path.isdir(os.path.join(against, CHECKPOINT_DIR)):
        raise SlimjaxError(f"--against '{against}' has no {CHECKPOINT_DIR}/ directory; give another run directory")
    docs = evaluate.split_documents(rd.cfg.data, "eval", max_docs)
    if not docs:
        raise SlimjaxError(f"run '{workdir}' has no held-out documents in "
                           f"{', '.join(s.name for s in rd.cfg.data.sources)}")

    def one(run) -> dict[str, Any]:
        tok = run_tokenizer(run.cfg.data, run.workdir, run.cfg.model.vocab_size, "report")
        return report.run_report(run, tok, docs, batch_size or run.cfg.train.global_batch_size, timing_repeats,
                                 timers)

    timers: list = []
    result: dict[str, Any] = {"device": jax.devices()[0].device_kind, "documents": len(docs), "run": one(rd)}
    if against:
        result["against"] = one(open_run(against))
        # The forward times compared are taken in alternation, not one run after the other.
        for side, ms in zip(("run", "against"), report.interleaved_ms(timers, timing_repeats)):
            speed = result[side]["speed"]
            speed.update(forward_ms=ms, forward_tokens_per_s=speed["forward_rows"] * speed["seq_len"] / (ms / 1e3),
                         forward_timing="interleaved")
        result["ratios"], result["verdicts"] = report.compare(result["run"], result["against"])
    return result


def run(argv: Sequence[str]) -> int:
    opts = COMMAND.parse(argv)
    import jax

    from slimjax.slim import report
    from slimjax.train.metrics import write_json

    result = build_report(opts.workdir, opts.against, max_docs=opts.max_docs, batch_size=opts.batch_size,
                          timing_repeats=opts.repeats)
    if jax.process_index() != 0:
        return 0
    workdir = result["run"]["workdir"]
    out = opts.out or os.path.join(workdir, report.REPORT_FILE)
    write_json(out, result)
    png = os.path.join(workdir, report.PLOT_FILE)
    report.plot_sparsity(result, png)
    print(report.format_table(result))
    print(f"wrote {out} and {png}")
    return 0
