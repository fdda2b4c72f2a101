"""The immutable train state and its abstract, sharded initialisation.

The state keeps trainable parameters, frozen parameters and transform state apart: the optimizer
(and its state) covers the trainable leaves only, so a LoRA run keeps no moments for its frozen
base, and each part is its own Orbax item. ``jax.eval_shape`` gives every leaf's shape without
allocating; the rules turn each leaf's logical axes into a ``NamedSharding``; optimizer moments
follow their parameter; then one jitted init with ``out_shardings`` materialises each shard
directly on its device, so no host ever holds the full model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import ModelConfig
from slimjax.models import ACTIVATION_AXES, FAMILIES
from slimjax.sharding import Rules, tree_merge
from slimjax.slim.spec import Built, ModelSpec, build, init_fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a train step reads and writes; parameter parts are pure nested dicts of arrays.

    ``params`` holds the trainable parameters (all of them in a plain run), ``frozen`` the rest
    (a LoRA run's base weights) and ``slim`` the transforms' own state (masks, scales ...), keyed
    by transform name. ``rng`` is raw PRNG key data (uint32), advanced once per step, for the
    stochastic parts of a step (dropout); raw data so checkpoints store a plain array.
    ``skipped`` counts updates the non-finite guard dropped (``train.nonfinite = "skip"``).
    """

    step: jax.Array
    params: dict
    frozen: dict
    slim: dict
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array

    def as_dict(self) -> dict:
        """Plain-dict view for checkpointing."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def model_params(self) -> dict:
        """Trainable and frozen parameters as one tree (what the model's graphdef merges with)."""
        return tree_merge(self.params, self.frozen)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Static facts about a run's state: the built model spec, logical axes, shapes and shardings."""

    built: Built
    abstract: TrainState
    shardings: TrainState
    tx: optax.GradientTransformation

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.built.graphdef

    @property
    def axes(self) -> dict:
        """Logical axes of every parameter (trainable and frozen)."""
        return self.built.axes

    @property
    def spec(self) -> ModelSpec:
        return self.built.spec


def build_model(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype) -> nnx.Module:
    """A concrete plain model of ``cfg.family`` from a PRNG key (used by tests)."""
    return FAMILIES[cfg.family](cfg, rngs=nnx.Rngs(params=key), dtype=dtype)


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a pure nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_setup(spec: ModelSpec | ModelConfig, dtype: jnp.dtype, tx: optax.GradientTransformation,
               rules: Rules, mesh: Mesh) -> Setup:
    """Shapes, logical axes and shardings of the full train state, computed abstractly.

    ``spec`` may be a bare ModelConfig: the plain decoder without transforms.
    """
    if isinstance(spec, ModelConfig):
        spec = ModelSpec("decoder", spec)
    built = build(spec, dtype)
    rules.require(ACTIVATION_AXES)
    param_sh = rules.tree_shardings(built.axes, built.shapes, mesh)
    trainable, frozen = built.split(built.shapes)
    train_sh, frozen_sh = built.split(param_sh)
    slim_axes = built.state_axes()
    slim_abs = jax.eval_shape(built.init_state, built.shapes)
    slim_sh = rules.tree_shardings(slim_axes, slim_abs, mesh) if slim_axes else {}
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable, frozen=frozen, slim=slim_abs,
                          opt_state=jax.eval_shape(tx.init, trainable),
                          rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                          skipped=jax.ShapeDtypeStruct((), jnp.int32))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sh, p: _moment_sharding(leaf, sh, p.shape), abstract.opt_state, train_sh, trainable,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))
    shardings = TrainState(step=replicated, params=train_sh, frozen=frozen_sh, slim=slim_sh, opt_state=opt_sh,
                           rng=replicated, skipped=replicated)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Setup(built=built, abstract=abstract, shardings=shardings, tx=tx)


def _moment_sharding(leaf: Any, param_sharding: NamedSharding, param_shape: tuple[int, ...]) -> NamedSharding:
    """An optimizer leaf shaped like its parameter shares its sharding.

    Adafactor's factored moments drop one dimension of the parameter: they keep the spec of the
    remaining dimensions. Anything else (counts, placeholder shapes) is replicated.
    """
    mesh = param_sharding.mesh
    shape = tuple(getattr(leaf, "shape", ()))
    spec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
    if shape == tuple(param_shape):
        return param_sharding
    if len(shape) == len(param_shape) - 1:
        for i in range(len(param_shape)):
            if param_shape[:i] + param_shape[i + 1:] == shape:
                return NamedSharding(mesh, PartitionSpec(*(spec[:i] + spec[i + 1:])))
    return NamedSharding(mesh, PartitionSpec())


def state_from_params(setup: Setup, params: dict, key: jax.Array) -> TrainState:
    """A step-0 state around full parameters (fresh or restored): split, transform state, optimizer."""
    built = setup.built
    trainable, frozen = built.split(params)
    # The step key stream is derived from the seed apart from the init key (init stays as it was).
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, slim=built.init_state(params),
                      opt_state=setup.tx.init(trainable), rng=rng, skipped=jnp.zeros((), jnp.int32))


def init_state(setup: Setup, seed: int) -> TrainState:
    """Materialises a fresh train state shard by shard with one jitted init."""
    make = init_fn(setup.built)
    return jax.jit(lambda key: state_from_params(setup, make(key), key),
                   out_shardings=setup.shardings)(jax.random.key(seed))
