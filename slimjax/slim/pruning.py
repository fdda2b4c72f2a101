"""The math of pruning and sparse training, on one weight matrix ``w [d_in, d_out]`` (``y = x @ w``).

Everything here is pure JAX in float32 and jittable: sparsities, N:M patterns and block sizes are
static Python numbers, arrays may be traced, and callers vmap over stacked layers (multi-dim
kernels are reshaped to 2-D first). The pieces:

* scores: ``magnitude_scores`` (|w|) and ``wanda_scores`` (|w| times the input's RMS norm, Sun et
  al. 2023);
* masks keeping the highest scores with exact counts: ``keep_mask`` per matrix, per output column
  or N:M along the input dim, and ``global_keep_masks`` with one threshold across matrices;
* ``sparsegpt`` (Frantar & Alistarh 2023): prune and update the remaining weights with the
  inverse Hessian of the layer's reconstruction loss; ``reconstruction_error`` measures that loss;
* schedules: ``cubic_sparsity`` (Zhu & Gupta 2017) and ``cosine_fraction`` (RigL's drop fraction);
* ``erk_densities``: Erdős–Rényi-Kernel per-layer densities (Evci et al. 2020);
* ``drop_and_grow``: one RigL / SET mask update at a constant number of active weights.

Ties between equal scores are always broken the same way: the lower flat (row-major) index ranks
first, so it is kept (or grown) before, and dropped after, any later equal score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from slimjax.errors import SlimjaxError

# Pruning decisions hinge on small differences (OBS updates, Cholesky factors): matmuls run at
# full float32 precision even where the backend would default to bf16 passes (TPU).
_HIGHEST = lax.Precision.HIGHEST


def _check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise SlimjaxError(f"{name}={sparsity!r} must be in [0, 1]; it is the fraction of weights removed")


def _check_nm(nm: tuple[int, int], d_in: int) -> tuple[int, int]:
    n, m = (int(v) for v in nm)
    if not 0 < n <= m:
        raise SlimjaxError(f"nm={tuple(nm)!r}: need 0 < N <= M (keep N of every M inputs, e.g. (2, 4))")
    if d_in % m:
        raise SlimjaxError(f"nm={tuple(nm)!r}: the input dim {d_in} is not a multiple of M={m}; "
                           "use an M that divides it or leave this layer out of N:M pruning")
    return n, m


def magnitude_scores(w: jax.Array) -> jax.Array:
    """Magnitude pruning scores: ``|w|``."""
    return jnp.abs(jnp.asarray(w, jnp.float32))


def wanda_scores(w: jax.Array, sq_norm: jax.Array) -> jax.Array:
    """Wanda scores ``|w_ij| * ||x_i||`` (Sun et al. 2023).

    ``sq_norm[d_in]`` is the sum over calibration tokens of each input feature squared, so
    ``sqrt(sq_norm)`` is the norm of that input's column of activations. Wanda compares scores
    within each output column (``keep_mask(..., per="output")``).
    """
    return jnp.abs(jnp.asarray(w, jnp.float32)) * jnp.sqrt(jnp.asarray(sq_norm, jnp.float32))[:, None]


def keep_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a ``sparsity`` keeps: ``n - round(sparsity * n)``.

    The pruned count is rounded with Python's ``round`` (to nearest, halves to even), so e.g. 50%
    of 7 prunes 4 and keeps 3, and 50% of 5 prunes 2 and keeps 3.
    """
    _check_sparsity(sparsity)
    return n - round(sparsity * n)


def _ranks(keys: Sequence[jax.Array], axis: int) -> jax.Array:
    """Each element's 0-based position when sorted ascending by ``keys`` (lexicographic) along ``axis``.

    The element's index along ``axis`` is the last key, so equal keys rank by index: the ranks
    along ``axis`` are always a permutation, whatever the backend's sort stability.
    """
    shape = keys[0].shape
    iota = lax.broadcasted_iota(jnp.int32, shape, axis % len(shape))
    order = lax.sort((*keys, iota), dimension=axis % len(shape), num_keys=len(keys) + 1)[-1]
    # Sorting the permutation back carries each sorted position to its element: the inverse
    # permutation, i.e. the rank (a second sort avoids a scatter along an arbitrary axis).
    return lax.sort((order, iota), dimension=axis % len(shape), num_keys=1)[1]


def _top_mask(scores: jax.Array, k, axis: int) -> jax.Array:
    """True at the ``k`` highest scores along ``axis`` (``k`` may be traced)."""
    return _ranks((-scores,), axis) < k


def keep_top(scores: jax.Array, k) -> jax.Array:
    """True at the ``k`` highest ``scores`` of the whole array (``k`` may be traced; ties: lower index)."""
    return _top_mask(scores.reshape(-1), k, 0).reshape(scores.shape)


def keep_mask(scores: jax.Array, sparsity: float, *, per: str = "matrix",
              nm: tuple[int, int] | None = None) -> jax.Array:
    """The mask (True = keep) of the highest ``scores [d_in, d_out]``, with exact counts.

    ``per="matrix"`` keeps ``keep_count(d_in * d_out, sparsity)`` over the whole matrix;
    ``per="output"`` keeps ``keep_count(d_in, sparsity)`` inputs in every output column (Wanda's
    comparison group). ``nm=(N, M)`` keeps exactly N of every M consecutive input rows in every
    column (N:M semi-structured sparsity such as 2:4; ``d_in`` must be a multiple of M); it
    overrides ``sparsity`` and ``per``. Ties: the lower index is kept.
    """
    scores = jnp.asarray(scores, jnp.float32)
    d_in, d_out = scores.shape
    if nm is not None:
        n, m = _check_nm(nm, d_in)
        grouped = scores.reshape(d_in // m, m, d_out)
        return _top_mask(grouped, n, axis=1).reshape(d_in, d_out)
    if per == "matrix":
        return _top_mask(scores.reshape(-1), keep_count(d_in * d_out, sparsity), axis=0).reshape(d_in, d_out)
    if per == "output":
        return _top_mask(scores, keep_count(d_in, sparsity), axis=0)
    raise SlimjaxError(f"per={per!r} is not a comparison group; use 'matrix' or 'output'")


def global_keep_masks(scores: Sequence[jax.Array], sparsity: float) -> list[jax.Array]:
    """Masks keeping the highest scores across all matrices at once: one threshold for all.

    Exactly ``keep_count(total size, sparsity)`` entries are kept overall; ties are kept in list
    order, then by index within a matrix. Scores of different matrices must be comparable (e.g.
    magnitudes), since a single ranking decides.
    """
    flat = jnp.concatenate([jnp.asarray(s, jnp.float32).reshape(-1) for s in scores])
    kept = _top_mask(flat, keep_count(flat.size, sparsity), axis=0)
    masks, start = [], 0
    for s in scores:
        masks.append(kept[start:start + s.size].reshape(s.shape))
        start += s.size
    return masks


def _inverse_hessian_factor(gram: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) and which inputs are live.

    ``H`` is the gram with dead inputs (never non-zero in calibration: zero diagonal) given a unit
    diagonal, so they decouple from the rest, then the diagonal raised by ``damp`` times its mean
    to keep the inverse well conditioned.
    """
    h = jnp.asarray(gram, jnp.float32)
    h = (h + h.T) / 2
    diag = jnp.diagonal(h)
    live = diag > 0
    h = jnp.where(live[:, None] & live[None, :], h, 0.0)
    diag = jnp.where(live, diag, 1.0)
    diag = diag + damp * jnp.mean(diag)
    h = h.at[jnp.diag_indices(h.shape[0])].set(diag)
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)
    lower = jnp.linalg.cholesky(h)
    lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    h_inv = jnp.matmul(lower_inv.T, lower_inv, precision=_HIGHEST)
    h_inv = (h_inv + h_inv.T) / 2
    return jnp.linalg.cholesky(h_inv).T, live


def sparsegpt(w: jax.Array, gram: jax.Array, sparsity: float, *, nm: tuple[int, int] | None = None,
              block: int = 128, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh 2023): prune ``w [d_in, d_out]`` and update the remaining weights.

    Each output column is a least-squares problem over the inputs with Hessian ``H = X^T X``
    (``gram [d_in, d_in]`` from calibration inputs ``X [tokens, d_in]``). Input rows are pruned in
    order; removing row ``j`` from the rows not yet fixed and re-optimising those (the OBS update)
    is ``w[j:] -= U[j, j:]^T (w[j] / U[j, j])`` with ``U`` the upper Cholesky factor of ``H^-1``.
    Rows go in blocks of ``block``: the updates inside a block are sequential, the block's
    accumulated update to the later rows is one matmul. The mask is chosen adaptively from the
    current (already updated) weights by ``w^2 / U_jj^2`` (the OBS error of removing ``w``): at
    each block's start, in every output column, for the block's share of the column's pruned
    count (``round(sparsity * end) - round(sparsity * start)`` for rows ``[start, end)``, so every
    column keeps exactly ``keep_count(d_in, sparsity)``); with ``nm=(N, M)`` at the start of every
    group of M rows, keeping N of them (``sparsity`` is then ignored, and ``block`` is rounded
    down to a multiple of M).

    Dead inputs (zero diagonal in ``gram``) score 0, so they are pruned first; they never change
    the other rows. ``damp`` times the mean diagonal is added to the diagonal. Returns the new
    weights (pruned entries exactly 0, float32) and the keep mask.
    """
    w = jnp.asarray(w, jnp.float32)
    d_in, d_out = w.shape
    if nm is not None:
        n, m = _check_nm(nm, d_in)
        block = max(m, block // m * m)
    else:
        _check_sparsity(sparsity)
    if block < 1:
        raise SlimjaxError(f"block={block!r} must be a positive number of input rows")
    u, live = _inverse_hessian_factor(gram, damp)
    u_diag = jnp.diagonal(u)

    masks = []
    for start in range(0, d_in, block):
        end = min(start + block, d_in)
        size = end - start
        if nm is not None:
            group, keep = m, n
        else:
            group, keep = size, size - (round(sparsity * end) - round(sparsity * start))
        w1, u1 = w[start:end], u[start:end, start:end]
        scale = jnp.where(live[start:end], 1.0 / u_diag[start:end], 0.0)[:, None]

        def prune_group(g, carry, u1=u1, scale=scale, group=group, keep=keep):
            w1, mask1, err = carry
            rows = g * group
            score = (lax.dynamic_slice_in_dim(w1, rows, group) * lax.dynamic_slice_in_dim(scale, rows, group)) ** 2
            mask1 = lax.dynamic_update_slice_in_dim(mask1, _top_mask(score, keep, axis=0), rows, axis=0)

            def prune_row(r, carry):
                w1, err = carry
                j = rows + r
                # Only pruned entries move the rest; U is upper triangular, so rows before j stay.
                e = jnp.where(mask1[j], 0.0, w1[j] / u1[j, j])
                return w1 - u1[j][:, None] * e[None, :], err.at[j].set(e)

            w1, err = lax.fori_loop(0, group, prune_row, (w1, err))
            return w1, mask1, err

        init = (w1, jnp.zeros((size, d_out), bool), jnp.zeros((size, d_out), jnp.float32))
        w1, mask1, err = lax.fori_loop(0, size // group, prune_group, init)
        w = w.at[start:end].set(jnp.where(mask1, w1, 0.0))
        if end < d_in:
            w = w.at[end:].add(-jnp.matmul(u[start:end, end:].T, err, precision=_HIGHEST))
        masks.append(mask1)
    return w, jnp.concatenate(masks)


def reconstruction_error(w: jax.Array, w_new: jax.Array, gram: jax.Array) -> jax.Array:
    """``trace((w - w_new)^T gram (w - w_new))``: the summed ``||x w - x w_new||^2`` over calibration tokens."""
    diff = jnp.asarray(w, jnp.float32) - jnp.asarray(w_new, jnp.float32)
    return jnp.sum(diff * jnp.matmul(jnp.asarray(gram, jnp.float32), diff, precision=_HIGHEST))


def cubic_sparsity(step, initial: float, final: float, begin: int, end: int, every: int) -> jax.Array:
    """Gradual pruning's cubic schedule (Zhu & Gupta 2017): the sparsity to hold at ``step``.

    ``s = final + (initial - final) * (1 - (t - begin) / (end - begin))^3`` with ``t`` the last
    pruning step reached (``begin`` plus a multiple of ``every``); ``initial`` before ``begin``,
    ``final`` from ``end`` on. ``step`` may be traced; returns a float32 scalar.
    """
    _check_sparsity(initial, "initial sparsity")
    _check_sparsity(final, "final sparsity")
    if end <= begin or every < 1:
        raise SlimjaxError(f"cubic schedule begin={begin}, end={end}, every={every}: need begin < end and every >= 1")
    step = jnp.asarray(step, jnp.int32)
    t = begin + (jnp.clip(step, begin, end) - begin) // every * every
    progress = (t - begin).astype(jnp.float32) / (end - begin)
    s = final + (initial - final) * (1.0 - progress) ** 3
    return jnp.where(step >= end, jnp.float32(final), s).astype(jnp.float32)


def cosine_fraction(step, alpha: float, end: int) -> jax.Array:
    """RigL's drop-fraction decay: ``alpha / 2 * (1 + cos(pi * step / end))`` before ``end``, then 0."""
    if end < 1:
        raise SlimjaxError(f"cosine schedule end={end}: must be at least 1 step")
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step < end, alpha / 2 * (1 + jnp.cos(jnp.pi * step / end)), 0.0).astype(jnp.float32)


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020) whose kept total is ``density`` of all weights.

    Layer ``l`` gets ``eps * sum(shape_l) / prod(shape_l)`` (for a matrix ``(d_in + d_out) /
    (d_in * d_out)``: smaller layers stay denser), with ``eps`` solved so that the kept counts sum
    to ``density * total``. Layers that would exceed 1 are capped at 1 and ``eps`` is solved again
    for the rest until none exceeds (capping only frees budget, so capped layers stay capped).
    """
    _check_sparsity(density, "density")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        if not rest:
            return [1.0] * len(shapes)
        # Each free layer keeps eps * raw_l * size_l = eps * sum(shape_l).
        eps = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in rest)
        over = {i for i in rest if eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def drop_and_grow(w: jax.Array, mask: jax.Array, grow_scores: jax.Array, fraction) -> jax.Array:
    """One RigL / SET update of a matrix's mask, keeping the number of active weights exactly.

    ``k = floor(fraction * active)`` (``fraction`` may be traced), capped at the number of
    inactive positions; the ``k`` active weights of smallest ``|w|`` are dropped and ``k``
    positions that were inactive before this update, with the highest ``grow_scores``, are grown
    (RigL: ``|dense gradient|``; SET: uniform random scores). A just-dropped weight is never
    regrown in the same update. Ties: the lower index is dropped / grown first. The caller must
    set grown weights to zero (and their optimizer state), so growing does not change the output.
    """
    size = mask.size
    active = jnp.asarray(mask, bool).reshape(-1)
    magnitude = jnp.abs(jnp.asarray(w, jnp.float32)).reshape(-1)
    n_active = jnp.sum(active, dtype=jnp.int32)
    k = jnp.floor(jnp.asarray(fraction, jnp.float32) * n_active.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.clip(k, 0, size - n_active)
    inactive = (~active).astype(jnp.int32)
    # Inactive positions rank after every active one, whatever their magnitude.
    drop = active & (_ranks((inactive, magnitude), axis=0) < k)
    # Candidates are the positions inactive before the update: the just-dropped (active) ones
    # rank after them all, so they cannot come back.
    grow_key = -jnp.asarray(grow_scores, jnp.float32).reshape(-1)
    grow = ~active & (_ranks((1 - inactive, grow_key), axis=0) < k)
    return ((active & ~drop) | grow).reshape(mask.shape)
