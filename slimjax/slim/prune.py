"""The pruning transform: sparsity masks as transform state, and how they change while training.

One boolean mask per targeted kernel (``slim.prune.targets``, per-layer patterns as for LoRA),
with the kernel's own shape and logical axes, so each mask is sharded exactly like its kernel.
The masks live in the train state's ``slim`` item (and every checkpoint); the parameters stay
dense arrays whose masked entries are exactly zero:

- the view multiplies each kernel by its mask inside the loss with a straight-through gradient,
  so the raw gradient of a pruned weight is the dense one (RigL grows by it);
- the step zeroes masked gradients before the optimizer, and after each update zeroes masked
  weights and their optimizer moments: a pruned weight never comes back through weight decay or
  Adam's momentum, and a regrown one starts from zero weight and zero moments.

Schedules (``slim.prune.schedule``): ``fixed`` keeps the masks (from ``slimjax prune`` or a
checkpoint; all-dense when fresh); ``gradual`` tightens them by magnitude on Zhu & Gupta's cubic
schedule; ``rigl`` and ``set`` swap a cosine-decaying fraction of each layer's active weights
(drop the smallest, grow by gradient magnitude or at random), holding each layer's density
constant. Per-layer densities are uniform or Erdős–Rényi-Kernel. An L1 term ``l1 * sum |w|``
over the targets joins the objective when ``slim.prune.l1 > 0``.

Every mask update runs inside the jitted step from the step's own key and the masks in the
state, so a resumed run repeats it bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimjax.config import PruneConfig
from slimjax.sharding import path_str, tree_paths
from slimjax.slim import pruning
from slimjax.slim.select import Target, select_layers
from slimjax.slim.transform import LossTerm, Transform, UpdateContext

MASKS = "masks"  # the state key holding the masks, a subtree of the parameter tree


@jax.custom_vjp
def masked(w: jax.Array, mask: jax.Array) -> jax.Array:
    """``w * mask`` whose gradient passes to every entry of ``w`` (straight through the mask)."""
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


masked.defvjp(lambda w, mask: (masked(w, mask), mask), lambda mask, g: (g, None))


def layer_sparsities(targets: list[Target], sparsity: float, distribution: str) -> list[np.ndarray]:
    """Each target's per-layer sparsity: ``sparsity`` everywhere (uniform), or Erdős–Rényi-Kernel
    densities over every selected layer with the same total count of kept weights; layers the
    patterns left out stay dense (sparsity 0)."""
    out = [np.where(t.selected(), sparsity, 0.0) for t in targets]
    if distribution != "erk" or sparsity == 0.0:
        return out
    slots = [(i, j) for i, t in enumerate(targets) for j in np.flatnonzero(t.selected())]
    densities = pruning.erk_densities([targets[i].matrix for i, _ in slots], 1.0 - sparsity)
    for (i, j), d in zip(slots, densities):
        out[i][j] = 1.0 - d
    return out


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *head, last = path.split("/")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def _flat(tree: dict) -> dict[str, Any]:
    """``{path: leaf}``; a tuple (a parameter's logical axes) is one leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {path_str(p): leaf for p, leaf in leaves}


class Prune(Transform):
    """The pruning transform from ``slim.prune``."""

    name = "prune"
    runtime_options = frozenset(f.name for f in dataclasses.fields(PruneConfig)) - {"targets"}

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg
        self.targets: list[Target] = []

    def options(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "targets": list(self.cfg.targets)}

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Records the targeted kernels; the model itself is unchanged (masks are state, not structure)."""
        self.targets = [Target.of(sel) for sel in select_layers(model, self.cfg.targets, "slim.prune.targets")]

    def state_axes(self, axes: dict) -> dict:
        flat = _flat(axes)
        return {MASKS: _nest({t.path: flat[t.path] for t in self.targets})}

    def init_state(self, params: dict) -> dict:
        """Dense masks, or (RigL / SET) random masks at each layer's sparsity drawn from ``seed``."""
        if self.cfg.schedule not in ("rigl", "set"):
            return {MASKS: _nest({t.path: jnp.ones(t.shape, bool) for t in self.targets})}
        masks = {}
        sparsities = layer_sparsities(self.targets, self.cfg.sparsity, self.cfg.distribution)
        for i, (t, s) in enumerate(zip(self.targets, sparsities)):
            key = jax.random.fold_in(jax.random.key(self.cfg.seed), i)
            scores = jax.random.uniform(key, (t.n_layers, *t.matrix))
            keep = jnp.asarray([pruning.keep_count(math.prod(t.matrix), float(x)) for x in s])
            masks[t.path] = t.from_layers(jax.vmap(pruning.keep_top)(scores, keep))
        return {MASKS: _nest(masks)}

    def masks(self, state: dict) -> dict[str, jax.Array]:
        return _flat(state[MASKS]) if state else {}

    def view(self, params: dict, state: dict) -> dict:
        masks = self.masks(state)
        leaves = [masked(x, masks[p]) if p in masks else x for p, x in zip(tree_paths(params), jax.tree.leaves(params))]
        return jax.tree.unflatten(jax.tree.structure(params), leaves)

    def loss_terms(self) -> list[LossTerm]:
        if not self.cfg.l1:
            return []

        def l1(params: dict, state: dict) -> jax.Array:
            flat = _flat(params)
            total = jnp.zeros(())
            for t in self.targets:
                per_layer = jnp.sum(jnp.abs(t.as_layers(flat[t.path])), axis=(1, 2))
                total = total + jnp.sum(per_layer * t.selected())
            return total

        return [LossTerm("l1", self.cfg.l1, l1, per_token=False)]

    def export(self, model: nnx.Module) -> bool:
        return False  # masked weights are zeros in the parameters already: a plain dense model

    def after_update(self, params: dict, state: dict, ctx: UpdateContext) -> tuple[dict, dict]:
        c = self.cfg
        if c.schedule == "fixed" or not state:
            return params, state
        step = ctx.step
        if c.schedule == "gradual":
            due = (step >= c.begin_step) & (step <= c.end_step) & ((step - c.begin_step) % c.every == 0)
        else:
            due = (step >= c.begin_step) & (step < c.end_step) & ((step - c.begin_step) % c.every == 0)
        update = self._tighten if c.schedule == "gradual" else self._swap
        masks = jax.lax.cond(due, lambda: update(_flat(params), self.masks(state), ctx), lambda: self.masks(state))
        return params, {MASKS: _nest(masks)}

    def _tighten(self, params: dict, masks: dict, ctx: UpdateContext) -> dict:
        """Gradual pruning: each selected layer keeps its largest active weights at the scheduled sparsity."""
        c = self.cfg
        now = pruning.cubic_sparsity(ctx.step, c.initial_sparsity, c.sparsity, c.begin_step, c.end_step, c.every)
        finals = layer_sparsities(self.targets, c.sparsity, c.distribution)
        out = dict(masks)
        for t, final in zip(self.targets, finals):
            n = math.prod(t.matrix)
            # Each layer follows the schedule scaled to its own final sparsity (ERK layers differ).
            share = jnp.asarray(final / c.sparsity if c.sparsity else final, jnp.float32)
            keep = n - jnp.round(now * share * n).astype(jnp.int32)
            w, m = t.as_layers(params[t.path]), t.as_layers(masks[t.path])
            scores = jnp.where(m, jnp.abs(w), -1.0)  # pruned weights never come back
            new = jax.vmap(pruning.keep_top)(scores, keep)
            out[t.path] = t.from_layers(jnp.where(t.selected()[:, None, None], new, m))
        return out

    def _swap(self, params: dict, masks: dict, ctx: UpdateContext) -> dict:
        """RigL / SET: drop the smallest active weights, grow as many by gradient magnitude or at random."""
        c = self.cfg
        fraction = pruning.cosine_fraction(ctx.step - c.begin_step, c.drop_fraction, c.end_step - c.begin_step)
        grads = _flat(ctx.grads)
        out = dict(masks)
        for i, t in enumerate(self.targets):
            w, m = t.as_layers(params[t.path]), t.as_layers(masks[t.path])
            if c.schedule == "rigl":
                grow = jnp.abs(t.as_layers(grads[t.path]))
            else:
                grow = jax.random.uniform(jax.random.fold_in(ctx.key, i), w.shape)
            new = jax.vmap(lambda wi, mi, gi: pruning.drop_and_grow(wi, mi, gi, fraction))(w, m, grow)
            out[t.path] = t.from_layers(jnp.where(t.selected()[:, None, None], new, m))
        return out
