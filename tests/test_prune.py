"""The pruning transform in the train step: masks sharded like their kernels, masked fine-tuning
that never revives a weight (weight decay, AdamW moments), gradual pruning on the cubic schedule,
RigL / SET at constant per-layer density, the L1 term, and bit-exact resume of a sparse run."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from helpers import build as build_run_parts
from helpers import build_state, flat, small_config, synthetic_batch, with_mesh

from slimjax.config import check_slim
from slimjax.data import pipeline
from slimjax.slim import pruning
from slimjax.slim.prune import layer_sparsities


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def with_prune(cfg, **prune):
    if "targets" in prune:
        prune["targets"] = tuple(prune["targets"])
    cfg = dataclasses.replace(cfg, slim=dataclasses.replace(
        cfg.slim, recipe=("prune",), prune=dataclasses.replace(cfg.slim.prune, **prune)))
    check_slim(cfg.slim)
    return cfg


def masks_of(state):
    return flat(host(state.slim["prune"]["masks"]))


def layer_counts(mask):
    """Kept weights per stacked layer of a ``[L, ...]`` mask."""
    return mask.reshape(mask.shape[0], -1).sum(axis=1)


def with_random_masks(state, sparsity, seed=0):
    """``state`` with every mask a random one at ``sparsity`` and the masked weights zeroed."""
    rng = np.random.default_rng(seed)
    s = host(state)
    masks = {p: rng.random(m.shape) >= sparsity for p, m in masks_of(state).items()}
    params = flat(s.params)
    for p, m in masks.items():
        params[p] = np.where(m, params[p], 0.0).astype(np.float32)
    unflat = lambda d, like: jax.tree.unflatten(jax.tree.structure(like), [d[k] for k in flat(like)])
    new = dataclasses.replace(s, params=unflat(params, s.params),
                              slim={"prune": {"masks": unflat(masks, s.slim["prune"]["masks"])}})
    return jax.device_put(new, jax.tree.map(lambda x: x.sharding, state)), masks


def steps(state, train_step, sharding, cfg, n, start=0):
    metrics = []
    for i in range(n):
        state, m = train_step(state, pipeline.to_global(synthetic_batch(cfg, start + i), sharding))
        metrics.append(host(m))
    return state, metrics


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_masks_are_sharded_like_their_kernels_and_target_only_block_projections(shape):
    cfg = with_mesh(with_prune(small_config()), *shape)
    _, _, _, state = build_state(cfg)
    masks = flat(state.slim["prune"]["masks"])
    params = flat(state.params)
    assert set(masks) == {p for p in params if p.startswith("blocks/") and p.endswith("/kernel")}
    for path, m in masks.items():
        assert m.dtype == bool and m.shape == params[path].shape
        assert m.sharding == params[path].sharding, path
        assert bool(np.all(np.asarray(m))), "a fresh fixed-schedule mask is dense"


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_masked_fine_tuning_never_revives_a_weight(optimizer):
    """30 steps with weight decay: masked weights stay exactly 0, so do their optimizer moments, and
    the unmasked weights train. Masks on the (1,2,4) mesh, where kernels are split by tensor."""
    cfg = with_mesh(with_prune(small_config()), 1, 2, 4)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, name=optimizer, weight_decay=0.1,
                                                                 learning_rate=3e-3))
    _, _setup, state, train_step, _, sharding = build_run_parts(cfg)
    state, masks = with_random_masks(state, 0.6)
    before = flat(host(state.params))
    state, metrics = steps(state, train_step, sharding, cfg, 30)
    after = flat(host(state.params))
    for path, m in masks.items():
        assert np.all(after[path][~m] == 0.0), path
        assert np.all(after[path][m] != before[path][m]), path
    checked = 0
    for p, x in flat(host(state.opt_state)).items():
        for path, m in masks.items():
            if p.endswith("/" + path) and x.shape == m.shape:
                assert np.all(x[~m] == 0.0), p
                assert np.any(x[m] != 0.0), p
                checked += 1
    assert checked == len(masks) * (2 if optimizer == "adamw" else 1)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    np.testing.assert_array_equal(masks_of(state)[path], masks[path])


def test_gradual_pruning_follows_the_cubic_schedule_and_only_removes():
    cfg = with_prune(small_config(), schedule="gradual", sparsity=0.75, initial_sparsity=0.0, begin_step=1,
                     end_step=7, every=2)
    _, _setup, state, train_step, _, sharding = build_run_parts(cfg)
    prev = masks_of(state)
    for step in range(10):
        state, _ = steps(state, train_step, sharding, cfg, 1, start=step)
        now = masks_of(state)
        due = 1 <= step <= 7 and (step - 1) % 2 == 0
        target = float(pruning.cubic_sparsity(step, 0.0, 0.75, 1, 7, 2))
        for path, m in now.items():
            n = math.prod(m.shape[1:])
            if due or step > 7:
                assert list(layer_counts(m)) == [n - round(target * n)] * m.shape[0], (step, path)
            assert not np.any(m & ~prev[path]), f"a pruned weight came back at step {step}"
            # Gradual pruning keeps the largest active weights: every kept |w| >= every newly pruned |w|.
            w = np.abs(flat(host(state.params))[path])
            assert np.all(w[~m] == 0.0)
        prev = now
    assert float(pruning.cubic_sparsity(9, 0.0, 0.75, 1, 7, 2)) == pytest.approx(0.75)


@pytest.mark.parametrize("schedule,distribution", [("rigl", "uniform"), ("set", "erk")])
def test_rigl_and_set_hold_each_layers_density_while_swapping_weights(schedule, distribution):
    cfg = with_mesh(with_prune(small_config(), schedule=schedule, sparsity=0.7, begin_step=0, end_step=8, every=2,
                               drop_fraction=0.5, distribution=distribution, seed=3), 2, 2, 2)
    _, _setup, state, train_step, _, sharding = build_run_parts(cfg)
    start = masks_of(state)
    counts = {p: layer_counts(m) for p, m in start.items()}
    total = sum(m.size for m in start.values())
    assert sum(int(c.sum()) for c in counts.values()) == pytest.approx(0.3 * total, abs=len(start) * 2 + 2)
    if distribution == "erk":  # smaller layers keep more: wk (64x32) denser than up (64x128)
        assert counts["blocks/attn/wk/kernel"][0] / 2048 > counts["blocks/mlp/up/kernel"][0] / 8192
    prev, changed = start, 0
    for step in range(10):
        state, _ = steps(state, train_step, sharding, cfg, 1, start=step)
        now = masks_of(state)
        for p, m in now.items():
            np.testing.assert_array_equal(layer_counts(m), counts[p])
            assert np.all(flat(host(state.params))[p][~m] == 0.0)
        moved = sum(int(np.sum(now[p] != prev[p])) for p in now)
        if step < 8 and step % 2 == 0:
            changed += moved > 0
        else:
            assert moved == 0, f"masks changed at step {step}, not an update step"
        prev = now
    assert changed >= 3


def test_the_l1_term_is_logged_and_shrinks_the_targets_faster_than_weight_decay_alone():
    base = small_config()
    base = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, weight_decay=0.1))
    norms = {}
    for l1 in (0.0, 1e-3):
        cfg = with_prune(base, l1=l1)
        _, _setup, state, train_step, _, sharding = build_run_parts(cfg)
        state, metrics = steps(state, train_step, sharding, cfg, 15)
        p = flat(host(state.params))
        norms[l1] = sum(np.abs(p[k]).sum() for k in masks_of(state))
        if l1:
            assert "terms/l1" in metrics[0]
            np.testing.assert_allclose(metrics[-1]["objective"],
                                       metrics[-1]["loss"] + l1 * metrics[-1]["terms/l1"], rtol=1e-5)
        else:
            assert "terms/l1" not in metrics[0]
    assert norms[1e-3] < 0.97 * norms[0.0], norms


def test_keep_top_and_layer_sparsities():
    scores = np.array([[3.0, 1.0], [1.0, 5.0]], np.float32)
    np.testing.assert_array_equal(pruning.keep_top(scores, 2), [[True, False], [False, True]])
    np.testing.assert_array_equal(pruning.keep_top(scores, 3), [[True, True], [False, True]])  # tie: lower index
    from slimjax.slim.select import Target

    t = Target("blocks/mlp/up/kernel", (3, 8, 16), 1, 1, (True, False, True))
    (s,) = layer_sparsities([t], 0.5, "uniform")
    np.testing.assert_array_equal(s, [0.5, 0.0, 0.5])
