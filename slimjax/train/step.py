"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

The loss is normalised by the number of target tokens in the whole global batch, so splitting
the batch into k microbatches (gradient accumulation) computes the same gradient as one big
batch. Microbatches take strided rows so each device's shard splits evenly into them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# The loss and the eval step live in infer/ (forward-only work that evaluation shares); re-exported here.
from slimjax.infer.scoring import Batch, Metrics, forward, make_eval_step, summed_loss, token_losses  # noqa: F401
from slimjax.sharding import constrain
from slimjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The step's slice of the config."""

    microbatches: int
    z_loss: float


def split_microbatches(batch: Batch, k: int) -> Batch:
    """``[B, ...] -> [k, B/k, ...]`` taking rows i, i+k, i+2k... for microbatch i.

    Strided rows keep every microbatch spread over all batch shards (a contiguous split would
    put a microbatch on a fraction of the devices).
    """
    def split(x):
        y = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return constrain(y, (None, "batch", "length")[: y.ndim])
    return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, opts: StepOptions) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step; jit it with the state donated."""
    grad_fn = jax.value_and_grad(lambda p, b: summed_loss(graphdef, p, b, opts.z_loss), has_aux=True)

    def sums_and_grads(params: dict, batch: Batch):
        (_, (nll, z)), grads = grad_fn(params, batch)
        return grads, nll, z

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        n_tokens = jnp.sum(batch["loss_mask"])
        if opts.microbatches == 1:
            grads, nll, z = sums_and_grads(state.params, batch)
        else:
            def accumulate(carry, micro):
                g, n, zz = sums_and_grads(state.params, micro)
                return jax.tree.map(jnp.add, carry, (g, n, zz)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
            (grads, nll, z), _ = jax.lax.scan(accumulate, zeros, split_microbatches(batch, opts.microbatches))
        denom = jnp.maximum(n_tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll / denom,
            "z_loss": z / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "tokens": n_tokens,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def tree_bytes(tree: Any) -> int:
    """Total bytes of a tree of arrays or ShapeDtypeStructs."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
