"""The decoder's float32 forward pass against a float64 NumPy reference, and packed-segment isolation."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import reference
from helpers import small_config, synthetic_batch
from slimjax.train.state import build_model, params_of


def _random_model(cfg, seed=0):
    """A model with every parameter random (norm scales and biases too), so all terms are tested."""
    model = build_model(cfg.model, jax.random.key(seed), np.float32)
    params = params_of(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    # Norm scales around 1 (a realistic regime), everything else N(0, 0.3^2).
    leaves = [np.asarray(0.3 * jax.random.normal(k, x.shape), np.float32)
              + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
              for k, (path, x) in zip(keys, flat)]
    params = jax.tree.unflatten(treedef, leaves)
    return nnx.graphdef(model), params


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


FAMILIES = {
    "llama-gqa": dict(family="llama"),
    "llama-mha-tied": dict(family="llama", n_kv_heads=8, tie_embeddings=True),
    "llama-mqa-unrolled": dict(family="llama", n_kv_heads=1, scan_layers=False),
    "gpt2": dict(family="gpt2"),
    "gpt2-untied-unrolled": dict(family="gpt2", tie_embeddings=False, scan_layers=False),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_matches_float64_reference(name):
    kw = dict(FAMILIES[name])
    cfg = small_config(kw.pop("family"), **kw)
    graphdef, params = _random_model(cfg)
    batch = synthetic_batch(cfg)
    assert batch["segment_ids"].max() > 1  # several packed documents per row
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    ref = reference.forward(jax.device_get(params), cfg.model, batch["inputs"], batch["positions"],
                            batch["segment_ids"])
    assert _rel_err(logits, ref) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_segments_are_isolated(family):
    cfg = small_config(family)
    graphdef, params = _random_model(cfg)
    model = nnx.merge(graphdef, params)
    batch = synthetic_batch(cfg)
    seg = batch["segment_ids"]
    row = int(np.argmax(seg.max(axis=1)))  # a row with several documents
    target = 2
    assert (seg[row] == target).any() and seg[row].max() > target
    perturbed = batch["inputs"].copy()
    where = seg[row] == target
    perturbed[row, where] = (perturbed[row, where] + 7) % cfg.model.vocab_size
    base = np.asarray(model(batch["inputs"], batch["positions"], seg))
    moved = np.asarray(model(perturbed, batch["positions"], seg))
    others = seg[row] != target
    np.testing.assert_array_equal(base[row, others], moved[row, others])  # bit-identical elsewhere
    assert np.abs(base[row, where] - moved[row, where]).max() > 1e-3  # the segment itself changed
    np.testing.assert_array_equal(np.delete(base, row, 0), np.delete(moved, row, 0))


def test_unrolled_and_scanned_models_hold_the_same_weights():
    cfg = small_config("llama")
    scanned = params_of(build_model(cfg.model, jax.random.key(3), np.float32))
    unrolled_cfg = dataclasses.replace(cfg.model, scan_layers=False)
    unrolled = params_of(build_model(unrolled_cfg, jax.random.key(3), np.float32))
    for i in range(cfg.model.n_layers):
        layer = jax.tree.map(lambda a: a[i], scanned["blocks"])
        jax.tree.map(np.testing.assert_array_equal, layer, unrolled["blocks"][i])
