"""The decoder's float32 forward pass against a float64 NumPy reference, and packed-segment isolation."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import reference
from helpers import assert_segments_isolated, random_model, small_config, synthetic_batch
from slimjax.train.state import build_model, params_of


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
    graphdef, params = random_model(cfg)
    batch = synthetic_batch(cfg)
    assert batch["segment_ids"].max() > 1  # several packed documents per row
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    ref = reference.forward(jax.device_get(params), cfg.model, batch["inputs"], batch["positions"],
                            batch["segment_ids"])
    assert _rel_err(logits, ref) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_segments_are_isolated(family):
    cfg = small_config(family)
    assert_segments_isolated(cfg, synthetic_batch(cfg))


def test_unrolled_and_scanned_models_hold_the_same_weights():
    cfg = small_config("llama")
    scanned = params_of(build_model(cfg.model, jax.random.key(3), np.float32))
    unrolled_cfg = dataclasses.replace(cfg.model, scan_layers=False)
    unrolled = params_of(build_model(unrolled_cfg, jax.random.key(3), np.float32))
    for i in range(cfg.model.n_layers):
        layer = jax.tree.map(lambda a: a[i], scanned["blocks"])
        jax.tree.map(np.testing.assert_array_equal, layer, unrolled["blocks"][i])
