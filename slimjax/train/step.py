"""Pure train steps: ``train_step(state, batch) -> (state, metrics)``.

The objective is a weighted sum of named loss terms, ``L = sum_i w_i L_i``: the model family's
built-in terms from ``objective.*`` (decoder: next-token cross-entropy and log(Z)^2; encoder:
masked-token and sentence-pair cross-entropy, see ``slimjax.infer.scoring.TASKS``; a classifier's
in ``slimjax.slim.classify.TASKS``), plus any terms the model spec's transforms add. Each batch term is a sum normalised by its count in the
whole global batch (target tokens, masked tokens, pairs), so splitting the batch into k
microbatches (gradient accumulation) computes the same gradient as one big batch; parameter
terms are computed once per step.
Gradients and optimizer updates cover the trainable parameters only; the transforms' view of the
parameters is taken inside the loss, and their after-update projection follows the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# The loss lives in infer/scoring.py: evaluation shares it (forward-only work).
from slimjax.infer.scoring import Batch, Metrics
from slimjax.models import scope
from slimjax.slim import classify
from slimjax.sharding import constrain, tree_merge, tree_paths
from slimjax.slim.spec import Built
from slimjax.slim.transform import Outputs, UpdateContext, apply_masks
from slimjax.train.state import TrainState

# Metric key of the per-parameter-leaf finite flags (a bool vector, not a scalar to log).
LEAF_FINITE = "leaf_finite"
BUILTIN_TERMS = ("next_token", "z_loss")
UPDATE_SALT = 0x5EED  # folds the step key into the transforms' after-update key (apart from dropout's)
_UNMASKED = object()  # placeholder leaf for parameters no transform masks


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The step's slice of the config."""

    microbatches: int
    weights: tuple[tuple[str, float], ...] = (("next_token", 1.0), ("z_loss", 0.0))  # objective.*
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


def model_view(built: Built, state: TrainState, trainable: dict | None = None) -> dict:
    """The full parameters as the model sees them: trainable + frozen, through the transforms' views."""
    params = tree_merge(state.params if trainable is None else trainable, state.frozen)
    return built.view(params, state.slim)


def make_train_step(built: Built, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    opts: StepOptions) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step; jit it with the state donated."""
    task = classify.task_of(built)
    terms = built.loss_terms()
    token_terms = [t for t in terms if t.per_token]
    param_terms = [t for t in terms if not t.per_token]
    weights = built.objective_weights(dict(opts.weights)) | {t.name: t.weight for t in terms}
    weights = {k: w for k, w in weights.items() if k in task.terms or k in {t.name for t in terms}}

    def weighted(values: dict[str, jax.Array]) -> jax.Array:
        """``sum_i w_i L_i`` over the terms in ``values`` (terms weighted 0 are left out)."""
        return sum((w * values[name] for name, w in weights.items() if w and name in values), jnp.zeros(()))

    def token_objective(trainable: dict, state: TrainState, batch: Batch, key: jax.Array,
                        denoms: dict[str, jax.Array]):
        """(weighted sum of each term's sum over ``denoms``, the global batch's counts; {term: sum})
        for one (micro)batch."""
        params = model_view(built, state, trainable)
        with scope.dropout_key(key):
            hidden, logits = task.forward(built.graphdef, params, batch)
        sums = task.sums(built.graphdef, params, hidden, logits, batch)
        out = Outputs(logits, hidden)
        for t in token_terms:
            sums[t.name] = t.fn(params, state.slim, batch, out)
        return weighted({k: v / denoms[k] for k, v in sums.items()}), sums

    def param_objective(trainable: dict, state: TrainState):
        values = {t.name: t.fn(model_view(built, state, trainable), state.slim) for t in param_terms}
        return weighted(values), values

    token_grad = jax.grad(token_objective, has_aux=True)
    param_grad = jax.grad(param_objective, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        counts = task.counts(batch)
        n_tokens = counts["tokens"]
        denoms = {k: jnp.maximum(c, 1.0) for k, c in counts.items()} | {
            t.name: jnp.maximum(n_tokens, 1.0) for t in token_terms}
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if opts.microbatches == 1:
            grads, sums = token_grad(state.params, state, batch, step_key, denoms)
        else:
            def accumulate(carry, xs):
                micro, i = xs
                g, s = token_grad(state.params, state, micro, jax.random.fold_in(step_key, i), denoms)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_sums = {name: jnp.zeros(()) for name in (*task.terms, *task.accuracies, *(t.name for t in token_terms))}
            zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums)
            micro = split_microbatches(batch, opts.microbatches)
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(opts.microbatches)))
        values = {name: s / denoms[name] for name, s in sums.items()}
        if param_terms:
            pgrads, pvalues = param_grad(state.params, state)
            grads = jax.tree.map(jnp.add, grads, pgrads)
            values.update(pvalues)
        objective = weighted(values)
        raw_grads = grads
        grads = apply_masks(grads, built.masks(state.slim))  # masked weights get no update
        grad_norm = optax.tree.norm(grads)

        def update(old):
            params, opt_state, slim = old
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ctx = UpdateContext(state.step, raw_grads, jax.random.fold_in(step_key, UPDATE_SALT))
            params, slim = built.after_update(params, slim, ctx)
            if masks := built.masks(slim):  # the masks after this step's update (RigL, gradual) hold from here
                params = apply_masks(params, masks)
                opt_state = mask_moments(tx, opt_state, params, masks)
            return params, opt_state, slim

        # A step with a non-finite objective or gradient never reaches the state (either policy):
        # the loop stops or counts it. A non-finite parameter makes the objective non-finite, so
        # it is caught here too. The update runs inside the cond: XLA then updates the donated
        # state in place, where a select between new and old values made it copy the optimizer
        # moments (or, testing the updated values, write, reduce and re-read every leaf).
        applied = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        params, opt_state, slim = jax.lax.cond(applied, update, lambda old: old,
                                               (state.params, state.opt_state, state.slim))
        # An update that is itself non-finite (a corrupted optimizer state) is reported, not
        # undone: "stop" ends the run before that state is saved.
        ok = applied & all_finite(params)
        # Per-leaf flags (to name the leaves in the error) only on a bad step.
        leaf_finite = jax.lax.cond(ok, lambda: jnp.ones(len(jax.tree.leaves(params)), bool),
                                   lambda: finite_leaves(grads, params))
        skipped = state.skipped + (~applied).astype(jnp.int32) if opts.skip_nonfinite else state.skipped
        metrics = {
            "loss": values[task.primary],
            **{name: values[name] for name in ("z_loss", *task.accuracies) if name in values},
            "objective": objective,
            **{f"terms/{name}": v for name, v in values.items()
               if name not in BUILTIN_TERMS and name not in task.accuracies},
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "tokens": n_tokens,
            "nonfinite": (~ok).astype(jnp.float32),
            LEAF_FINITE: leaf_finite,
        }
        new = dataclasses.replace(state, step=state.step + 1, params=params, slim=slim, opt_state=opt_state,
                                  rng=jax.random.key_data(rng), skipped=skipped)
        return new, metrics

    return train_step


def make_state_eval_step(built: Built, eval_step: Callable[[dict, Batch], Metrics]
                         ) -> Callable[[TrainState, Batch], Metrics]:
    """An eval step over a train state: the model's view of its parameters, no dropout."""
    return lambda state, batch: eval_step(model_view(built, state), batch)


def mask_moments(tx: optax.GradientTransformation, opt_state: Any, params: dict, masks: dict) -> Any:
    """The optimizer state with every parameter-shaped moment zeroed where its parameter is masked,
    so a weight that is pruned now and regrown later (RigL) starts again from zero moments."""
    flat = [masks.get(p, _UNMASKED) for p in tree_paths(params)]
    full = jax.tree.unflatten(jax.tree.structure(params), flat)

    def mask(leaf, m):
        if m is _UNMASKED or not hasattr(leaf, "shape") or leaf.shape != m.shape:
            return leaf  # unmasked, or a factored moment (Adafactor) that has no per-weight entries
        return jnp.where(m, leaf, jnp.zeros((), leaf.dtype))

    return optax.tree_map_params(tx, mask, opt_state, full, transform_non_params=lambda x: x,
                                 is_leaf=lambda x: x is _UNMASKED)


def finite_leaves(grads: dict, params: dict) -> jax.Array:
    """One bool per parameter leaf (``jax.tree.leaves`` order): its gradient and its value are finite."""
    return jnp.stack([jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(p))
                      for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))])


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite: ``x * 0`` is 0 for finite ``x`` and NaN
    otherwise, so one plain sum per leaf decides (no overflow, unlike a sum of squares)."""
    return jnp.isfinite(sum((jnp.sum(x * 0) for x in jax.tree.leaves(tree)), jnp.zeros(())))


def tree_bytes(tree: Any) -> int:
    """Total bytes of a tree of arrays or ShapeDtypeStructs."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
