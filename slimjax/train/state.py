"""The immutable train state and its abstract, sharded initialisation.

``jax.eval_shape`` gives every leaf's shape without allocating; the rules turn each parameter's
logical axes into a ``NamedSharding``; optimizer moments follow their parameter; then one jitted
init with ``out_shardings`` materialises each shard directly on its device, so no host ever
holds the full model.
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
from slimjax.models import ACTIVATION_AXES, Decoder, param_axes
from slimjax.sharding import Rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a train step reads and writes; params are a pure nested dict of arrays.

    ``rng`` is raw PRNG key data (uint32), advanced once per step, for stochastic parts of a step
    (dropout, sampling); raw data rather than a typed key so checkpoints store a plain array.
    ``skipped`` counts updates the non-finite guard dropped (``train.nonfinite = "skip"``).
    """

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array

    def as_dict(self) -> dict:
        """Plain-dict view for checkpointing."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng,
                "skipped": self.skipped}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Static facts about a run's state: structure, logical axes, shapes and shardings."""

    graphdef: nnx.GraphDef
    axes: dict
    abstract: TrainState
    shardings: TrainState
    tx: optax.GradientTransformation


def build_model(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype) -> Decoder:
    """A concrete model from a PRNG key (used inside jit and by tests)."""
    return Decoder(cfg, rngs=nnx.Rngs(params=key), dtype=dtype)


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as a pure nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_setup(cfg: ModelConfig, dtype: jnp.dtype, tx: optax.GradientTransformation,
               rules: Rules, mesh: Mesh) -> Setup:
    """Shapes, logical axes and shardings of the full train state, computed abstractly."""
    model = nnx.eval_shape(lambda: build_model(cfg, jax.random.key(0), dtype))
    graphdef, _ = nnx.split(model)
    axes = param_axes(model)
    rules.require(ACTIVATION_AXES)
    abs_params = params_of(model)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                          opt_state=jax.eval_shape(tx.init, abs_params),
                          rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                          skipped=jax.ShapeDtypeStruct((), jnp.int32))
    param_sh = rules.tree_shardings(axes, abs_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sh, p: _moment_sharding(leaf, sh, p.shape), abstract.opt_state, param_sh, abs_params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated, skipped=replicated)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Setup(graphdef=graphdef, axes=axes, abstract=abstract, shardings=shardings, tx=tx)


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


def init_state(setup: Setup, cfg: ModelConfig, dtype: jnp.dtype, seed: int) -> TrainState:
    """Materialises the train state shard by shard with one jitted init."""

    def init(key):
        params = params_of(build_model(cfg, key, dtype))
        # The step key stream is derived from the seed apart from the init key (init stays as it was).
        rng = jax.random.key_data(jax.random.fold_in(key, 1))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                          rng=rng, skipped=jnp.zeros((), jnp.int32))

    return jax.jit(init, out_shardings=setup.shardings)(jax.random.key(seed))
