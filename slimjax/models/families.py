"""The model families a model spec may name, and abstract parameters of any of them."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import ModelConfig
from slimjax.models.decoder import Decoder
from slimjax.models.encoder import Encoder

# Each a constructor (cfg, *, rngs, dtype) -> module; ``model.family`` picks one.
FAMILIES: dict[str, Callable[..., nnx.Module]] = {"decoder": Decoder, "encoder": Encoder}


def param_axes(model: nnx.Module) -> dict:
    """A pure dict mirroring the model's parameters, holding each one's logical-axes tuple."""
    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["axes"])
    return out


def abstract_params(cfg: ModelConfig, dtype: jnp.dtype = jnp.float32) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, logical axes, ShapeDtypeStructs) of ``cfg.family``'s parameters, allocating nothing."""
    make = FAMILIES[cfg.family]
    model = nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(params=jax.random.key(0)), dtype=dtype))
    graphdef, _ = nnx.split(model)
    return graphdef, param_axes(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
