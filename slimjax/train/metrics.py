"""Run outputs: TensorBoard events, ``metrics.jsonl``, the summary JSON and the loss-curve PNG.

Only process 0 writes; other processes get a writer that does nothing, so the loop needs no
``if`` around each call.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVE_FILE = "loss_curve.png"
TB_DIR = "tensorboard"


class MetricsWriter:
    """Appends scalars to TensorBoard and ``metrics.jsonl`` (one JSON object per line)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # no TensorFlow needed

            self._tb = SummaryWriter(os.path.join(workdir, TB_DIR))
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str) -> None:
        """One record: ``{"step": s, "<prefix>/<name>": value, ...}``."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[f"{prefix}/{name}"] = value
            self._tb.add_scalar(f"{prefix}/{name}", value, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._file.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    """All records of a ``metrics.jsonl`` (a resumed run appends to the same file)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_figure(records: list[dict[str, float]], title: str) -> Any:
    """A matplotlib ``Figure`` of train loss per step and eval loss at each evaluation (log scale).

    Built without pyplot, so it neither needs nor changes a display backend: a notebook shows it
    with ``display(fig)``, a server saves it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
        pts = sorted((r["step"], r[key]) for r in records if key in r and math.isfinite(r[key]))
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    for axis_ticks in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_ticks(FormatStrFormatter("%.4g"))  # plain numbers: losses span less than a decade
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_loss_curve(records: list[dict[str, float]], out_path: str, title: str) -> None:
    """:func:`loss_figure` saved as a PNG (written under a temporary name, then renamed)."""
    tmp = out_path + ".tmp.png"
    loss_figure(records, title).savefig(tmp)
    os.replace(tmp, out_path)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Atomic JSON write (temporary name, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
