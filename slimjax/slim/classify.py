"""Sequence classification: a ``classifier`` head on the model's pooled features and its ``cls`` loss term.

Model surgery like any transform: ``rewrite`` adds ``classifier`` (a ``Dense`` ``[embed, classes]``
with a bias: ``classifier/kernel``, ``classifier/bias``, as Hugging Face's ``classifier.weight``
and ``.bias``), ``trainable`` keeps the head trained whatever earlier transforms froze (put
``lora`` before ``classify`` to train adapters and the head on a frozen base), and the objective
becomes the ``cls`` cross-entropy of the head's logits against ``batch["labels"]``: next-token
terms weigh 0. Batches mark each example's last real token in ``loss_mask`` (one per example),
so the step's per-token normalisation makes ``cls`` the mean over examples.

What is pooled depends on the model family (``POOLERS``): the decoder reads its last non-padding
token's final hidden state, the only position that has seen the whole text; the encoder runs its
own pooler (BERT's ``tanh(dense(h[:, 0]))``) on the first token, [CLS], which its rows start with
as pre-training rows do. ``TASKS`` is what the train step computes beside ``cls`` per family.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import ClassifyConfig
from slimjax.infer import scoring
from slimjax.models import FAMILIES, layers
from slimjax.slim.transform import LossTerm, Outputs, Transform

HEAD = "classifier"
TERM = "cls"
Pooler = Callable[[dict, dict, jax.Array], jax.Array]  # (params, batch, hidden [B, L, D]) -> [B, D]


def last_token(params: dict, batch: dict, hidden: jax.Array) -> jax.Array:
    """The hidden state at each row's last non-padding position (rows are left-aligned)."""
    last = jnp.maximum(jnp.sum(batch["segment_ids"] != 0, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def decoder_pooler(model: nnx.Module) -> Pooler:
    """The decoder's pooling needs no parameters of its own: the last token's hidden state."""
    return last_token


def encoder_pooler(model: nnx.Module) -> Pooler:
    """The encoder's ``pooled``: its ``pooler`` submodule (from ``params["pooler"]``) on the first token."""
    pooler = nnx.graphdef(model.pooler)

    def first_token(params: dict, batch: dict, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(nnx.merge(pooler, params["pooler"])(hidden[:, 0]))

    return first_token


# Family -> (its model after the earlier transforms -> how the classifier input is pooled from the
# final hidden states).
POOLERS: dict[str, Callable[[nnx.Module], Pooler]] = {"decoder": decoder_pooler, "encoder": encoder_pooler}


def example_counts(batch: dict) -> dict[str, jax.Array]:
    """One ``loss_mask`` mark per example: the ``cls`` term's denominator is the example count."""
    return {"tokens": jnp.sum(batch["loss_mask"])}


def no_sums(graphdef: nnx.GraphDef, params: dict, hidden: jax.Array, logits: jax.Array, batch: dict) -> dict:
    return {}


# Family -> its task while it classifies. The decoder keeps its next-token terms (weighted 0, its
# loss_mask marks one token per example); the encoder's MLM/NSP terms need masked pairs that a
# labelled batch does not have, so it computes ``cls`` alone (logged as its loss).
TASKS: dict[str, scoring.Task] = {
    "decoder": scoring.TASKS["decoder"],
    "encoder": scoring.Task((), (), TERM, scoring.encoder_features, no_sums, example_counts),
}


def family_of(model: nnx.Module) -> str:
    return next(name for name, cls in FAMILIES.items() if isinstance(model, cls))


class Classify(Transform):
    """The classification head from ``slim.classify``; see the module docstring."""

    name = "classify"

    def __init__(self, cfg: ClassifyConfig):
        self.cfg = cfg
        self._head: nnx.GraphDef | None = None  # the head's structure, set by rewrite
        self._pool: Pooler | None = None
        self.family = ""  # the model family, set by rewrite

    def options(self) -> dict[str, Any]:
        return {"classes": list(self.cfg.classes)}

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        cfg = model.cfg
        head = layers.Dense((cfg.d_model,), (len(self.cfg.classes),), ("embed",), ("classes",), use_bias=True,
                            std=cfg.init_std, dtype=model.dtype, rngs=rngs)
        setattr(model, HEAD, head)
        self._head = nnx.graphdef(head)
        self.family = family_of(model)
        self._pool = POOLERS[self.family](model)

    def trainable(self, path: str, current: bool) -> bool:
        return current or path.startswith(HEAD + "/")

    def objective_weights(self, weights: dict[str, float]) -> dict[str, float]:
        return {name: 0.0 for name in weights}  # the label is the target, not the next token

    def logits(self, params: dict, batch: dict, hidden: jax.Array) -> jax.Array:
        """Class logits ``[batch, classes]`` in float32 from the model's final hidden states."""
        pooled = self._pool(params, batch, hidden)
        return nnx.merge(self._head, params[HEAD])(pooled).astype(jnp.float32)

    def loss_terms(self) -> list[LossTerm]:
        def cls(params: dict, state: dict, batch: dict, out: Outputs) -> jax.Array:
            return jnp.sum(example_losses(self.logits(params, batch, out.hidden), batch["labels"]))

        return [LossTerm(TERM, 1.0, cls, per_token=True)]


def example_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy per example ``[batch]``; padding rows (label -1) give 0."""
    valid = labels >= 0
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, nll, 0.0)


def head_of(built: Any) -> Classify | None:
    """The spec's classification transform, or None for a plain language model."""
    return next((t for t in built.transforms if isinstance(t, Classify)), None)


def task_of(built: Any) -> scoring.Task:
    """What the train step computes besides the transforms' terms: the family's task, or its
    classification task when the spec classifies."""
    return (scoring.TASKS if head_of(built) is None else TASKS)[built.spec.family]


def make_eval_step(graphdef: nnx.GraphDef, head: Classify) -> Callable[[dict, dict], dict]:
    """``(params, batch) -> {nll_sum, tokens, predicted, labels}``: summed ``cls`` loss over the
    batch's examples, their count, and each row's predicted and true class (-1: a padding row)."""

    def eval_step(params: dict, batch: dict) -> dict:
        hidden, _ = TASKS[head.family].forward(graphdef, params, batch)  # the unused LM logits cost nothing under jit
        logits = head.logits(params, batch, hidden)
        return {"nll_sum": jnp.sum(example_losses(logits, batch["labels"])), "tokens": jnp.sum(batch["labels"] >= 0),
                "predicted": jnp.argmax(logits, axis=-1), "labels": batch["labels"]}

    return eval_step
