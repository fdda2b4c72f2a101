"""The math of weight quantization, on one weight matrix ``w [d_in, d_out]`` (``y = x @ w``).

Everything on arrays is pure JAX in float32 and jittable (bit widths and group sizes are static
Python numbers); callers vmap over stacked layers and reshape multi-dim kernels to 2-D first.

Scheme. Groups of ``group_size`` consecutive input rows share one scale per output column
(``group_size`` 0 or -1: one group spanning ``d_in``, i.e. per output channel). Codes are signed
integers in ``[-2^(b-1), 2^(b-1) - 1]`` held in int8, rounded to nearest:

* symmetric: ``scale = absmax / (2^(b-1) - 1/2)`` and ``w ~ q * scale``: the full two's
  complement range is used (the top code covers ``[qmax - 1/2, qmax + 1/2)``, as in qwix);
* asymmetric: the group's range ``[min(w, 0), max(w, 0)]`` (it holds 0, so a zero weight, e.g. a
  pruned one, stays exactly 0) spans all ``2^b`` codes, ``scale = range / (2^b - 1)``, and an
  integer zero point ``z`` gives ``w ~ (q - z) * scale``.

Either way ``|w - dequantize(quantize(w))| <= scale / 2`` elementwise (up to float rounding).

The pieces: ``quantize`` / ``dequantize`` (round-to-nearest); ``pack`` / ``unpack`` (2 or 4
codes per byte, exact); ``gptq`` (Frantar et al. 2022: quantize input rows in order and move each
row's error onto the rows not yet quantized through the inverse Hessian of the layer's
reconstruction loss, the same machinery as SparseGPT); ``output_error``; ``storage_bytes``;
``layer_sensitivity`` and ``allocate_bits`` (exact per-layer bit widths under a byte budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from slimjax.config import FLOAT_BITS, QUANT_BITS
from slimjax.errors import SlimjaxError
from slimjax.slim.pruning import _HIGHEST, _inverse_hessian_factor, reconstruction_error

BITS = QUANT_BITS  # integer widths a code may have; FLOAT_BITS (16): not quantized, a bf16 matrix in byte counts
SCALE_BYTES = 4  # each scale (and zero point) is a float32


def check_bits(bits: int, key: str = "bits") -> int:
    """``bits`` if it is a supported integer width, else a SlimjaxError naming ``key``."""
    if bits not in BITS:
        raise SlimjaxError(f"{key}={bits!r} is not a supported width; use one of {', '.join(map(str, BITS))}")
    return int(bits)


def group_count(d_in: int, group_size: int, key: str = "group_size", layer: str = "") -> int:
    """How many groups ``d_in`` input rows form; ``group_size`` must divide ``d_in`` (0 / -1: one group)."""
    if group_size in (0, -1):
        return 1
    if group_size < 0 or d_in % group_size:
        of = f" of layer '{layer}'" if layer else ""
        raise SlimjaxError(f"{key}={group_size} does not divide the input dim {d_in}{of}; use a divisor of it, "
                           "or 0 for one scale per output channel")
    return d_in // group_size


def code_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) signed code of a ``bits``-wide integer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _params(w: jax.Array, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and zero point) of each column of ``w [..., rows, d_out]`` over its rows: ``[..., d_out]``."""
    lo, hi = code_range(bits)
    tiny = jnp.sqrt(jnp.finfo(jnp.float32).tiny)
    if symmetric:
        scale = jnp.max(jnp.abs(w), axis=-2) / (hi + 0.5)
        # An all-zero group: any scale reproduces it; 1 avoids dividing by zero.
        return jnp.where(scale < tiny, 1.0, scale), None
    w_min = jnp.minimum(jnp.min(w, axis=-2), 0.0)
    w_max = jnp.maximum(jnp.max(w, axis=-2), 0.0)
    scale = (w_max - w_min) / (hi - lo)
    scale = jnp.where(scale < tiny, 1.0, scale)
    return scale, jnp.clip(jnp.round(lo - w_min / scale), lo, hi)


def _codes(w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
    lo, hi = code_range(bits)
    q = w / scale if zero is None else w / scale + zero
    return jnp.clip(jnp.round(q), lo, hi).astype(jnp.int8)


def _values(q: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
    q = q.astype(jnp.float32)
    return (q if zero is None else q - zero) * scale


def quantize(w: jax.Array, bits: int, group_size: int = 0, symmetric: bool = True
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Round-to-nearest quantization of ``w [d_in, d_out]``.

    Returns ``(q int8 [d_in, d_out], scale f32 [groups, d_out], zero f32 [groups, d_out] | None)``;
    ``zero`` (integer-valued) only when asymmetric.
    """
    w = jnp.asarray(w, jnp.float32)
    d_in, d_out = w.shape
    groups = group_count(d_in, group_size)
    check_bits(bits)
    grouped = w.reshape(groups, d_in // groups, d_out)
    scale, zero = _params(grouped, bits, symmetric)
    q = _codes(grouped, scale[:, None], None if zero is None else zero[:, None], bits)
    return q.reshape(d_in, d_out), scale, zero


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array | None = None) -> jax.Array:
    """The float32 ``[d_in, d_out]`` matrix that codes ``q`` with ``scale`` (and ``zero``) ``[groups, d_out]`` mean.

    Leading dims (stacked layers) broadcast: ``q [..., d_in, d_out]`` with ``scale [..., groups, d_out]``.
    """
    *lead, d_in, d_out = q.shape
    groups = scale.shape[-2]
    grouped = q.reshape(*lead, groups, d_in // groups, d_out)
    z = None if zero is None else zero[..., None, :]
    return _values(grouped, scale[..., None, :], z).reshape(*lead, d_in, d_out)


def fake_quantize(w: jax.Array, bits: int, group_size: int = 0, symmetric: bool = True) -> jax.Array:
    """``dequantize(quantize(w))`` in ``w``'s dtype (what a QAT forward pass sees)."""
    return dequantize(*quantize(w, bits, group_size, symmetric)).astype(w.dtype)


def container_bits(bits: int) -> int:
    """Bits each code takes when packed: 2, 4 (3- and 4-bit codes) or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(q: jax.Array, bits: int) -> jax.Array:
    """Packs signed codes ``q [..., n]`` of width ``bits`` into ``uint8 [..., n * c / 8]`` (``c`` =
    :func:`container_bits`), consecutive codes of the last axis low bits first. 8-bit codes come
    back as their int8 array. ``n`` must be a multiple of ``8 / c``."""
    c = container_bits(bits)
    if c == 8:
        return jnp.asarray(q, jnp.int8)
    per = 8 // c
    if q.shape[-1] % per:
        raise SlimjaxError(f"cannot pack {bits}-bit codes: the last dim {q.shape[-1]} is not a multiple of {per}")
    u = (jnp.asarray(q, jnp.int32) & (2 ** c - 1)).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = jnp.arange(per, dtype=jnp.int32) * c
    return jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """The int8 codes :func:`pack` packed (sign-extended from their container)."""
    c = container_bits(bits)
    if c == 8:
        return jnp.asarray(packed, jnp.int8)
    per = 8 // c
    shifts = jnp.arange(per, dtype=jnp.int32) * c
    u = (jnp.asarray(packed, jnp.int32)[..., None] >> shifts) & (2 ** c - 1)
    signed = jnp.where(u >= 2 ** (c - 1), u - 2 ** c, u)  # two's complement within the container
    return signed.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(jnp.int8)


def pack_int4(q: jax.Array) -> jax.Array:
    """Two signed 4-bit codes per byte along the last axis (even length): :func:`pack` at 4 bits."""
    return pack(q, 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of :func:`pack_int4`."""
    return unpack(packed, 4)


def gptq(w: jax.Array, gram: jax.Array, bits: int, group_size: int = 0, symmetric: bool = True, *,
         block: int = 128, damp: float = 0.01) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """GPTQ (Frantar et al. 2022): quantize ``w [d_in, d_out]`` row by row, compensating errors.

    Every output column is a least-squares problem over the inputs with Hessian ``H = X^T X``
    (``gram [d_in, d_in]`` from calibration inputs). Input rows are quantized in order; with ``U``
    the upper Cholesky factor of ``H^-1``, quantizing row ``j`` to ``q_j`` and re-optimising the
    rows not yet quantized (the OBS update) is ``w[j:] -= U[j, j:]^T (w_j - q_j) / U_jj``. Rows go
    in blocks: updates inside a block are sequential, the block's accumulated update to later
    rows is one matmul. Each group's scale (and zero point) is fixed from the already-updated
    weights when its first row is reached (per-channel: from the original ``w``), so the codes
    are plain RTN codes of the group's scale, and ``dequantize`` reads them as usual.

    Same return as :func:`quantize`. ``damp`` times the mean diagonal is added to ``H``.
    """
    w = jnp.asarray(w, jnp.float32)
    d_in, d_out = w.shape
    groups = group_count(d_in, group_size)
    check_bits(bits)
    size = d_in // groups
    if groups == 1:
        fixed = _params(w, bits, symmetric)  # per-channel: one scale from the whole column
        step = min(block, d_in)
    else:
        fixed = None
        step = max(size, block // size * size)  # whole groups per block
    u, _ = _inverse_hessian_factor(gram, damp)

    codes, scales, zeros = [], [], []
    for start in range(0, d_in, step):
        end = min(start + step, d_in)
        n = end - start
        span = n if fixed is not None else size
        w1, u1 = w[start:end], u[start:end, start:end]

        def one_group(g, carry, u1=u1, span=span):
            w1, q1, err, sc, zp = carry
            rows = g * span
            if fixed is None:
                s, z = _params(lax.dynamic_slice_in_dim(w1, rows, span), bits, symmetric)
            else:
                s, z = fixed
            sc = sc.at[g].set(s)
            if z is not None:
                zp = zp.at[g].set(z)

            def one_row(r, carry):
                w1, q1, err = carry
                j = rows + r
                q = _codes(w1[j], s, z, bits)
                e = (w1[j] - _values(q, s, z)) / u1[j, j]
                # U is upper triangular: rows before j (already quantized) do not move.
                return w1 - u1[j][:, None] * e[None, :], q1.at[j].set(q), err.at[j].set(e)

            w1, q1, err = lax.fori_loop(0, span, one_row, (w1, q1, err))
            return w1, q1, err, sc, zp

        n_groups = n // span
        init = (w1, jnp.zeros((n, d_out), jnp.int8), jnp.zeros((n, d_out), jnp.float32),
                jnp.zeros((n_groups, d_out), jnp.float32), jnp.zeros((n_groups, d_out), jnp.float32))
        _, q1, err, sc, zp = lax.fori_loop(0, n_groups, one_group, init)
        if end < d_in:
            w = w.at[end:].add(-jnp.matmul(u[start:end, end:].T, err, precision=_HIGHEST))
        codes.append(q1)
        scales.append(sc)
        zeros.append(zp)
    q = jnp.concatenate(codes)
    if fixed is not None:
        return q, fixed[0][None], None if symmetric else fixed[1][None]
    return q, jnp.concatenate(scales), None if symmetric else jnp.concatenate(zeros)


def output_error(w: jax.Array, w_q: jax.Array, gram: jax.Array) -> jax.Array:
    """``sum ||x w - x w_q||^2`` over the calibration inputs whose gram is ``gram``."""
    return reconstruction_error(w, w_q, gram)


def storage_bytes(d_in: int, d_out: int, bits: int, group_size: int = 0, symmetric: bool = True) -> int:
    """Bytes of one ``[d_in, d_out]`` matrix stored at ``bits``: packed codes (``ceil(d_in * d_out *
    c / 8)`` with ``c`` the container width) plus a float32 scale, and an asymmetric zero point,
    per (group, output column); 16 bits is a bf16 matrix with nothing else."""
    if bits == FLOAT_BITS:
        return 2 * d_in * d_out
    check_bits(bits)
    groups = group_count(d_in, group_size)
    per_scale = SCALE_BYTES * (1 if symmetric else 2)
    return math.ceil(d_in * d_out * container_bits(bits) / 8) + groups * d_out * per_scale


def layer_sensitivity(w: jax.Array, gram: jax.Array, candidates: Sequence[int] = (2, 3, 4, 8, 16),
                      group_size: int = 0, symmetric: bool = True, method: str = "rtn") -> np.ndarray:
    """The output error (:func:`output_error` on the calibration gram) of ``w [d_in, d_out]`` at
    each candidate width: RTN or GPTQ codes (``method``); 16 is rounding to bfloat16."""
    if method not in ("rtn", "gptq"):
        raise SlimjaxError(f"method={method!r} is not a quantization method; use 'rtn' or 'gptq'")
    w = jnp.asarray(w, jnp.float32)
    out = []
    for bits in candidates:
        if bits == FLOAT_BITS:
            w_q = w.astype(jnp.bfloat16).astype(jnp.float32)
        elif method == "rtn":
            w_q = dequantize(*quantize(w, bits, group_size, symmetric))
        else:
            w_q = dequantize(*gptq(w, gram, bits, group_size, symmetric))
        out.append(float(output_error(w, w_q, gram)))
    return np.asarray(out, np.float64)


def allocate_bits(sizes: Sequence, costs, budget_bytes: int, candidates: Sequence[int] = (2, 3, 4, 8, 16),
                  bytes_fn: Callable[[object, int], int] | None = None) -> tuple[list[int], float, int]:
    """Per-layer widths minimising the summed predicted cost under a byte budget, exactly.

    Layer ``l`` at candidate width ``b`` (``costs[l][k]`` for ``candidates[k]``, e.g. the loss
    increase or output error when only that layer is quantized) takes ``bytes_fn(sizes[l], b)``
    bytes (default: ``sizes[l]`` is ``(d_in, d_out)`` or ``(d_in, d_out, group_size,
    symmetric)`` and bytes are :func:`storage_bytes`). This is a multiple-choice knapsack, solved
    by dynamic programming over the Pareto frontier of (bytes, cost) of the layers so far: a
    partial choice costlier and no smaller than another can never be part of a better whole, so
    only non-dominated ones are kept, with integer byte sums (no discretisation). The frontier
    holds at most one entry per distinct byte total below the budget.

    Returns ``(bits per layer, total cost, total bytes)``; ties in cost go to fewer bytes. A
    budget below the smallest possible size is a SlimjaxError naming that size.
    """
    costs = np.asarray(costs, np.float64)
    n_layers = len(sizes)
    if costs.shape != (n_layers, len(candidates)):
        raise SlimjaxError(f"costs have shape {costs.shape}; need (layers, candidates) = "
                           f"({n_layers}, {len(candidates)})")
    bytes_fn = bytes_fn or (lambda size, bits: storage_bytes(size[0], size[1], bits, *size[2:]))
    table = np.asarray([[int(bytes_fn(s, b)) for b in candidates] for s in sizes], np.int64)
    smallest = int(table.min(axis=1).sum())
    if budget_bytes < smallest:
        raise SlimjaxError(f"byte budget {budget_bytes} is below the smallest possible size {smallest} "
                           f"(every layer at its cheapest width); raise the budget to at least {smallest}")
    # Frontier after each layer: bytes ascending, cost strictly descending; with back-pointers.
    f_bytes, f_cost = np.zeros(1, np.int64), np.zeros(1, np.float64)
    back = []
    for layer in range(n_layers):
        nb = (f_bytes[:, None] + table[layer][None, :]).reshape(-1)
        nc = (f_cost[:, None] + costs[layer][None, :]).reshape(-1)
        parent = np.repeat(np.arange(f_bytes.size), len(candidates))
        choice = np.tile(np.arange(len(candidates)), f_bytes.size)
        ok = nb <= budget_bytes
        nb, nc, parent, choice = nb[ok], nc[ok], parent[ok], choice[ok]
        order = np.lexsort((nc, nb))  # by bytes, then cost
        nb, nc, parent, choice = nb[order], nc[order], parent[order], choice[order]
        # Keep an entry only if it is strictly cheaper than everything no larger.
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(nc)[:-1]])
        keep = nc < best_before
        f_bytes, f_cost = nb[keep], nc[keep]
        back.append((parent[keep], choice[keep]))
    i = int(np.argmin(f_cost))  # the first minimum: fewest bytes among equal costs
    total_cost, total_bytes = float(f_cost[i]), int(f_bytes[i])
    bits = [0] * n_layers
    for layer in reversed(range(n_layers)):
        parent, choice = back[layer]
        bits[layer] = int(candidates[choice[i]])
        i = int(parent[i])
    return bits, total_cost, total_bytes
