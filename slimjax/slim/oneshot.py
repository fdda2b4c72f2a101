"""One-shot pruning of a trained model: magnitude, Wanda or SparseGPT, unstructured or N:M.

The targeted kernels (``slim.prune.targets`` patterns, per layer) are pruned one layer matrix at
a time on the device mesh: each layer's kernel is read from the sharded parameters as a
``[d_in, d_out]`` matrix, its mask (and, for SparseGPT, its updated weights) computed by
:mod:`slimjax.slim.pruning`, and written back. Wanda and SparseGPT read calibration statistics
of each layer's inputs (:mod:`slimjax.slim.calibrate`); by default they are gathered again
before each block with the blocks before it already pruned (``sequential``), as both papers do,
so later layers are fitted to the inputs they will really see.

The result is the parameters with pruned weights exactly zero and one mask per targeted kernel,
laid out as the pruning transform keeps them (``slim.prune``'s state).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from slimjax.config import PruneConfig
from slimjax.configs import base
from slimjax.errors import SlimjaxError
from slimjax.sharding import Rules, path_str
from slimjax.slim import pruning
from slimjax.slim.calibrate import LayerStats, collect_stats
from slimjax.slim.prune import Prune
from slimjax.slim.select import Target, layer_names
from slimjax.slim.spec import ModelSpec, build, with_transform

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class OneShotOptions:
    """What ``slimjax prune`` was asked for (unstructured part)."""

    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float
    nm: tuple[int, int] | None = None  # (N, M): N of every M consecutive inputs kept
    scope: Literal["layer", "global"] = "layer"  # global: one magnitude threshold over every target
    targets: tuple[str, ...] = ("^blocks/",)
    sequential: bool = True
    block: int = 128  # SparseGPT's lazy-update block of input rows
    damp: float = 0.01  # SparseGPT's diagonal dampening (fraction of the mean diagonal)

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"


@dataclasses.dataclass(frozen=True)
class LayerMatrix:
    """One layer's matrix of a target: per-layer name, the target, and its stacked index (None: unstacked)."""

    name: str
    target: Target
    index: int | None

    def read(self, params: dict[str, jax.Array]) -> jax.Array:
        w = params[self.target.path]
        return (w if self.index is None else w[self.index]).reshape(self.target.matrix)

    def write(self, tree: dict[str, jax.Array], value: jax.Array) -> None:
        t = self.target
        layer_shape = t.shape if self.index is None else t.shape[1:]
        value = value.reshape(layer_shape).astype(tree[t.path].dtype)
        tree[t.path] = value if self.index is None else tree[t.path].at[self.index].set(value)

    @property
    def block(self) -> int | None:
        """The decoder block this layer belongs to (None: outside the blocks, e.g. the output layer)."""
        m = re.match(r"blocks/(\d+)/", self.name)
        return int(m.group(1)) if m else None


def targets_of(spec: ModelSpec, patterns: Sequence[str]) -> list[Target]:
    """The kernels ``patterns`` select in ``spec``'s model (errors name ``--target``)."""
    prune = Prune(dataclasses.replace(default_prune_config(), targets=tuple(patterns)))
    built = build(with_transform(spec, prune))
    return built.transforms[-1].targets


def default_prune_config() -> PruneConfig:
    from slimjax.config import validate

    return validate(base.get_config()).slim.prune


def layer_matrices(targets: list[Target]) -> list[LayerMatrix]:
    """Every selected layer matrix of the targets, in block order."""
    out = []
    for t in targets:
        module = tuple(t.path.split("/")[:-1])
        names = layer_names(module, 0 if t.layers is None else len(t.layers))
        for i, name in enumerate(names):
            if t.layers is None or t.layers[i]:
                out.append(LayerMatrix(name, t, None if t.layers is None else i))
    return sorted(out, key=lambda lm: (lm.block is None, lm.block or 0))


def check_options(opts: OneShotOptions, matrices: list[LayerMatrix]) -> None:
    """Bad combinations, named by the CLI flag, before any work."""
    if opts.method not in METHODS:
        raise SlimjaxError(f"--method={opts.method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 <= opts.sparsity < 1.0:
        raise SlimjaxError(f"--sparsity={opts.sparsity} must lie in [0, 1): the fraction of weights removed")
    if opts.scope == "global" and (opts.method != "magnitude" or opts.nm):
        raise SlimjaxError("--scope=global is a magnitude threshold over all layers; Wanda, SparseGPT and N:M "
                           "compare weights within a layer: use --scope=layer")
    if opts.nm:
        n, m = opts.nm
        for lm in matrices:
            if lm.target.matrix[0] % m:
                raise SlimjaxError(f"--nm={n}:{m}: layer '{lm.name}' has {lm.target.matrix[0]} inputs, not a "
                                   f"multiple of {m}; choose M dividing every targeted layer's input size")


def prune_oneshot(spec: ModelSpec, params: dict, opts: OneShotOptions, mesh: Mesh, rules: Rules,
                  batches: Sequence[dict[str, np.ndarray]] = (), *,
                  progress: Callable[[str], None] = lambda _: None) -> tuple[dict, dict[str, jax.Array], list[dict]]:
    """(pruned parameters, masks by kernel path, per-layer report) of ``spec``'s ``params``.

    ``batches`` are calibration rows (``slimjax.slim.calibrate.calibration_batches``) for Wanda
    and SparseGPT. Parameters keep their shardings; every computation runs on the mesh.
    """
    targets = targets_of(spec, opts.targets)
    matrices = layer_matrices(targets)
    check_options(opts, matrices)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    masks = {t.path: jnp.ones(t.shape, bool) for t in targets}
    report = []

    if opts.scope == "global":
        scores = [pruning.magnitude_scores(lm.read(flat)) for lm in matrices]
        for lm, keep in zip(matrices, pruning.global_keep_masks(scores, opts.sparsity)):
            _apply(lm, flat, masks, lm.read(flat), keep, report, None)
    else:
        groups: dict[int | None, list[LayerMatrix]] = {}
        for lm in matrices:
            groups.setdefault(lm.block if opts.sequential else 0, []).append(lm)
        stats: dict[str, LayerStats] = {}
        for block, group in groups.items():
            if opts.calibrated and (opts.sequential or not stats):
                progress(f"calibrating {'block ' + str(block) if block is not None else 'the output layers'}")
                current = _unflatten(params, flat)
                names = [lm.name for lm in (group if opts.sequential else matrices)]
                stats = collect_stats(spec, current, batches, mesh, rules, [f"^{re.escape(n)}$" for n in names],
                                      gram=opts.method == "sparsegpt")
            for lm in group:
                w = lm.read(flat)
                s = stats.get(lm.name)
                new, keep = _prune_matrix(w, s, opts)
                _apply(lm, flat, masks, new, keep, report, s)
    pruned = jax.device_put(_unflatten(params, flat), shardings)
    return pruned, masks, report


def _prune_matrix(w: jax.Array, stats: LayerStats | None, opts: OneShotOptions) -> tuple[jax.Array, jax.Array]:
    """(new weights, keep mask) of one ``[d_in, d_out]`` matrix."""
    if opts.method == "sparsegpt":
        return _sparsegpt(w, stats.gram, opts.sparsity, opts.nm, opts.block, opts.damp)
    scores = pruning.magnitude_scores(w) if opts.method == "magnitude" else pruning.wanda_scores(w, stats.sq_norm)
    # Wanda compares the weights of each output (its paper's per-output group); magnitude the whole matrix.
    keep = pruning.keep_mask(scores, opts.sparsity, per="output" if opts.method == "wanda" else "matrix", nm=opts.nm)
    return jnp.where(keep, w, 0.0), keep


_sparsegpt = jax.jit(lambda w, gram, s, nm, block, damp: pruning.sparsegpt(w, gram, s, nm=nm, block=block, damp=damp),
                     static_argnums=(2, 3, 4, 5))


def _apply(lm: LayerMatrix, flat: dict, masks: dict, new: jax.Array, keep: jax.Array, report: list,
           stats: LayerStats | None) -> None:
    """Writes one pruned layer matrix and its mask back, and records its line of the report."""
    old = lm.read(flat)
    lm.write(flat, jnp.where(keep, new, 0.0))
    lm.write(masks, keep)
    line = {"layer": lm.name, "shape": list(lm.target.matrix), "sparsity": float(1.0 - jnp.mean(keep))}
    if stats is not None and stats.gram is not None:
        # Output error on the calibration inputs, relative to the layer's output energy.
        err = pruning.reconstruction_error(old, jnp.where(keep, new, 0.0), stats.gram)
        line["relative_error"] = float(err / jnp.maximum(pruning.reconstruction_error(old, 0 * old, stats.gram), 1e-30))
    report.append(line)


def _unflatten(like: dict, flat: dict[str, jax.Array]) -> dict:
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in paths])
