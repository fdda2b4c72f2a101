"""A small table of rows: plain text for terminals, HTML for notebooks, a DataFrame when pandas is there.

Tables that slimjax computes (where each parameter lives, a slimming report) are data first: a
notebook wants to sort or plot a column, a terminal wants aligned text. ``Table`` is that one
object; it keeps pandas optional (it is not a dependency of slimjax).
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any


@dataclasses.dataclass(frozen=True, repr=False)
class Table:
    """Named columns and rows of values; ``notes`` are lines printed under the rows (totals)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {i} has {len(row)} values for {len(self.columns)} columns")

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        """The values of one column, in row order."""
        try:
            i = self.columns.index(name)
        except ValueError:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}") from None
        return [row[i] for row in self.rows]

    def records(self) -> list[dict[str, Any]]:
        """One ``{column: value}`` dict per row."""
        return [dict(zip(self.columns, row)) for row in self.rows]

    def where(self, column: str, value: Any) -> dict[str, Any]:
        """The first row whose ``column`` equals ``value``, as a dict (KeyError if none)."""
        for record in self.records():
            if record[column] == value:
                return record
        raise KeyError(f"no row with {column} == {value!r}")

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of the rows (pandas must be installed; Colab has it)."""
        import pandas as pd

        return pd.DataFrame(list(self.rows), columns=list(self.columns))

    def __str__(self) -> str:
        cells = [list(self.columns)] + [[_text(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join(lines + list(self.notes))

    __repr__ = __str__  # a Table ending a cell in a terminal IPython prints as text

    def _repr_html_(self) -> str:
        """How Jupyter and Colab show a Table that ends a cell."""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

