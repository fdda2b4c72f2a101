"""Structured pruning that shrinks the model: whole attention heads and MLP neurons are cut out of
every layer, giving a smaller ``ModelConfig`` and parameters of the smaller shapes.

Every layer loses the same number of heads and neurons, so the config stays uniform (one
``n_heads``, ``n_kv_heads``, ``d_ff``) and scanned layers stay stackable; WHICH ones go is chosen
per layer by importance. Under grouped-query attention a kv head serves ``n_heads / n_kv_heads``
consecutive query heads (``jax.nn.dot_product_attention``'s grouping), so whole groups are removed:
the group size, and with it the divisibility of ``n_heads`` by ``n_kv_heads``, is preserved.

Importance is Wanda's (Sun et al. 2023) applied to the output projections: a neuron ``j``
scores ``||row j of down|| * sqrt(sum over calibration tokens of x_j^2)`` with ``x`` the down
projection's input (``LayerStats.sq_norm`` of ``blocks/{i}/mlp/down``); a head scores the sum of
the same over its rows of ``wo`` (input stats of ``blocks/{i}/attn/wo``), a kv group the sum over
its heads. Without statistics the row norms alone are used. Removing a head or neuron then drops
exactly its term from the layer's output: the pruned model equals the original with those rows
of ``wo`` / ``down`` set to zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from slimjax.config import ModelConfig
from slimjax.errors import SlimjaxError
from slimjax.slim.calibrate import LayerStats

HEADS_FLAG, MLP_FLAG = "--heads", "--mlp"

# (module, projection, per-layer axis of the kernel and of the bias that indexes heads or neurons;
# None: the bias is over the output width and is kept whole). Kernels are [*in, *out].
ATTN_Q = (("attn", "wq", 1, 0), ("attn", "wo", 0, None))
ATTN_KV = (("attn", "wk", 1, 0), ("attn", "wv", 1, 0))
MLP_IN = (("mlp", "up", 1, 0), ("mlp", "gate", 1, 0))
MLP_OUT = (("mlp", "down", 0, None),)


def removal_counts(model: ModelConfig, heads: float, mlp: float) -> tuple[int, int]:
    """(kv groups to keep, neurons to keep) per layer for these fractions, rounded to nearest.

    A kv group is one kv head with its query heads (one head under multi-head attention).
    """
    for value, flag, what in ((heads, HEADS_FLAG, "attention heads"), (mlp, MLP_FLAG, "MLP neurons")):
        if not 0.0 <= value < 1.0:
            raise SlimjaxError(f"{flag}={value} must be in [0, 1): it is the fraction of {what} to remove")
    groups = model.n_kv_heads
    keep_groups = groups - math.floor(heads * groups + 0.5)
    if keep_groups < 1:
        unit = "heads" if groups == model.n_heads else f"kv groups ({model.n_heads // groups} heads each)"
        raise SlimjaxError(f"{HEADS_FLAG}={heads} would remove all {groups} {unit} of every layer; give a "
                           f"fraction below {(groups - 0.5) / groups:g}")
    keep_neurons = model.d_ff - math.floor(mlp * model.d_ff + 0.5)
    if keep_neurons < 1:
        raise SlimjaxError(f"{MLP_FLAG}={mlp} would remove all {model.d_ff} MLP neurons of every layer; give a "
                           f"fraction below {(model.d_ff - 0.5) / model.d_ff:g}")
    return keep_groups, keep_neurons


def structured_prune(model: ModelConfig, params: dict, stats: Mapping[str, LayerStats] | None, heads: float,
                     mlp: float) -> tuple[ModelConfig, dict, dict]:
    """Removes the fraction ``heads`` of attention heads (whole kv groups under GQA) and ``mlp``
    of MLP neurons from every layer of a plain decoder.

    ``params`` are the decoder's full parameters (scanned or unrolled, host or device arrays);
    ``stats`` the calibration statistics (``slimjax.slim.calibrate.collect_stats`` over at least
    ``attn/wo`` and ``mlp/down``), or None to rank by weight norms. Returns the smaller config,
    the sliced parameters (same tree layout) and a JSON-ready report: the sizes before and after
    and, per layer (``blocks/{i}``), the kept kv groups, query heads and neurons with every
    group's and neuron's score.
    """
    keep_groups, keep_neurons = removal_counts(model, heads, mlp)
    group = model.n_heads // model.n_kv_heads
    blocks = params["blocks"]
    _check_plain(blocks if model.scan_layers else blocks[0])

    wo_rows = _row_norms(blocks, model, "attn", "wo")  # [L, heads * head_dim]
    down_rows = _row_norms(blocks, model, "mlp", "down")  # [L, d_ff]
    report_layers, q_idx, kv_idx, mlp_idx = {}, [], [], []
    for i in range(model.n_layers):
        head_rows = wo_rows[i] * _activation_scale(stats, f"blocks/{i}/attn/wo", wo_rows.shape[1])
        neuron = down_rows[i] * _activation_scale(stats, f"blocks/{i}/mlp/down", model.d_ff)
        group_scores = head_rows.reshape(model.n_kv_heads, group * model.head_dim).sum(axis=1)
        groups = _top(group_scores, keep_groups)
        neurons = _top(neuron, keep_neurons)
        queries = (groups[:, None] * group + np.arange(group)).reshape(-1)
        q_idx.append(queries)
        kv_idx.append(groups)
        mlp_idx.append(neurons)
        report_layers[f"blocks/{i}"] = {
            "kv_groups": groups.tolist(), "heads": queries.tolist(), "neurons": neurons.tolist(),
            "group_scores": group_scores.tolist(), "neuron_scores": neuron.tolist()}

    new_blocks = blocks
    if keep_groups < model.n_kv_heads:
        new_blocks = _slice(new_blocks, model, ATTN_Q, q_idx)
        new_blocks = _slice(new_blocks, model, ATTN_KV, kv_idx)
    if keep_neurons < model.d_ff:
        new_blocks = _slice(new_blocks, model, MLP_IN + MLP_OUT, mlp_idx)
    smaller = dataclasses.replace(model, n_heads=keep_groups * group, n_kv_heads=keep_groups, d_ff=keep_neurons)
    report = {
        "importance": "wanda" if stats is not None else "weight_norm",
        "n_heads": [model.n_heads, smaller.n_heads], "n_kv_heads": [model.n_kv_heads, smaller.n_kv_heads],
        "d_ff": [model.d_ff, smaller.d_ff], "layers": report_layers,
    }
    return smaller, {**params, "blocks": new_blocks}, report


def _check_plain(block: dict) -> None:
    """Only a plain decoder's projections (kernel, bias) can be sliced: adapters and other
    transform parameters would keep the old shapes."""
    for module, name, _, _ in ATTN_Q + ATTN_KV + MLP_IN + MLP_OUT:
        extra = set(block.get(module, {}).get(name, {})) - {"kernel", "bias"}
        if extra:
            raise SlimjaxError(f"structured pruning needs plain decoder parameters, but {module}/{name} also holds "
                               f"{', '.join(sorted(map(str, extra)))}; export the run (merging adapters) first")


def _row_norms(blocks: dict, model: ModelConfig, module: str, name: str) -> np.ndarray:
    """L2 norms of the rows (input features, flattened) of an output projection, ``[L, d_in]`` float64.

    Computed where the kernel lives; only the norms come to the host.
    """
    if model.scan_layers:
        kernels = [blocks[module][name]["kernel"]]
    else:
        kernels = [blocks[i][module][name]["kernel"][None] for i in range(model.n_layers)]
    out = [np.asarray(jax.device_get(jnp.linalg.norm(jnp.asarray(k, jnp.float32), axis=-1)), np.float64)
           for k in kernels]
    return np.concatenate(out).reshape(model.n_layers, -1)


def _activation_scale(stats: Mapping[str, LayerStats] | None, name: str, size: int) -> np.ndarray | float:
    """Wanda's activation factor ``sqrt(sum x_j^2)`` of a layer's inputs (1 without statistics)."""
    if stats is None:
        return 1.0
    if name not in stats:
        raise SlimjaxError(f"the calibration statistics have no entry for {name}; collect them for the attn/wo and "
                           "mlp/down layers of every block")
    sq = np.asarray(jax.device_get(stats[name].sq_norm), np.float64)
    if sq.shape != (size,):
        raise SlimjaxError(f"the calibration statistics of {name} have shape {sq.shape}, the model's layer reads "
                           f"{size} features; they were collected on another model")
    return np.sqrt(sq)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores in ascending index order (ties: the lower index)."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def _slice(blocks: dict, model: ModelConfig, targets: tuple, indices: list[np.ndarray]) -> dict:
    """``blocks`` with each target's kernel (and indexed bias) cut to ``indices[i]`` in layer i."""
    out = _copy(blocks)
    stacked = model.scan_layers
    per_layer = [(out, np.stack(indices))] if stacked else [(out[i], indices[i]) for i in range(model.n_layers)]
    for block, idx in per_layer:
        for module, name, k_axis, b_axis in targets:
            node = block[module].get(name)
            if node is None:
                continue  # the GELU MLP has no gate
            for leaf, axis in (("kernel", k_axis), ("bias", b_axis)):
                if axis is not None and leaf in node:
                    node[leaf] = _cut(node[leaf], idx, axis, stacked)
    return out


def _cut(x, idx: np.ndarray, axis: int, stacked: bool) -> jax.Array:
    """``x`` restricted to ``idx`` along a per-layer ``axis`` (per stacked layer when ``stacked``)."""
    x, idx = jnp.asarray(x), jnp.asarray(idx)
    if stacked:
        return jax.vmap(lambda a, i: jnp.take(a, i, axis=axis))(x, idx)
    return jnp.take(x, idx, axis=axis)


def _copy(tree: dict) -> dict:
    """A copy of a nested dict's structure (leaves shared), so slicing never edits the caller's."""
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
