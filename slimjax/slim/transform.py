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
- ``after_update(params, state)``: a projection after each optimizer update (re-apply a mask).
- ``export(model)``: undo the structure for export (merge adapters); returns whether the
  transform remains in the exported model's recipe.

None of these imports ``slimjax.train``: the train step calls them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

Params = dict
State = dict


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


class Transform:
    """Base class: every part optional, every default a no-op."""

    name: str = ""

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

    def after_update(self, params: Params, state: State) -> tuple[Params, State]:
        return params, state

    def export(self, model: nnx.Module) -> bool:
        """Bakes the transform into plain parameters where it can; True if it must stay in the recipe."""
        return True
