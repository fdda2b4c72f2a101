"""Calibration: activation statistics of chosen Dense layers over rows of the run's training data.

Pruning scores (Wanda, SparseGPT) and quantization scales need, for each layer, statistics of its
INPUT ``x`` over real tokens: the per-feature sum of squares ``sum x_j^2`` and optionally the
Gram matrix ``sum x x^T``, with ``x`` flattened over the layer's input dims (``wo`` reads
``[heads, head_dim]``, flattened head-major).

They are gathered in one jitted forward pass per batch on the device mesh: the model is built
unrolled and without remat, and each selected Dense gets a recording tap (``Dense.tap``) that
adds the statistics of its input to a Python-side collector while tracing. With no jax transform
between layers in that layout (a scan body or a ``jax.checkpoint`` would leak the recorded
tracers), the recorded values are ordinary outputs of the same jitted function. Scanned runs
have their parameters unstacked first, so statistics are always keyed by per-layer names
(``blocks/3/attn/wq``). Sums are float32, accumulated on device across batches and sharded like
the layer's first input dim; padding (segment id 0) is excluded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import Config
from slimjax.data import loader, pipeline, tokenizer
from slimjax.errors import SlimjaxError
from slimjax.infer.generate import unstacked
from slimjax.models import compute_dtype
from slimjax.models.layers import Dense
from slimjax.sharding import Rules, activation_rules, tree_partition, tree_paths
from slimjax.slim.select import select_layers
from slimjax.slim.spec import ModelSpec, build

SAMPLES_FLAG = "--calibration_samples"


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Input statistics of one Dense layer over ``tokens`` real tokens.

    ``sq_norm[j] = sum_t x_tj^2`` ``[d_in_flat]``; ``gram = sum_t x_t x_t^T``
    ``[d_in_flat, d_in_flat]`` or None when not asked for. Both float32 (device arrays).
    """

    sq_norm: jax.Array
    gram: jax.Array | None
    tokens: int


def calibration_batches(cfg: Config, workdir: str, samples: int, batch_size: int | None = None,
                        seed: int | None = None) -> list[dict[str, np.ndarray]]:
    """``samples`` packed rows of ``data.seq_len`` from the run's training data, in batches.

    Rows come from the run's own training stream (``slimjax.data.loader.build`` with the run's
    tokenizer: ``data.tokenizer`` or the one cached in ``<workdir>/tokenizer``; none is ever
    trained here), so the statistics describe the distribution the model was trained on. Batches
    hold ``batch_size`` rows (default ``train.global_batch_size``); a last partial batch is padded
    with all-padding rows (segment id 0, excluded from statistics) so every batch has one shape.
    Deterministic for a given ``seed`` (default ``train.seed``). Multi-process: each process gets
    its own rows of each batch, as in training.
    """
    if samples < 1:
        raise SlimjaxError(f"{SAMPLES_FLAG}={samples} must be at least 1")
    batch_size = cfg.train.global_batch_size if batch_size is None else batch_size
    seed = cfg.train.seed if seed is None else seed
    d = cfg.data
    if d.tokenizer_kind == "sentencepiece" and not d.tokenizer:
        cached = tokenizer.cached_model_path(workdir)
        if not os.path.isfile(cached):
            raise SlimjaxError(f"run '{workdir}' has no cached tokenizer {cached}; give --tokenizer=FILE")
    data = loader.build(d, batch_size, seed, 1, cfg.model.vocab_size, workdir,
                        jax.process_index(), jax.process_count())
    # Past its rows the endless stream repeats rows. Each process counts only its own shards'
    # rows; the others hold about as many.
    available = sum(s["rows"] for s in data.stats["sources"].values()) * jax.process_count()
    if available < samples:
        raise SlimjaxError(f"the training data holds {available} rows of data.seq_len={d.seq_len}, fewer than "
                           f"{SAMPLES_FLAG}={samples}; lower {SAMPLES_FLAG} to at most {available} or add data")
    local = batch_size // jax.process_count()
    need = -(-samples // jax.process_count())  # this process's share of the rows, rounded up
    out = []
    for s in range(-(-need // local)):
        batch = dict(data.train[s])
        real = min(local, need - s * local)
        if real < local:
            batch["segment_ids"] = batch["segment_ids"].copy()
            batch["segment_ids"][real:] = 0  # rows past the sample count: padding
            batch["loss_mask"] = np.where(batch["segment_ids"] > 0, batch["loss_mask"], 0).astype(np.float32)
        out.append(batch)
    return out


def unrolled_spec(spec: ModelSpec) -> ModelSpec:
    """The spec's model unrolled and without remat: the layout the recording taps work in."""
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, scan_layers=False, remat="none"))


def unrolled_params(spec: ModelSpec, params: dict, shapes: dict) -> dict:
    """``params`` (of ``spec``'s layout) in the unrolled layout whose parameters are ``shapes``."""
    if not spec.model.scan_layers:
        return params
    # A layer-selective transform has parameters only for some layers once unrolled: keep those.
    wanted = set(tree_paths(shapes))
    return tree_partition(unstacked(spec.model, params), lambda path: path in wanted)[0]


def collect_stats(spec: ModelSpec, params: dict, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                  rules: Rules, patterns: Sequence[str], *, gram: bool,
                  key: str = "calibration patterns") -> dict[str, LayerStats]:
    """Input statistics of every Dense layer matching ``patterns`` (per-layer names, as in
    ``slimjax.slim.select``), summed over the real tokens of ``batches``.

    ``params`` are the full parameters of ``spec`` (scanned or unrolled, any sharding); batches
    are process-local rows as ``calibration_batches`` gives them. ``key`` names the option that
    holds the patterns in the error for a pattern matching nothing. The embedding table, which
    has no input activations, is never recorded.
    """
    target = unrolled_spec(spec)
    built = build(target, compute_dtype(spec.model.dtype))
    shardings = rules.tree_shardings(built.axes, built.shapes, mesh)
    placed = jax.jit(lambda p: unrolled_params(spec, p, built.shapes), out_shardings=shardings)(params)

    abstract = nnx.merge(built.graphdef, built.shapes)
    selected = [s for s in select_layers(abstract, patterns, key) if isinstance(s.dense, Dense)]
    names = {s.name for s in selected}
    acc_abstract = _abstract_stats(selected, gram, mesh, rules)
    acc_shardings = jax.tree.map(lambda a: a.sharding, acc_abstract)

    def record(params: dict, batch: dict[str, jax.Array], acc: dict) -> dict:
        model = nnx.merge(built.graphdef, params)
        real = (batch["segment_ids"] != 0).astype(jnp.float32)
        found: dict[str, tuple] = {}
        for path, node in nnx.iter_graph(model):
            name = "/".join(map(str, path))
            if isinstance(node, Dense) and name in names:
                node.tap = _recording_tap(name, node.tap, real, gram, found)
        model(batch["inputs"], batch["positions"], batch["segment_ids"])
        out = {name: tuple(a + b for a, b in zip(acc[name], found[name])) for name in names}
        return {**out, "tokens": acc["tokens"] + jnp.sum(batch["segment_ids"] != 0, dtype=jnp.int32)}

    batch_sharding = pipeline.batch_shardings(mesh, rules)
    step = acc = None
    for i, host_batch in enumerate(batches):
        if i and i % 32 == 0:
            jax.block_until_ready(acc)  # bounds the queue of dispatched batches (and their inputs)
        batch = pipeline.to_global({k: host_batch[k] for k in pipeline.BATCH_KEYS}, batch_sharding)
        if step is None:
            with activation_rules(mesh, rules):  # constraints are resolved while tracing
                step = jax.jit(record, in_shardings=(shardings, batch_sharding, acc_shardings),
                               out_shardings=acc_shardings, donate_argnums=2
                               ).lower(placed, batch, acc_abstract).compile()
            acc = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acc_abstract),
                          out_shardings=acc_shardings)()
        acc = step(placed, batch, acc)
    if acc is None:
        raise SlimjaxError(f"no calibration batches to collect statistics from; raise {SAMPLES_FLAG}")
    tokens = int(np.asarray(jax.device_get(acc["tokens"])))
    return {s.name: LayerStats(acc[s.name][0], acc[s.name][1] if gram else None, tokens) for s in selected}


def _recording_tap(name: str, inner: Callable[..., jax.Array] | None, real: jax.Array, gram: bool,
                   found: dict[str, tuple]) -> Callable[[Dense, jax.Array], jax.Array]:
    """A tap that records the statistics of its input under ``name``, then computes the layer as
    it did before (through the transform's own tap, if it had one)."""

    def tap(dense: Dense, x: jax.Array) -> jax.Array:
        n_in = dense.kernel.get_metadata()["matrix"][0]
        lead = x.shape[:x.ndim - n_in]  # [batch, length]
        flat = x.astype(jnp.float32).reshape(*lead, -1) * real[..., None]
        stats = (jnp.einsum("btj,btj->j", flat, flat),)
        if gram:
            stats += (jnp.einsum("btj,btk->jk", flat, flat),)
        found[name] = stats
        return dense.product(x) if inner is None else inner(dense, x)

    return tap


def _abstract_stats(selected: list, gram: bool, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """Shapes and shardings of the accumulators: per layer ``(sq_norm[, gram])`` split like the
    layer's first input dim (the flattened dim's leading blocks), and the replicated token count."""
    out: dict[str, Any] = {}
    for s in selected:
        meta = s.dense.kernel.get_metadata()
        n_in, n_out = meta["matrix"]
        shape, axes = tuple(s.dense.kernel.shape), tuple(meta["axes"])
        first = len(shape) - n_in - n_out
        d = math.prod(shape[first:first + n_in])
        spec = rules.spec((axes[first],), (d,), mesh, what=f"statistics of '{s.name}'")
        stats = (jax.ShapeDtypeStruct((d,), jnp.float32, sharding=NamedSharding(mesh, spec)),)
        if gram:
            stats += (jax.ShapeDtypeStruct((d, d), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(*spec))),)
        out[s.name] = stats
    out["tokens"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return out
