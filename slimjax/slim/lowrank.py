"""Low-rank factorisation (``slim.lowrank``): a targeted kernel W stored as two factors ``u @ v``.

For a kernel ``[*in, *out]`` (``d_in x d_out`` as a matrix, with a leading stacked-layer dim when
layers are scanned) the rewrite removes the dense kernel and puts a :class:`LowRankTap` in the
``Dense.tap`` seam holding ``u [*in, r]`` and ``v [r, *out]``; the layer computes ``(x @ u) @ v +
bias``. ``u`` carries the kernel's logical axes on its in dims and ``v`` on its out dims, with
``lowrank_rank`` on r (replicated by default), so the factors shard like the kernel did. The
rewrite makes factors of the right shapes, drawn at random with ``u @ v`` as spread as the kernel
(a low-rank model trained from scratch starts there); it does not factor the kernel's values: a
trained model is factored by :func:`slimjax.slim.factorize.factorize` (truncated SVD ``u = U_r
sqrt(S_r)``, ``v = sqrt(S_r) V_r^T``, plain or whitened), which computes each layer's SVD on its
own. (An SVD inside the one sharded rewrite program would gather every kernel at once; on the
CPU backend, a LAPACK call between the gathers of a multi-device program can also deadlock.)
Both factors train. ``export`` multiplies ``u @ v`` back into a plain kernel, so exported
checkpoints are dense models that need no ``lowrank`` entry in their recipe.

Ranks are data in the spec (``slim.lowrank.ranks``, ``"blocks/3/attn/wq=16"``; ``slim.lowrank.rank``
for targeted layers not named; 0 leaves them dense), so ``build(spec)`` recreates the shapes.

Scanned layers: every layer of one projection lives in one stacked array, so a stack has ONE rank
for all its layers (a spec giving them different ranks, or factoring some and not others, is
refused: set ``model.scan_layers=False`` for per-layer ranks). The alternative, padding every
layer to the stack's largest rank and masking the extra columns, would store and multiply the
padding: memory and FLOPs would not shrink as far as a count of the "real" parameters claims.
One rank per stack keeps every counted parameter a stored one. Unrolled, each layer has its own.
"""

from __future__ import annotations

import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import LowRankConfig, parse_layer_ranks
from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense
from slimjax.slim.select import Selected, Target, bake_taps, layer_names, select_layers, stacked_layers
from slimjax.slim.transform import Transform

RANK_AXIS = "lowrank_rank"
TAP_NAME = "tap"  # the Dense attribute holding the factors: <dense>/tap/{u,v}
_HIGHEST = jax.lax.Precision.HIGHEST


def svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(u [..., d_in, r], v [..., r, d_out])`` of ``w [..., d_in, d_out]``: the truncated SVD
    ``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T`` (the best rank-r approximation in Frobenius norm)."""
    big, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return big[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def whitening(gram: jax.Array, damp: float) -> jax.Array:
    """The lower Cholesky factor L of ``gram + damp * mean(diag(gram)) * I`` (``gram = X^T X``).

    The damping (relative to the mean input energy, as SparseGPT's) keeps L invertible when the
    calibration tokens do not span every input direction (fewer tokens than inputs, dead features)."""
    g = jnp.asarray(gram, jnp.float32)
    scale = jnp.maximum(jnp.mean(jnp.diag(g)), jnp.finfo(jnp.float32).tiny)
    return jnp.linalg.cholesky(g + damp * scale * jnp.eye(g.shape[0], dtype=g.dtype))


def spectrum(w: jax.Array, chol: jax.Array | None = None) -> jax.Array:
    """Singular values of the matrix the factoriser truncates: ``w``, or ``L^T w`` when whitened."""
    return jnp.linalg.svd(w if chol is None else jnp.matmul(chol.T, w, precision=_HIGHEST), compute_uv=False)


def whitened_factors(w: jax.Array, chol: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """SVD-LLM's factors (Wang et al. 2024) of ``w [d_in, d_out]`` given ``chol`` (L, ``G = L L^T``):
    the truncated SVD of ``L^T w`` mapped back by ``L^-T``. Since ``||X (W - W_r)||_F^2 =
    ||L^T (W - W_r)||_F^2``, this minimises the layer's output error on the calibration inputs
    (plus the damping's share of ``||W - W_r||``) rather than the weights' own error."""
    u, v = svd_factors(jnp.matmul(chol.T, w, precision=_HIGHEST), rank)
    return jax.scipy.linalg.solve_triangular(chol, u, lower=True, trans="T"), v


class LowRankTap(nnx.Module):
    """The factors of one Dense (all its stacked layers): ``u [*lead, *in, r]``, ``v [*lead, r, *out]``."""

    def __init__(self, kernel: nnx.Param, rank: int, rngs: nnx.Rngs):
        meta = kernel.get_metadata()
        self.n_in, self.n_out = meta["matrix"]
        self.kernel_axes = tuple(meta["axes"])
        shape = tuple(kernel.shape)
        lead = len(shape) - self.n_in - self.n_out
        # Entries of u @ v sum r products: factors of std sqrt(std(W)) / r^(1/4) give u @ v the kernel's std.
        std = jnp.sqrt(jnp.std(jnp.asarray(kernel[...], jnp.float32))) / rank ** 0.25
        u_shape, v_shape = (*shape[:lead + self.n_in], rank), (*shape[:lead], rank, *shape[lead + self.n_in:])
        axes = self.kernel_axes
        self.u = nnx.Param(std * jax.random.normal(rngs.params(), u_shape, jnp.float32),
                           axes=(*axes[:lead + self.n_in], RANK_AXIS), matrix=(self.n_in, 1))
        self.v = nnx.Param(std * jax.random.normal(rngs.params(), v_shape, jnp.float32),
                           axes=(*axes[:lead], RANK_AXIS, *axes[lead + self.n_in:]), matrix=(1, self.n_out))
        ins = string.ascii_lowercase[1:1 + self.n_in]
        outs = string.ascii_lowercase[1 + self.n_in:1 + self.n_in + self.n_out]
        self.down_eq = f"...{ins},{ins}z->...z"
        self.up_eq = f"...z,z{outs}->...{outs}"
        # Outside a scan the factors keep their stacked dim; '...' covers it (or nothing).
        self.merge_eq = f"...{ins}z,...z{outs}->...{ins}{outs}"

    def __call__(self, dense: Dense, x: jax.Array) -> jax.Array:
        h = jnp.einsum(self.down_eq, x, self.u[...].astype(dense.dtype))
        y = jnp.einsum(self.up_eq, h, self.v[...].astype(dense.dtype))
        return y if dense.bias is None else y + dense.bias[...].astype(dense.dtype)

    def merged(self) -> jax.Array:
        """``u @ v`` in the kernel's layout (float32)."""
        return jnp.einsum(self.merge_eq, self.u[...], self.v[...], precision=_HIGHEST)


def is_factor(path: str) -> bool:
    """Whether a parameter path is a low-rank factor (``.../wq/tap/u``)."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[-2] == TAP_NAME and parts[-1] in ("u", "v")


class LowRank(Transform):
    """The low-rank transform from ``slim.lowrank``."""

    name = "lowrank"

    def __init__(self, cfg: LowRankConfig):
        self.cfg = cfg

    def options(self) -> dict[str, Any]:
        return {"targets": list(self.cfg.targets), "rank": self.cfg.rank, "ranks": list(self.cfg.ranks)}

    def layer_ranks(self, model: nnx.Module) -> list[tuple[Selected, int]]:
        """Each Dense to factor with its rank (one per stack), checked against its shape."""
        c = self.cfg
        overrides = parse_layer_ranks("slim.lowrank.ranks", c.ranks)
        out, named = [], set()
        for sel in select_layers(model, c.targets, "slim.lowrank.targets"):
            if not isinstance(sel.dense, Dense):
                raise SlimjaxError(f"slim.lowrank.targets selects the embedding table '{sel.name}'; low-rank "
                                   "factorisation covers Dense projections only: narrow the patterns (e.g. '^blocks/')")
            if sel.dense.tap is not None:
                raise SlimjaxError(f"layer '{sel.name}' already has a {type(sel.dense.tap).__name__}; lowrank cannot "
                                   "be stacked on another layer transform in slim.recipe")
            names = layer_names(sel.path, stacked_layers(sel.dense))
            flags = sel.layers or (True,)
            ranks = [overrides.get(n, c.rank) if f else 0 for n, f in zip(names, flags)]
            named |= {n for n, f in zip(names, flags) if f}
            if not any(ranks):
                continue
            if len(set(ranks)) > 1:
                listed = ", ".join(f"{n}={r or 'dense'}" for n, r in zip(names, ranks))
                raise SlimjaxError(f"the scanned stack '{sel.name}' would hold layers of different ranks ({listed}); "
                                   "the layers of one stack share one rank: give them one rank or set "
                                   "model.scan_layers=False")
            d_in, d_out = Target.of(sel).matrix
            if ranks[0] > min(d_in, d_out):
                raise SlimjaxError(f"slim.lowrank rank {ranks[0]} of layer '{names[0]}' exceeds the smaller side of its "
                                   f"{d_in} x {d_out} kernel; choose a rank <= {min(d_in, d_out)}")
            out.append((sel, ranks[0]))
        unknown = sorted(set(overrides) - named)
        if unknown:
            raise SlimjaxError(f"slim.lowrank.ranks names layer '{unknown[0]}', which slim.lowrank.targets does not "
                               "select; name layers like blocks/0/attn/wq")
        return out

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        for sel, rank in self.layer_ranks(model):
            sel.dense.tap = LowRankTap(sel.dense.kernel, rank, rngs)
            sel.dense.kernel = None  # the dense kernel is gone: the parameter count really drops

    def export(self, model: nnx.Module) -> bool:
        merge_factors(model)
        return False


def merge_factors(model: nnx.Module) -> None:
    """Replaces every factored kernel by the plain kernel ``u @ v``, in place."""
    bake_taps(model, LowRankTap, LowRankTap.merged)
