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
- ``loss_terms()``: named terms added to the objective, each with its weight;
  ``objective_weights(weights)`` may rescale the built-in terms (distillation mixes the
  hard-label loss by 1 - alpha).
- ``load_state(abstract, mesh, rules)``: state read from outside the run when it starts fresh
  (a teacher's parameters), in the shardings of ``abstract``; a resumed run reads it back from
  its own checkpoint instead.
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


@dataclasses.dataclass
class Outputs:
    """What one forward pass of the model gives the per-token loss terms: the logits, the last
    hidden state, and ``shared(key, fn)``, which computes a value several terms need (a teacher's
    forward pass) once per forward pass."""

    logits: jax.Array
    hidden: jax.Array
    _memo: dict = dataclasses.field(default_factory=dict)

    def shared(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A named term of the objective.

    ``per_token`` terms are ``fn(params, state, batch, outputs) -> sum over target tokens`` (the
    full transform state, :class:`Outputs` of the student's forward pass) and are
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

    def objective_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The built-in terms' weights (``next_token``, ``z_loss``) as this transform wants them."""
        return weights

    def load_state(self, abstract: State, mesh: Any, rules: Any) -> State | None:
        """State read from outside the run at a fresh start (None: ``init_state``'s stays)."""
        return None

    def masks(self, state: State) -> dict[str, jax.Array]:
        """``{parameter path: bool mask}`` of parameters that must stay zero where the mask is False."""
        return {}

    def after_update(self, params: Params, state: State, ctx: UpdateContext) -> tuple[Params, State]:
        return params, state

    def export(self, model: nnx.Module) -> bool:
        """Bakes the transform into plain parameters where it can; True if it must stay in the recipe."""
        return True
