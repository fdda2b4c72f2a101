"""The transform protocol: how one slimming method plugs into the model spec, the state and the step.

A transform is a small object of optional parts, each a pure function or an in-place edit of a
module graph that the caller runs under ``nnx.eval_shape`` (shapes only) or inside ``jax.jit``
(values, with ``out_shardings``), so no host ever holds the model:

- ``rewrite(model, rngs)``: model surgery (insert LoRA adapters, factor a kernel, store it
  quantized, cut pruned rows); new parameters carry logical axes, so the rules shard them.
- ``trainable(path, current)``: whether a parameter (path like ``blocks/attn/wq/kernel``) is
  trained; transforms compose in recipe order, each seeing the verdict so far.
- ``state_axes(axes)`` / ``init_state(params)``: extra arrays the transform keeps (masks, teacher
  parameters, scales), with logical axes so they are sharded by the same rules.
- ``view(params, state)``: the parameters as the loss sees them (masking, fake quantization).
- ``loss_terms()``: named terms added to the objective, each with its weight.
- ``masks(state)``: parameters (by path) held at zero where a mask is False: the step zeroes
  their gradients before the optimizer, their optimizer moments, and their updated values.
- ``after_update(params, state, ctx)``: runs after each optimizer update with the step, the raw
  gradients and a key (RigL regrows by gradient, gradual pruning tightens masks); the masks it
  returns are then applied.
- ``export(model)``: undo the structure for export (merge adapters); returns whether the
  transform remains in the exported model's recipe.

None of these imports ``slimjax.train``: the train step calls them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.sharding import tree_paths

Params = dict
State = dict


@dataclasses.dataclass(frozen=True)
class UpdateContext:
    """What ``after_update`` may read: the step just taken (0-based, traced), the raw gradients of
    the trainable parameters (before masking and clipping) and a key of this step's own."""

    step: jax.Array
    grads: Params
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A named term of the objective.

    ``per_token`` terms are ``fn(params, state, batch, logits) -> sum over target tokens`` and are
    divided by the global batch's target-token count (so gradient accumulation stays exact);
    other terms are ``fn(params, state) -> value`` computed once per step on the parameters.
    """

    name: str
    weight: float
    fn: Callable[..., jax.Array]
    per_token: bool


def apply_masks(tree: Params, masks: dict[str, jax.Array]) -> Params:
    """``tree`` with each masked leaf (by path) zeroed where its mask is False; other leaves as they are."""
    if not masks:
        return tree
    leaves = [jnp.where(masks[p], x, jnp.zeros((), x.dtype)) if p in masks else x
              for p, x in zip(tree_paths(tree), jax.tree.leaves(tree))]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


class Transform:
    """Base class: every part optional, every default a no-op."""

    name: str = ""
    # Option keys that change how the transform behaves while training, not the parameters or the
    # state it keeps: a run may resume (or start from a checkpoint) with other values of these.
    runtime_options: frozenset[str] = frozenset()

    def options(self) -> dict[str, Any]:
        """JSON-ready options, recorded in the model spec (and every checkpoint)."""
        return {}

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Edits ``model`` in place (abstract under eval_shape, concrete under jit)."""

    def trainable(self, path: str, current: bool) -> bool:
        return current

    def state_axes(self, axes: Params) -> State:
        """Logical axes of the transform's state, given the parameters' axes."""
        return {}

    def init_state(self, params: Params) -> State:
        return {}

    def view(self, params: Params, state: State) -> Params:
        return params

    def loss_terms(self) -> list[LossTerm]:
        return []

    def masks(self, state: State) -> dict[str, jax.Array]:
        """``{parameter path: bool mask}`` of parameters that must stay zero where the mask is False."""
        return {}

    def after_update(self, params: Params, state: State, ctx: UpdateContext) -> tuple[Params, State]:
        return params, state

    def export(self, model: nnx.Module) -> bool:
        """Bakes the transform into plain parameters where it can; True if it must stay in the recipe."""
        return True
