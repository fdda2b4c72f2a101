"""Post-training quantization of a trained model: round to nearest or GPTQ, uniform or adaptive widths.

The targeted Dense kernels (per-layer patterns, as ``slim.quant.targets``) become the ``quant``
transform's stored codes and scales (:mod:`slimjax.slim.quant`): the source spec gets a
``('quant', options)`` entry and ``slimjax.slim.spec.rewrite_fn`` turns the parameters into the
new tree on the mesh (round to nearest). GPTQ then replaces each layer's codes and scales by its
own, computed layer by layer on the mesh from calibration Gram matrices gathered sequentially:
before each decoder block the statistics are collected again with the blocks before it already
quantized (their kernels replaced by the dequantized GPTQ result), as the GPTQ paper does.

Adaptive widths: for every targeted layer and candidate width the output error on the
calibration inputs when only that layer is quantized (RTN or GPTQ codes, one calibration pass on
the float model) is its predicted cost; ``slimjax.slim.quantize.allocate_bits`` picks the widths
minimising the summed cost under the byte budget exactly, and they go into
``slim.quant.layer_bits``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from slimjax.config import FLOAT_BITS, QUANT_BITS
from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense
from slimjax.sharding import Rules, path_str
from slimjax.slim import quantize as Q
from slimjax.slim.calibrate import LayerStats, collect_stats
from slimjax.slim.oneshot import LayerMatrix, _unflatten, layer_matrices
from slimjax.slim.quant import TAP_NAME
from slimjax.slim.select import select_layers
from slimjax.slim.spec import ModelSpec, build, rewrite_fn

METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class PtqOptions:
    """What ``slimjax quantize`` was asked for."""

    bits: int = 8
    group_size: int = 0  # input rows per scale; 0: one scale per output channel
    symmetric: bool = True
    method: Literal["rtn", "gptq"] = "rtn"
    targets: tuple[str, ...] = ("^blocks/",)
    budget_bytes: int | None = None  # adaptive widths under this many bytes of targeted kernels
    budget_bits: float | None = None  # ... or this many bits per targeted weight on average (scales included)
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    sensitivity: Literal["loss", "output"] = "loss"  # adaptive: calibration-loss increase, or layer output error
    sequential: bool = True  # GPTQ: recalibrate before each block with the earlier blocks quantized
    block: int = 128  # GPTQ's lazy-update block of input rows
    damp: float = 0.01  # GPTQ's diagonal dampening (fraction of the mean diagonal)

    @property
    def adaptive(self) -> bool:
        return self.budget_bytes is not None or self.budget_bits is not None

    @property
    def calibrated(self) -> bool:
        return self.adaptive or self.method == "gptq"


def quant_matrices(spec: ModelSpec, opts: PtqOptions) -> list[LayerMatrix]:
    """Every targeted layer matrix of ``spec``'s (float) model, in block order; errors name the flags."""
    from slimjax.slim.prune import Target

    model = nnx.merge(*_abstract(spec))
    targets = []
    for sel in select_layers(model, opts.targets, "--target"):
        if not isinstance(sel.dense, Dense):
            raise SlimjaxError(f"--target selects the embedding table '{sel.name}'; quantization covers Dense "
                               "projections only: narrow the patterns (e.g. '^blocks/')")
        k = sel.dense.kernel
        n_in, n_out = k.get_metadata()["matrix"]
        lead = len(k.shape) - n_in - n_out
        targets.append(Target("/".join(map(str, (*sel.path, "kernel"))), tuple(k.shape), n_in, n_out,
                              sel.layers if lead else None))
    return layer_matrices(targets)


def _abstract(spec: ModelSpec) -> tuple:
    b = build(spec)
    return b.graphdef, b.shapes


def sizes(matrices: Sequence[LayerMatrix], opts: PtqOptions) -> list[tuple[int, int, int, bool]]:
    """``(d_in, d_out, group_size, symmetric)`` per layer (the allocator's sizes), group size checked."""
    out = []
    for lm in matrices:
        d_in, d_out = lm.target.matrix
        Q.group_count(d_in, opts.group_size, "--group_size", lm.name)
        out.append((d_in, d_out, opts.group_size, opts.symmetric))
    return out


def budget(matrices: Sequence[LayerMatrix], opts: PtqOptions) -> int | None:
    """The byte budget of an adaptive run: ``--budget_bytes``, or ``--budget_bits`` times the
    targeted weights over 8, rounded down; None when widths are uniform."""
    if opts.budget_bytes is not None:
        return int(opts.budget_bytes)
    if opts.budget_bits is None:
        return None
    weights = sum(math.prod(lm.target.matrix) for lm in matrices)
    return math.floor(opts.budget_bits * weights / 8)


def check_options(opts: PtqOptions, matrices: Sequence[LayerMatrix], scanned: bool) -> None:
    """Bad flags, named, before any work (the budget against the smallest possible size included)."""
    if opts.sensitivity not in ("loss", "output"):
        raise SlimjaxError(f"--sensitivity={opts.sensitivity!r} is not one of loss, output")
    if opts.method not in METHODS:
        raise SlimjaxError(f"--method={opts.method!r} is not one of {', '.join(METHODS)}")
    Q.check_bits(opts.bits, "--bits")
    if opts.budget_bytes is not None and opts.budget_bits is not None:
        raise SlimjaxError("give one of --budget_bits and --budget_bytes, not both")
    if not opts.candidates or len(set(opts.candidates)) != len(opts.candidates):
        raise SlimjaxError(f"--candidates={','.join(map(str, opts.candidates))} must list distinct widths")
    for b in opts.candidates:
        if b not in (*QUANT_BITS, FLOAT_BITS):
            raise SlimjaxError(f"--candidates holds {b}, not a supported width; use some of "
                               f"{', '.join(map(str, (*QUANT_BITS, FLOAT_BITS)))}")
    if opts.adaptive and scanned and FLOAT_BITS in opts.candidates:
        raise SlimjaxError(f"--candidates holds {FLOAT_BITS} (float), but the run's layers are scanned and a stack is "
                           "quantized whole; drop 16 from --candidates or target whole stacks uniformly")
    shapes = sizes(matrices, opts)
    total = budget(matrices, opts)
    if total is not None:
        smallest = sum(min(Q.storage_bytes(*s[:2], b, *s[2:]) for b in opts.candidates) for s in shapes)
        if total < smallest:
            asked = (f"--budget_bytes={opts.budget_bytes}" if opts.budget_bytes is not None
                     else f"--budget_bits={opts.budget_bits} ({total} bytes)")
            raise SlimjaxError(f"{asked} is below the smallest possible size {smallest} bytes of the targeted layers "
                               f"(every one at its narrowest candidate width); raise the budget")


def _codes(w: jax.Array, gram: jax.Array, bits: int, group: int, symmetric: bool, method: str, block: int,
           damp: float) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    if method == "gptq":
        return Q.gptq(w, gram, bits, group, symmetric, block=block, damp=damp)
    return Q.quantize(w, bits, group, symmetric)


_quantized = jax.jit(_codes, static_argnums=(2, 3, 4, 5, 6, 7))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _error(w: jax.Array, gram: jax.Array, bits: int, group: int, symmetric: bool, method: str, block: int,
           damp: float) -> jax.Array:
    """The output error of one matrix at one width (16: rounded to bfloat16), on the calibration gram."""
    if bits == FLOAT_BITS:
        w_q = w.astype(jnp.bfloat16).astype(jnp.float32)
    else:
        w_q = Q.dequantize(*_codes(w, gram, bits, group, symmetric, method, block, damp))
    return Q.output_error(w, w_q, gram)


def sensitivities(matrices: Sequence[LayerMatrix], flat: dict[str, jax.Array], stats: dict[str, LayerStats],
                  opts: PtqOptions) -> np.ndarray:
    """``[layers, candidates]`` output errors (float64): each layer quantized alone at each width."""
    out = []
    for lm in matrices:
        w, gram = lm.read(flat).astype(jnp.float32), stats[lm.name].gram
        out.append([float(_error(w, gram, b, opts.group_size, opts.symmetric, opts.method, opts.block, opts.damp))
                    for b in opts.candidates])
    return np.asarray(out, np.float64)


def loss_sensitivities(spec: ModelSpec, params: dict, matrices: Sequence[LayerMatrix], opts: PtqOptions,
                       mesh: Mesh, rules: Rules, batches: Sequence[dict[str, np.ndarray]],
                       progress: Callable[[str], None] = lambda _: None) -> np.ndarray:
    """``[layers, candidates]`` increases of the calibration loss (mean next-token NLL over the
    real tokens of ``batches``) when only that layer is quantized at that width (RTN or GPTQ
    codes of the float weights; GPTQ's from ``stats`` grams in :func:`quantize_params`).

    Measured losses are noisy at the wide end, so each row is clipped at zero and made
    decreasing in width (a narrower width never costs less than a wider one; ties are broken
    towards the wider by 1e-12)."""
    from slimjax.data import pipeline
    from slimjax.models import compute_dtype
    from slimjax.sharding import activation_rules

    built = build(spec, compute_dtype(spec.model.dtype))
    shardings = rules.tree_shardings(built.axes, built.shapes, mesh)
    batch_sharding = pipeline.batch_shardings(mesh, rules)
    placed = [pipeline.to_global({k: b[k] for k in pipeline.BATCH_KEYS}, batch_sharding) for b in batches]

    def nll(p: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits = nnx.merge(built.graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        tok = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return -jnp.sum(tok * batch["loss_mask"]), jnp.sum(batch["loss_mask"])

    with activation_rules(mesh, rules):
        step = jax.jit(nll, in_shardings=(shardings, batch_sharding)).lower(params, placed[0]).compile()

    def loss(p: dict) -> float:
        total = [step(p, b) for b in placed]
        return float(sum(t[0] for t in total) / sum(t[1] for t in total))

    flat = {path_str(k): x for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    base = loss(params)
    stats = None
    if opts.method == "gptq":
        stats = collect_stats(spec, params, batches, mesh, rules, [f"^{re.escape(lm.name)}$" for lm in matrices],
                              gram=True)
    out = np.zeros((len(matrices), len(opts.candidates)))
    for i, lm in enumerate(matrices):
        progress(f"loss sensitivity of {lm.name}")
        w = lm.read(flat).astype(jnp.float32)
        gram = stats[lm.name].gram if stats else jnp.zeros((w.shape[0], w.shape[0]), jnp.float32)
        for k, b in enumerate(opts.candidates):
            if b == FLOAT_BITS:
                w_q = w.astype(jnp.bfloat16).astype(jnp.float32)
            else:
                w_q = Q.dequantize(*_quantized(w, gram, b, opts.group_size, opts.symmetric, opts.method, opts.block,
                                               opts.damp))
            one = dict(flat)
            lm.write(one, w_q)
            out[i, k] = loss(jax.device_put(_unflatten(params, one), shardings)) - base
    order = np.argsort(opts.candidates)
    ordered = np.maximum(out[:, order], 0.0)
    ordered = np.flip(np.maximum.accumulate(np.flip(ordered, axis=1), axis=1), axis=1)
    # Ties (equal measured loss) go to the wider width: 3-bit codes take 4-bit containers.
    ordered = ordered + 1e-12 * np.arange(len(order))[::-1]
    out[:, order] = ordered
    return out


def quant_spec(spec: ModelSpec, opts: PtqOptions, bits: dict[str, int]) -> ModelSpec:
    """``spec`` with ``('quant', options)`` appended: ``opts.bits`` everywhere except the layers
    of ``bits`` that differ (``slim.quant.layer_bits``)."""
    from slimjax.config import QuantConfig
    from slimjax.slim.quant import Quant
    from slimjax.slim.spec import with_transform

    default = opts.bits if not bits else max(set(bits.values()), key=list(bits.values()).count)
    layer_bits = tuple(f"{name}={b}" for name, b in bits.items() if b != default)
    cfg = QuantConfig(targets=tuple(opts.targets), bits=default, group_size=opts.group_size,
                      symmetric=opts.symmetric, layer_bits=layer_bits, pack=True)
    return with_transform(spec, Quant(cfg))


def stored_paths(lm: LayerMatrix) -> tuple[str, str, str]:
    """Parameter paths of a layer's codes, scales and zero points in the quantized tree."""
    module = lm.target.path.rsplit("/", 1)[0]
    return tuple(f"{module}/{TAP_NAME}/{k}" for k in ("codes", "scale", "zero"))


def write_codes(lm: LayerMatrix, tree: dict[str, jax.Array], q: jax.Array, scale: jax.Array,
                zero: jax.Array | None) -> None:
    """Writes one layer's codes ``[d_in, d_out]`` (packed like the stored ones) and its scales
    (and zero points) ``[groups, d_out]`` into the quantized parameters ``tree`` (flat)."""
    t = lm.target
    layer_shape = t.shape if lm.index is None else t.shape[1:]
    codes_path, scale_path, zero_path = stored_paths(lm)
    stored = tree[codes_path]
    # Codes per byte: int8 holds one; packed uint8 holds kernel-last-dim / stored-last-dim.
    container = 8 if stored.dtype == jnp.int8 else 8 * stored.shape[-1] // layer_shape[-1]
    packed = Q.pack(q.reshape(layer_shape), container)

    def put(path: str, value: jax.Array) -> None:
        x = tree[path]
        value = value.reshape(x.shape if lm.index is None else x.shape[1:]).astype(x.dtype)
        tree[path] = value if lm.index is None else x.at[lm.index].set(value)

    put(codes_path, packed)
    put(scale_path, scale)
    if zero is not None:
        put(zero_path, zero)


def quantize_params(spec: ModelSpec, params: dict, opts: PtqOptions, mesh: Mesh, rules: Rules,
                    batches: Sequence[dict[str, np.ndarray]] = (), *,
                    progress: Callable[[str], None] = lambda _: None) -> tuple[ModelSpec, dict, dict]:
    """(quantized spec, its parameters on the mesh, report) of a float model ``spec``'s ``params``.

    ``batches`` are calibration rows (``slimjax.slim.calibrate.calibration_batches``), needed by
    GPTQ and adaptive widths. The report holds, per layer, its width, bytes (``storage_bytes``),
    the output error of each candidate width (adaptive) and the relative output error of the
    chosen codes on the calibration inputs (calibrated runs); and the allocation's totals.
    """
    matrices = quant_matrices(spec, opts)
    check_options(opts, matrices, spec.model.scan_layers)
    shapes = sizes(matrices, opts)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    patterns = [f"^{re.escape(lm.name)}$" for lm in matrices]
    bits = {lm.name: opts.bits for lm in matrices}
    summary: dict = {"method": opts.method, "group_size": opts.group_size, "symmetric": opts.symmetric}
    sens = None
    if opts.adaptive:
        progress(f"measuring the {opts.sensitivity} sensitivity of {len(matrices)} layers at widths "
                 f"{','.join(map(str, opts.candidates))}")
        if opts.sensitivity == "loss":
            sens = loss_sensitivities(spec, params, matrices, opts, mesh, rules, batches, progress)
        else:
            stats = collect_stats(spec, params, batches, mesh, rules, patterns, gram=True)
            sens = sensitivities(matrices, flat, stats, opts)
        total_budget = budget(matrices, opts)
        chosen, cost, used = Q.allocate_bits(shapes, sens, total_budget, opts.candidates)
        bits = {lm.name: b for lm, b in zip(matrices, chosen)}
        summary.update(budget_bytes=total_budget, allocated_bytes=used, predicted_cost=cost,
                       sensitivity=opts.sensitivity, candidates=list(opts.candidates))
    target_spec = quant_spec(spec, opts, bits)
    source, target = build(spec), build(target_spec)
    out_shardings = rules.tree_shardings(target.axes, target.shapes, mesh)
    progress("quantizing (round to nearest)")
    quantized = jax.jit(rewrite_fn(source, target), out_shardings=out_shardings)(params, jax.random.key(0))
    qflat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(quantized)[0]}

    errors: dict[str, float] = {}
    if opts.method == "gptq":
        groups: dict[int | None, list[LayerMatrix]] = {}
        for lm in matrices:
            groups.setdefault(lm.block if opts.sequential else 0, []).append(lm)
        stats = {}
        for block, group in groups.items():
            if opts.sequential or not stats:
                progress(f"calibrating {'block ' + str(block) if block is not None else 'the output layers'}")
                names = [f"^{re.escape(lm.name)}$" for lm in group] if opts.sequential else patterns
                stats = collect_stats(spec, _unflatten(params, flat), batches, mesh, rules, names, gram=True)
            for lm in group:
                if bits[lm.name] == FLOAT_BITS:
                    continue
                w, gram = lm.read(flat).astype(jnp.float32), stats[lm.name].gram
                q, s, z = _quantized(w, gram, bits[lm.name], opts.group_size, opts.symmetric, "gptq", opts.block,
                                     opts.damp)
                deq = Q.dequantize(q, s, z)
                errors[lm.name] = _relative(w, deq, gram)
                write_codes(lm, qflat, q, s, z)
                lm.write(flat, deq)  # later blocks calibrate on the quantized model's activations
        quantized = jax.device_put(_unflatten(quantized, qflat), out_shardings)

    layers = []
    for i, (lm, size) in enumerate(zip(matrices, shapes)):
        line = {"layer": lm.name, "shape": list(lm.target.matrix), "bits": bits[lm.name],
                "bytes": Q.storage_bytes(*size[:2], bits[lm.name], *size[2:])}
        if sens is not None:
            line["sensitivity"] = dict(zip(map(str, opts.candidates), sens[i].tolist()))
        if lm.name in errors:
            line["relative_error"] = errors[lm.name]
        layers.append(line)
    weights = sum(math.prod(lm.target.matrix) for lm in matrices)
    total_bytes = sum(line["bytes"] for line in layers)
    summary.update(layers=layers, targeted_weights=weights, bytes=total_bytes, bits_per_weight=8 * total_bytes / weights)
    return target_spec, quantized, summary


def _relative(w: jax.Array, w_q: jax.Array, gram: jax.Array) -> float:
    """Output error of ``w_q`` relative to the layer's output energy on the calibration inputs."""
    return float(Q.output_error(w, w_q, gram) / jnp.maximum(Q.output_error(w, 0 * w, gram), 1e-30))


def allocation_table(summary: dict) -> str:
    """The per-layer widths, bytes and sensitivities as printable lines."""
    cands = summary.get("candidates")
    head = f"{'layer':<24} {'bits':>4} {'bytes':>10}"
    if cands:
        head += "  " + " ".join(f"{'cost@' + str(b):>11}" for b in cands)
    lines = [head]
    for line in summary["layers"]:
        text = f"{line['layer']:<24} {line['bits']:>4} {line['bytes']:>10,}"
        if cands:
            text += "  " + " ".join(f"{line['sensitivity'][str(b)]:>11.4g}" for b in cands)
        lines.append(text)
    lines.append(f"{'total':<24} {summary['bits_per_weight']:>4.2f} {summary['bytes']:>10,}"
                 + (f"  (budget {summary['budget_bytes']:,} bytes)" if "budget_bytes" in summary else ""))
    return "\n".join(lines)
