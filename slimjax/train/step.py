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

# The loss lives in infer/scoring.py: evaluation shares it (forward-only work).
from slimjax.infer.scoring import Batch, Metrics, summed_loss
from slimjax.sharding import constrain
from slimjax.train.state import TrainState

# Metric key of the per-parameter-leaf finite flags (a bool vector, not a scalar to log).
LEAF_FINITE = "leaf_finite"


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The step's slice of the config."""

    microbatches: int
    z_loss: float
    skip_nonfinite: bool = False  # count dropped updates in state.skipped (train.nonfinite = "skip")


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
        loss = nll / denom
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        leaf_finite = finite_leaves(state.params, grads, params)
        ok = jnp.all(leaf_finite) & jnp.isfinite(loss)
        # A non-finite step never reaches the state (either policy): the loop stops or counts it.
        keep_new = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep_new, params, state.params)
        opt_state = jax.tree.map(keep_new, opt_state, state.opt_state)
        skipped = state.skipped + (~ok).astype(jnp.int32) if opts.skip_nonfinite else state.skipped
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))  # the step's key is the split's second half
        metrics = {
            "loss": loss,
            "z_loss": z / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "tokens": n_tokens,
            "nonfinite": (~ok).astype(jnp.float32),
            LEAF_FINITE: leaf_finite,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng),
                          skipped=skipped), metrics

    return train_step


def finite_leaves(params: dict, grads: dict, new_params: dict) -> jax.Array:
    """One bool per parameter leaf (``jax.tree.leaves`` order): the parameter, its gradient and its
    updated value are all finite (the last catches a corrupted optimizer state)."""
    return jnp.stack([jnp.all(jnp.isfinite(p)) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(n))
                      for p, g, n in zip(*map(jax.tree.leaves, (params, grads, new_params)))])


def tree_bytes(tree: Any) -> int:
    """Total bytes of a tree of arrays or ShapeDtypeStructs."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
