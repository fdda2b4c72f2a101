"""The objective as a weighted sum of named loss terms, transforms' terms and views inside the step,
and batches carrying extra named arrays sharded by their logical names."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from helpers import small_config, synthetic_batch, with_train
from slimjax.data import pipeline
from slimjax.infer.scoring import forward, token_losses
from slimjax.sharding import Rules, activation_rules, make_mesh
from slimjax.slim.transform import LossTerm, Transform
from slimjax.train.run import fresh_state
from slimjax.train.step import StepOptions, make_train_step


class WeightedRows(Transform):
    """A test transform: a per-token term weighting each row by a named batch array ``row_weight``
    ([batch]), and a parameter term (the squared norm of the final norm's scale)."""

    name = "weighted_rows"

    def loss_terms(self):
        def rows(params, state, batch, out):
            nll, _ = token_losses(out.logits, batch["targets"])
            return jnp.sum(nll * batch["loss_mask"] * batch["row_weight"][:, None])

        def scale_l2(params, state):
            return jnp.sum(jnp.square(params["final_norm"]["scale"]))

        return [LossTerm("rows", 0.5, rows, per_token=True), LossTerm("scale_l2", 0.01, scale_l2, per_token=False)]


def _setup(microbatches: int):
    cfg = with_train(small_config(), microbatches=microbatches)
    mesh = make_mesh(cfg.mesh)
    rules, setup, state = fresh_state(cfg, mesh)
    built = dataclasses.replace(setup.built, transforms=(WeightedRows(),))
    spec = dict(pipeline.LM_BATCH, row_weight=(("batch",), np.float32))
    shardings = pipeline.batch_shardings(mesh, rules, spec)
    batch = synthetic_batch(cfg)
    batch["row_weight"] = np.linspace(0.0, 2.0, cfg.train.global_batch_size).astype(np.float32)
    opts = StepOptions(microbatches, (("next_token", 1.0), ("z_loss", 1e-3)))
    step = make_train_step(built, optax.sgd(0.1), lambda s: 0.1, opts)
    with activation_rules(mesh, rules):
        compiled = jax.jit(step)
        out = compiled(state, pipeline.to_global(batch, shardings))
    return cfg, setup, state, batch, shardings, out


def test_objective_is_the_weighted_sum_of_named_terms_each_logged():
    cfg, setup, state, batch, shardings, (new, metrics) = _setup(1)
    params = state.model_params()
    logits = np.asarray(forward(setup.graphdef, params, batch), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    n = mask.sum()
    want = {"loss": (nll * mask).sum() / n, "z_loss": (log_z ** 2 * mask).sum() / n,
            "terms/rows": (nll * mask * batch["row_weight"][:, None]).sum() / n,
            "terms/scale_l2": float(np.sum(np.square(np.asarray(params["final_norm"]["scale"]))))}
    for key, value in want.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5)
    total = want["loss"] + 1e-3 * want["z_loss"] + 0.5 * want["terms/rows"] + 0.01 * want["terms/scale_l2"]
    np.testing.assert_allclose(float(metrics["objective"]), total, rtol=2e-5)
    # The extra [batch] array is sharded over the batch mesh axes like every activation row.
    assert shardings["row_weight"].spec == Rules.from_config(cfg.mesh).spec(("batch",))


def test_terms_and_gradients_do_not_depend_on_microbatches():
    _, _, _, _, _, (one, m1) = _setup(1)
    _, _, _, _, _, (two, m2) = _setup(2)
    for key in ("objective", "terms/rows", "terms/scale_l2"):
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
