"""Selecting a model's matrix layers by path patterns, layer by layer even when layers are scanned.

Matrix layers are ``Dense`` projections and the ``Embed`` table (named ``embed``). Each is named
by its module path (``blocks/attn/wq``; ``blocks/3/attn/wq`` when layers
are unrolled). A scanned model holds all layers of one projection in a stacked kernel, so
patterns are matched against the per-layer name ``blocks/{i}/attn/wq`` for each i and the
selection of a stacked layer is a tuple of per-layer flags: ``"blocks/(0|1)/attn/wq$"`` picks the
first two layers of either layout alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense, Embed

MATRIX_LAYERS = (Dense, Embed)


@dataclasses.dataclass(frozen=True)
class Selected:
    """One matched layer: its path, the module, and which stacked layers matched (None: unstacked)."""

    path: tuple
    dense: Dense | Embed
    layers: tuple[bool, ...] | None

    @property
    def name(self) -> str:
        return "/".join(map(str, self.path))


def bake_taps(model: nnx.Module, tap_type: type, kernel: Callable[[Any], jax.Array]) -> None:
    """Replaces, in place, every Dense tap of ``tap_type`` by a plain kernel ``kernel(tap)``
    (the tap keeps the kernel's ``kernel_axes``, ``n_in`` and ``n_out``): how stored forms export."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, Dense) and isinstance(node.tap, tap_type):
            tap = node.tap
            node.kernel = nnx.Param(kernel(tap), axes=tap.kernel_axes, matrix=(tap.n_in, tap.n_out))
            node.tap = None


def weight(layer: Dense | Embed) -> nnx.Param:
    """The layer's matrix: a Dense's kernel or the embedding table."""
    return layer.kernel if isinstance(layer, Dense) else layer.embedding


def stacked_layers(layer: Dense | Embed) -> int:
    """How many layers a matrix layer stacks (0 when it is one layer's)."""
    w = weight(layer)
    n_in, n_out = w.get_metadata()["matrix"]
    lead = len(w.shape) - n_in - n_out
    return w.shape[0] if lead else 0


def layer_names(path: tuple, n_stacked: int) -> list[str]:
    """The per-layer names of a Dense: one per stacked layer, or its own path."""
    if not n_stacked:
        return ["/".join(map(str, path))]
    head, rest = path[0], "/".join(map(str, path[1:]))
    return [f"{head}/{i}/{rest}" for i in range(n_stacked)]


def select_layers(model: nnx.Module, patterns: Sequence[str], key: str) -> list[Selected]:
    """Every matrix layer whose (per-layer) name matches a pattern (``re.search``).

    A pattern that matches no layer is an error naming ``key`` (the config key that holds it),
    so a typo never silently adapts nothing.
    """
    compiled = [(p, re.compile(p)) for p in patterns]
    used = set()
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, MATRIX_LAYERS):
            continue
        n = stacked_layers(node)
        flags = []
        for name in layer_names(path, n):
            hits = {p for p, rx in compiled if rx.search(name)}
            used |= hits
            flags.append(bool(hits))
        if any(flags):
            out.append(Selected(tuple(path), node, tuple(flags) if n else None))
    unused = [p for p, _ in compiled if p not in used]
    if unused:
        names = sorted({n for path, node in nnx.iter_graph(model) if isinstance(node, MATRIX_LAYERS)
                        for n in layer_names(path, 0)})
        raise SlimjaxError(f"{key} pattern {unused[0]!r} matches no layer; layers are named like "
                           f"{', '.join(names[:4])} (per layer: blocks/0/attn/wq)")
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    """One selected layer's weight: its parameter path, shape, matrix view and which stacked layers are selected."""

    path: str
    shape: tuple[int, ...]
    n_in: int
    n_out: int
    layers: tuple[bool, ...] | None  # None: an unstacked kernel

    @property
    def n_layers(self) -> int:
        return 1 if self.layers is None else len(self.layers)

    @property
    def matrix(self) -> tuple[int, int]:
        """(d_in, d_out) of one layer's kernel as a matrix."""
        dims = self.shape[len(self.shape) - self.n_in - self.n_out:]
        return math.prod(dims[:self.n_in]), math.prod(dims[self.n_in:])

    @classmethod
    def of(cls, sel: Selected) -> "Target":
        """The weight of a selected layer (a Dense kernel or the embedding table)."""
        w = weight(sel.dense)
        n_in, n_out = w.get_metadata()["matrix"]
        leaf = "kernel" if isinstance(sel.dense, Dense) else "embedding"
        layers = sel.layers if stacked_layers(sel.dense) else None
        return cls("/".join(map(str, (*sel.path, leaf))), tuple(w.shape), n_in, n_out, layers)

    def selected(self) -> np.ndarray:
        return np.ones(self.n_layers, bool) if self.layers is None else np.asarray(self.layers)

    def as_layers(self, x: jax.Array) -> jax.Array:
        """``[*lead, *in, *out] -> [layers, d_in, d_out]``."""
        return x.reshape(self.n_layers, *self.matrix)

    def from_layers(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.shape)
