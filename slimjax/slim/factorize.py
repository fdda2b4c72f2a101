"""One-shot low-rank factorisation of a trained model: plain or whitened truncated SVD.

The targeted Dense kernels (per-layer patterns) become the ``lowrank`` transform's factors
(:mod:`slimjax.slim.lowrank`). Ranks are chosen from each layer's spectrum
(:mod:`slimjax.slim.ranks`): one rank for all, the smallest keeping a fraction of the energy, or
the best spread under a parameter budget (a fraction of the targeted layers' parameters). Layers
(or scanned stacks) where factoring would not save parameters stay dense. The spec gets a
``('lowrank', options)`` entry with the chosen ranks, ``slimjax.slim.spec.rewrite_fn`` turns the
parameters into that tree on the mesh, and the factors are written layer by layer. Each layer's
SVD runs on its own matrix copied whole to every device (one layer at a time, never the model):
the decomposition needs the whole matrix anyway, and a program of replicated inputs has no
collectives for a LAPACK call to stall on the CPU backend.

``method="svd"`` truncates W itself (best in ``||W - W_r||``). ``method="whitened"`` (SVD-LLM,
Wang et al. 2024) truncates ``L^T W`` with ``L L^T`` the (damped) Gram matrix of the layer's
calibration inputs and maps back with ``L^-T``: best in the layer's output error ``||X W - X
W_r||`` on those inputs. Calibration statistics come from one pass of
:func:`slimjax.slim.calibrate.collect_stats` over the unfactored model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import LowRankConfig
from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense
from slimjax.sharding import Rules, path_str
from slimjax.slim import lowrank as L
from slimjax.slim import pruning
from slimjax.slim import ranks as R
from slimjax.slim.calibrate import LayerStats, collect_stats
from slimjax.slim.oneshot import LayerMatrix, _unflatten, layer_matrices
from slimjax.slim.select import Target, select_layers
from slimjax.slim.spec import ModelSpec, build, rewrite_fn, with_transform

METHODS = ("svd", "whitened")


@dataclasses.dataclass(frozen=True)
class FactorizeOptions:
    """What to factor and how; exactly one of ``rank``, ``energy`` and ``budget`` picks the ranks."""

    method: Literal["svd", "whitened"] = "svd"
    targets: tuple[str, ...] = ("^blocks/",)
    rank: int | None = None  # one rank for every targeted layer
    energy: float | None = None  # per layer the smallest rank keeping this fraction of sum s_i^2
    budget: float | None = None  # keep at most this fraction of the targeted layers' parameters
    damp: float = 0.01  # whitened: diagonal damping of the Gram matrix (fraction of its mean diagonal)


def matrices_of(spec: ModelSpec, targets: Sequence[str]) -> list[LayerMatrix]:
    """Every targeted Dense layer matrix of ``spec``'s model, in block order (whole scanned stacks only)."""
    built = build(spec)
    found = []
    for sel in select_layers(nnx.merge(built.graphdef, built.shapes), targets, "targets"):
        if not isinstance(sel.dense, Dense):
            raise SlimjaxError(f"targets select the embedding table '{sel.name}'; low-rank factorisation covers "
                               "Dense projections only: narrow the patterns (e.g. '^blocks/')")
        if sel.layers is not None and not all(sel.layers):
            raise SlimjaxError(f"targets select only some layers of the scanned stack '{sel.name}', whose layers share "
                               "one rank; select every layer of it or use an unrolled model (model.scan_layers=False)")
        found.append(Target.of(sel))
    return layer_matrices(found)


def groups_of(matrices: Sequence[LayerMatrix]) -> dict[str, list[LayerMatrix]]:
    """Layer matrices by what shares a rank: a scanned stack's layers together, others alone."""
    out: dict[str, list[LayerMatrix]] = {}
    for lm in matrices:
        out.setdefault(lm.name if lm.index is None else lm.target.path, []).append(lm)
    return out


def check_options(opts: FactorizeOptions, matrices: Sequence[LayerMatrix], batches: Sequence) -> None:
    """Bad requests, each named by its value, before any work."""
    if opts.method not in METHODS:
        raise SlimjaxError(f"method={opts.method!r} is not one of {', '.join(METHODS)}")
    chosen = [k for k in ("rank", "energy", "budget") if getattr(opts, k) is not None]
    if len(chosen) != 1:
        raise SlimjaxError(f"give exactly one of rank, energy and budget to choose the ranks, got "
                           f"{', '.join(chosen) or 'none'}")
    if opts.rank is not None:
        for lm in matrices:
            if not 1 <= opts.rank < min(lm.target.matrix):
                raise SlimjaxError(f"rank={opts.rank} must lie in [1, {min(lm.target.matrix)}) for layer '{lm.name}' "
                                   f"({lm.target.matrix[0]} x {lm.target.matrix[1]}): a rank at its smaller side "
                                   "only stores the matrix again")
    if opts.energy is not None:
        R.check_energy(opts.energy)
    if opts.budget is not None and not 0.0 < opts.budget < 1.0:
        raise SlimjaxError(f"budget={opts.budget} must lie in (0, 1): the fraction of the targeted layers' "
                           "parameters to keep")
    if opts.damp < 0:
        raise SlimjaxError(f"damp={opts.damp} must be >= 0")
    if opts.method == "whitened" and not batches:
        raise SlimjaxError("method='whitened' needs calibration batches (slimjax.slim.calibrate.calibration_batches)")


_whitening = jax.jit(L.whitening, static_argnums=1)
_spectrum = jax.jit(L.spectrum)
_svd_factors = jax.jit(L.svd_factors, static_argnums=1)
_whitened_factors = jax.jit(L.whitened_factors, static_argnums=2)


def factorize(spec: ModelSpec, params: dict, opts: FactorizeOptions, mesh: Mesh, rules: Rules,
              batches: Sequence[dict[str, np.ndarray]] | None = None, *,
              progress: Callable[[str], None] = lambda _: None) -> tuple[ModelSpec, dict, dict]:
    """(factored spec, its parameters on the mesh, report) of ``spec``'s ``params``.

    ``batches`` are calibration rows (``slimjax.slim.calibrate.calibration_batches``): needed by
    ``whitened``; with them every layer's relative output error on those inputs is reported.
    The report has one line per targeted layer (name, d_in, d_out, rank or None where it stays
    dense, parameters before and after, retained energy of the truncated spectrum, relative
    output error ``||X (W - W_r)||^2 / ||X W||^2``), the parameter totals of the targeted layers and
    of the whole model (stored parameters of the built specs), and a one-line ``line``.
    """
    batches = list(batches or ())
    matrices = matrices_of(spec, opts.targets)
    check_options(opts, matrices, batches)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def whole(lm: LayerMatrix) -> jax.Array:
        return jax.device_put(lm.read(flat).astype(jnp.float32), replicated)

    stats: dict[str, LayerStats] = {}
    if batches:
        progress(f"calibrating {len(matrices)} layers")
        stats = collect_stats(spec, params, batches, mesh, rules, [f"^{re.escape(lm.name)}$" for lm in matrices],
                              gram=True)

    def chol(lm: LayerMatrix) -> jax.Array | None:
        if opts.method != "whitened":
            return None
        return _whitening(jax.device_put(stats[lm.name].gram, replicated), opts.damp)

    progress("spectra")
    spectra = {lm.name: np.asarray(jax.device_get(_spectrum(whole(lm), chol(lm))), np.float64) for lm in matrices}
    groups = groups_of(matrices)
    shapes = [R.Group(*members[0].target.matrix, tuple(spectra[lm.name] for lm in members))
              for members in groups.values()]
    targeted = sum(math.prod(lm.target.matrix) for lm in matrices)
    if opts.rank is not None:
        chosen = [R.or_dense(g, opts.rank) for g in shapes]
    elif opts.energy is not None:
        chosen = R.energy_ranks(shapes, opts.energy)
    else:
        chosen = R.budget_ranks(shapes, math.floor(opts.budget * targeted))
    rank = {lm.name: r for members, r in zip(groups.values(), chosen) for lm in members}

    entries = tuple(f"{lm.name}={rank[lm.name]}" for lm in matrices if rank[lm.name] is not None)
    source = build(spec)
    target_spec = spec
    new = params
    if entries:
        target_spec = with_transform(spec, L.LowRank(LowRankConfig(tuple(opts.targets), 0, entries)))
        target = build(target_spec)
        out_shardings = rules.tree_shardings(target.axes, target.shapes, mesh)
        progress(f"factoring {len(entries)} layers ({opts.method})")
        new = jax.jit(rewrite_fn(source, target), out_shardings=out_shardings)(params, jax.random.key(0))
        new_flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}
        for lm in matrices:  # the rewrite's factors are placeholders of the right shapes
            r = rank[lm.name]
            if r is not None:
                c = chol(lm)
                write_factors(lm, new_flat, *(_svd_factors(whole(lm), r) if c is None else
                                              _whitened_factors(whole(lm), c, r)))
        new = jax.device_put(_unflatten(new, new_flat), out_shardings)
        new_flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}
        approx = {lm.name: read_factors(lm, new_flat) for lm in matrices if rank[lm.name] is not None}

    layers = []
    for lm in matrices:
        r, (d_in, d_out) = rank[lm.name], lm.target.matrix
        line = {"layer": lm.name, "d_in": d_in, "d_out": d_out, "rank": r, "params_before": d_in * d_out,
                "params_after": d_in * d_out if r is None else r * (d_in + d_out),
                "retained_energy": R.retained_energy(spectra[lm.name], r)}
        if lm.name in stats:
            w = whole(lm)
            w_r = w if r is None else jax.device_put(approx[lm.name], replicated)
            gram = jax.device_put(stats[lm.name].gram, replicated)
            line["relative_error"] = float(pruning.reconstruction_error(w, w_r, gram)
                                           / jnp.maximum(pruning.reconstruction_error(w, 0 * w, gram), 1e-30))
        layers.append(line)
    after = sum(line["params_after"] for line in layers)
    before_model, after_model = count_params(source.shapes), count_params(build(target_spec).shapes)
    report = {"method": opts.method, "damp": opts.damp, "layers": layers, "targeted_params_before": targeted,
              "targeted_params_after": after, "model_params_before": before_model, "model_params_after": after_model,
              "factored_layers": len(entries)}
    for key in ("rank", "energy", "budget"):
        if getattr(opts, key) is not None:
            report[key] = getattr(opts, key)
    if opts.budget is not None:
        report["budget_params"] = math.floor(opts.budget * targeted)
    report["line"] = (f"low-rank ({opts.method}): {len(entries)} of {len(matrices)} layers factored, targeted "
                      f"parameters {targeted:,} -> {after:,} ({after / targeted:.1%}), model {before_model:,} -> "
                      f"{after_model:,}")
    return target_spec, new, report


def count_params(shapes: dict) -> int:
    """Stored parameters of a (possibly abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def factor_paths(lm: LayerMatrix) -> tuple[str, str]:
    """Parameter paths of a layer's ``u`` and ``v`` in the factored tree."""
    module = lm.target.path.rsplit("/", 1)[0]
    return f"{module}/{L.TAP_NAME}/u", f"{module}/{L.TAP_NAME}/v"


def write_factors(lm: LayerMatrix, tree: dict[str, jax.Array], u: jax.Array, v: jax.Array) -> None:
    """Writes one layer's ``u [d_in, r]`` and ``v [r, d_out]`` into the factored parameters ``tree`` (flat)."""
    for path, value in zip(factor_paths(lm), (u, v)):
        x = tree[path]
        value = value.reshape(x.shape if lm.index is None else x.shape[1:]).astype(x.dtype)
        tree[path] = value if lm.index is None else x.at[lm.index].set(value)


def read_factors(lm: LayerMatrix, tree: dict[str, jax.Array]) -> jax.Array:
    """``u @ v`` of one layer as its ``[d_in, d_out]`` matrix, from the factored parameters ``tree`` (flat)."""
    u, v = (tree[p] if lm.index is None else tree[p][lm.index] for p in factor_paths(lm))
    d_in, d_out = lm.target.matrix
    return jnp.matmul(u.reshape(d_in, -1), v.reshape(-1, d_out), precision=jax.lax.Precision.HIGHEST)
