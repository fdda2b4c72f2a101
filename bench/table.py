"""Shared output of the benchmarks: a plain-text table on stdout and a JSON file under bench/results/."""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as aligned columns (floats with 3 significant digits)."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_result(name: str, result: dict[str, Any]) -> str:
    """Writes ``bench/results/<name>.json`` with the machine it ran on; returns the path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    result = {"machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()}, **result}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def finish(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], targets: Sequence[dict[str, Any]],
           fields: dict[str, Any]) -> str:
    """The closing tables of a slimming benchmark (every row, then its targets) and
    ``bench/results/<name>.json`` with the jax version, device, time, rows, targets and ``fields``."""
    import time

    import jax

    print()
    print_table(rows, columns)
    print_table(targets, ["name", "value", "target", "met"])
    path = write_result(name, {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                               "time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields, "rows": list(rows),
                               "targets": list(targets)})
    print(f"wrote {path}")
    return path
