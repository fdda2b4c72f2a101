"""Token losses, the forward pass from a parameter dict, each family's task, and the eval step.

Training (``slimjax.train.step``) and evaluation (``slimjax.infer.evaluate``) share these, so
the loss a run reports while training is the one ``slimjax eval`` computes.

A :class:`Task` is what one model family is trained on: its forward pass over a batch, the sums
of its built-in loss terms (and of its accuracy counts), and the denominator of each sum in the
whole global batch. The decoder predicts the next token; the encoder predicts masked tokens
(``mlm``) and the relation of a sentence pair (``nsp``) from its pooled [CLS] output.
"""

from __future__ import annotations

import dataclasses
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


def encoder_features(graphdef: nnx.GraphDef, params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(per-token hidden states, MLM logits) of an encoder for a pre-training batch."""
    model = nnx.merge(graphdef, params)
    hidden = model.features(batch["inputs"], batch["token_types"], batch["positions"], batch["segment_ids"])
    return hidden, model.head(hidden)


def encoder_sums(graphdef: nnx.GraphDef, params: dict, hidden: jax.Array, logits: jax.Array, batch: Batch
                 ) -> dict[str, jax.Array]:
    """The encoder's terms summed over the batch: ``mlm`` (NLL of the masked tokens, weighted by
    ``mlm_weights``), ``nsp`` (NLL of the pair labels, weighted by ``nsp_weights``), and the
    correct predictions of each head (``mlm_accuracy``, ``nsp_accuracy``)."""
    w = batch["mlm_weights"]
    nll, _ = token_losses(logits, batch["mlm_targets"])
    pair = nnx.merge(graphdef, params).pair_logits(hidden)
    pair_nll, _ = token_losses(pair, batch["nsp_labels"])
    pw = batch["nsp_weights"]
    return {"mlm": jnp.sum(nll * w), "nsp": jnp.sum(pair_nll * pw),
            "mlm_accuracy": jnp.sum((jnp.argmax(logits, -1) == batch["mlm_targets"]) * w),
            "nsp_accuracy": jnp.sum((jnp.argmax(pair, -1) == batch["nsp_labels"]) * pw)}


def encoder_counts(batch: Batch) -> dict[str, jax.Array]:
    masked, pairs = jnp.sum(batch["mlm_weights"]), jnp.sum(batch["nsp_weights"])
    return {"mlm": masked, "mlm_accuracy": masked, "nsp": pairs, "nsp_accuracy": pairs,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}


def decoder_sums(graphdef: nnx.GraphDef, params: dict, hidden: jax.Array, logits: jax.Array, batch: Batch
                 ) -> dict[str, jax.Array]:
    return token_sums(logits, batch)


def decoder_counts(batch: Batch) -> dict[str, jax.Array]:
    n = jnp.sum(batch["loss_mask"])
    return {"next_token": n, "z_loss": n, "tokens": n}


@dataclasses.dataclass(frozen=True)
class Task:
    """What one model family is trained on.

    ``forward(graphdef, params, batch) -> (hidden, logits)``; ``sums(graphdef, params, hidden,
    logits, batch)`` -> every term's and accuracy's sum over the batch; ``counts(batch)`` -> the
    denominator of each sum, plus ``tokens`` (the batch's real tokens: the denominator of the
    per-token terms transforms add). ``primary`` is the term logged as ``loss``.
    """

    terms: tuple[str, ...]
    accuracies: tuple[str, ...]
    primary: str
    forward: Callable[[nnx.GraphDef, dict, Batch], tuple[jax.Array, jax.Array]]
    sums: Callable[..., dict[str, jax.Array]]
    counts: Callable[[Batch], dict[str, jax.Array]]


TASKS: dict[str, Task] = {
    "decoder": Task(("next_token", "z_loss"), (), "next_token", forward_features, decoder_sums, decoder_counts),
    "encoder": Task(("mlm", "nsp"), ("mlm_accuracy", "nsp_accuracy"), "mlm", encoder_features, encoder_sums,
                    encoder_counts),
}


def token_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """The built-in loss terms summed over target tokens: ``next_token`` (NLL) and ``z_loss`` (log(Z)^2)."""
    nll, log_z = token_losses(logits, batch["targets"])
    mask = batch["loss_mask"]
    return {"next_token": jnp.sum(nll * mask), "z_loss": jnp.sum(jnp.square(log_z) * mask)}


def summed_loss(graphdef: nnx.GraphDef, params: dict, batch: Batch, z_loss: float):
    """(nll + z_loss * log(Z)^2) summed over target tokens, plus the two parts separately."""
    sums = token_sums(forward(graphdef, params, batch), batch)
    return sums["next_token"] + z_loss * sums["z_loss"], (sums["next_token"], sums["z_loss"])


def make_eval_step(graphdef: nnx.GraphDef, family: str = "decoder") -> Callable[[dict, Batch], Metrics]:
    """Sums over one batch (callers add them up over batches and divide): for the decoder the
    summed NLL and token count (``nll_sum``, ``tokens``); for other families each term's and
    accuracy's sum and, as ``<name>_count``, its denominator."""
    if family == "decoder":
        def eval_step(params: dict, batch: Batch) -> Metrics:
            _, (nll, _) = summed_loss(graphdef, params, batch, 0.0)
            return {"nll_sum": nll, "tokens": jnp.sum(batch["loss_mask"])}

        return eval_step
    task = TASKS[family]

    def task_eval_step(params: dict, batch: Batch) -> Metrics:
        hidden, logits = task.forward(graphdef, params, batch)
        counts = task.counts(batch)
        return task.sums(graphdef, params, hidden, logits, batch) | {f"{k}_count": counts[k] for k in
                                                                      (*task.terms, *task.accuracies)}

    return task_eval_step


def eval_means(outs: list[Metrics]) -> dict[str, float]:
    """Each ``<name>`` of a task eval step's outputs (summed over batches) over its ``<name>_count``."""
    total: dict[str, float] = {}
    for out in outs:
        for key, value in out.items():
            total[key] = total.get(key, 0.0) + float(value)
    return {k: v / max(total[f"{k}_count"], 1.0) for k, v in total.items() if not k.endswith("_count")}
