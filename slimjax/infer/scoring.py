"""Token losses, the forward pass from a parameter dict, and the eval step.

Training (``slimjax.train.step``) and evaluation (``slimjax.infer.evaluate``) share these, so
the loss a run reports while training is the one ``slimjax eval`` computes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def forward(graphdef: nnx.GraphDef, params: dict, batch: Batch) -> jax.Array:
    """Logits for a batch, from a pure parameter dict."""
    return forward_features(graphdef, params, batch)[1]


def forward_features(graphdef: nnx.GraphDef, params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(last hidden state, logits) for a batch: one forward pass; unused outputs cost nothing under jit."""
    model = nnx.merge(graphdef, params)
    hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
    return hidden, model.head(hidden)


def token_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """The built-in loss terms summed over target tokens: ``next_token`` (NLL) and ``z_loss`` (log(Z)^2)."""
    nll, log_z = token_losses(logits, batch["targets"])
    mask = batch["loss_mask"]
    return {"next_token": jnp.sum(nll * mask), "z_loss": jnp.sum(jnp.square(log_z) * mask)}


def summed_loss(graphdef: nnx.GraphDef, params: dict, batch: Batch, z_loss: float):
    """(nll + z_loss * log(Z)^2) summed over target tokens, plus the two parts separately."""
    sums = token_sums(forward(graphdef, params, batch), batch)
    return sums["next_token"] + z_loss * sums["z_loss"], (sums["next_token"], sums["z_loss"])


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[dict, Batch], Metrics]:
    """Summed NLL and token count for one batch (callers average over batches)."""

    def eval_step(params: dict, batch: Batch) -> Metrics:
        _, (nll, _) = summed_loss(graphdef, params, batch, 0.0)
        return {"nll_sum": nll, "tokens": jnp.sum(batch["loss_mask"])}

    return eval_step
