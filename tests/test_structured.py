"""Structured pruning: the smaller model computes exactly what the original does with the removed
heads and neurons zeroed (SwiGLU + GQA and GELU + MHA + biases, scanned and unrolled), the new
config builds with the sliced shapes, importance follows Wanda's score, counts and errors."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers import random_model, small_config, synthetic_batch, with_mesh
from slimjax.errors import SlimjaxError
from slimjax.infer.generate import unstacked
from slimjax.infer.scoring import forward
from slimjax.sharding import Rules, make_mesh
from slimjax.slim.calibrate import LayerStats, collect_stats
from slimjax.slim.spec import ModelSpec, build, spec_from_config
from slimjax.slim.structured import structured_prune


def unrolled(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))


def logits(model_cfg, params, batch):
    return np.asarray(forward(build(ModelSpec("decoder", model_cfg)).graphdef, params, batch), np.float64)


def masked(model_cfg, params, report):
    """The original parameters with every removed head's wo rows and removed neuron's down rows zeroed."""
    hd = model_cfg.head_dim
    out = jax.tree.map(np.array, params)
    for i in range(model_cfg.n_layers):
        layer = report["layers"][f"blocks/{i}"]
        block = out["blocks"][i] if not model_cfg.scan_layers else jax.tree.map(lambda a, i=i: a[i], out["blocks"])
        gone_heads = sorted(set(range(model_cfg.n_heads)) - set(layer["heads"]))
        gone_neurons = sorted(set(range(model_cfg.d_ff)) - set(layer["neurons"]))
        block["attn"]["wo"]["kernel"][gone_heads] = 0.0
        block["mlp"]["down"]["kernel"][gone_neurons] = 0.0
        assert len(gone_heads) * hd and len(gone_neurons)  # something was removed in every layer
    return out


def fake_stats(cfg, seed=0):
    """Positive per-feature sums of squares for every wo and down input, spread over orders of magnitude."""
    rng = np.random.default_rng(seed)
    m = cfg.model
    stats = {}
    for i in range(m.n_layers):
        stats[f"blocks/{i}/attn/wo"] = LayerStats(10 ** rng.uniform(-2, 2, m.n_heads * m.head_dim), None, 100)
        stats[f"blocks/{i}/mlp/down"] = LayerStats(10 ** rng.uniform(-2, 2, m.d_ff), None, 100)
    return stats


@pytest.mark.parametrize("family,heads,mlp,sizes", [
    ("llama", 0.5, 0.25, (4, 2, 96)),  # 4 kv groups of 2 heads: 2 groups go
    ("gpt2", 0.3, 0.4, (6, 6, 77)),  # 8 heads: round(2.4) = 2 go; round(51.2) = 51 neurons go
])
@pytest.mark.parametrize("with_stats", [True, False])
def test_the_pruned_model_equals_the_original_with_removed_heads_and_neurons_zeroed(family, heads, mlp, sizes,
                                                                                     with_stats):
    cfg = small_config(family)
    _, params = random_model(cfg)
    stats = fake_stats(cfg) if with_stats else None
    batch = synthetic_batch(cfg)
    smaller, pruned, report = structured_prune(cfg.model, params, stats, heads, mlp)
    assert (smaller.n_heads, smaller.n_kv_heads, smaller.d_ff) == sizes
    assert dataclasses.replace(smaller, n_heads=cfg.model.n_heads, n_kv_heads=cfg.model.n_kv_heads,
                               d_ff=cfg.model.d_ff) == cfg.model
    assert report["n_heads"] == [8, sizes[0]] and report["d_ff"] == [128, sizes[2]]
    # The new config builds, and its parameters have exactly the sliced shapes.
    shapes = build(ModelSpec("decoder", smaller)).shapes
    assert jax.tree.structure(shapes) == jax.tree.structure(pruned)
    jax.tree.map(lambda s, p: np.testing.assert_equal(tuple(s.shape), tuple(np.shape(p))), shapes, pruned)
    # Exactness: the smaller model is the original with the removed rows of wo and down zeroed.
    small = logits(smaller, pruned, batch)
    reference = logits(cfg.model, masked(cfg.model, params, report), batch)
    np.testing.assert_allclose(small, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    assert np.abs(reference - logits(cfg.model, params, batch)).max() > 1e-2  # the removal mattered
    # The unrolled layout of the same weights prunes to the same model.
    flat_cfg = unrolled(cfg).model
    smaller_u, pruned_u, report_u = structured_prune(flat_cfg, unstacked(cfg.model, params), stats, heads, mlp)
    assert smaller_u == dataclasses.replace(smaller, scan_layers=False)
    assert report_u["layers"] == report["layers"]
    for a, b in zip(jax.tree.leaves(unstacked(smaller, pruned)), jax.tree.leaves(pruned_u), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(logits(smaller_u, pruned_u, batch), small, rtol=1e-5,
                               atol=1e-5 * np.abs(small).max())


def test_importance_is_wandas_score_and_gqa_keeps_whole_groups():
    """Kept groups/neurons are the top scores of ||row of wo / down|| * sqrt(sum x^2) (float64
    reference), summed over a group's rows of wo; query heads follow their kv group."""
    cfg = small_config()
    m = cfg.model
    _, params = random_model(cfg)
    stats = fake_stats(cfg, seed=1)
    _, _, report = structured_prune(m, params, stats, 0.5, 0.5)
    for i in range(m.n_layers):
        wo = np.asarray(params["blocks"]["attn"]["wo"]["kernel"][i], np.float64).reshape(m.n_heads * m.head_dim, -1)
        down = np.asarray(params["blocks"]["mlp"]["down"]["kernel"][i], np.float64)
        rows = np.linalg.norm(wo, axis=1) * np.sqrt(stats[f"blocks/{i}/attn/wo"].sq_norm)
        groups = rows.reshape(m.n_kv_heads, -1).sum(axis=1)
        neurons = np.linalg.norm(down, axis=1) * np.sqrt(stats[f"blocks/{i}/mlp/down"].sq_norm)
        layer = report["layers"][f"blocks/{i}"]
        np.testing.assert_allclose(layer["group_scores"], groups, rtol=1e-6)
        np.testing.assert_allclose(layer["neuron_scores"], neurons, rtol=1e-6)
        assert layer["kv_groups"] == sorted(np.argsort(-groups)[:2].tolist())
        assert layer["neurons"] == sorted(np.argsort(-neurons)[:64].tolist())
        assert layer["heads"] == [2 * g + j for g in layer["kv_groups"] for j in range(2)]
    # The statistics change the choice: weight norms alone pick other neurons.
    _, _, by_weight = structured_prune(m, params, None, 0.5, 0.5)
    assert by_weight["importance"] == "weight_norm" and report["importance"] == "wanda"
    assert by_weight["layers"]["blocks/0"]["neurons"] != report["layers"]["blocks/0"]["neurons"]


def test_zero_fractions_keep_everything():
    cfg = small_config("gpt2")
    _, params = random_model(cfg)
    smaller, pruned, _ = structured_prune(cfg.model, params, None, 0.0, 0.0)
    assert smaller == cfg.model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pruned), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("heads,mlp,message", [
    (1.0, 0.0, r"--heads=1.0 must be in \[0, 1\)"),
    (-0.1, 0.0, r"--heads=-0.1 must be in \[0, 1\)"),
    (0.0, 1.5, r"--mlp=1.5 must be in \[0, 1\)"),
    (0.9, 0.0, r"--heads=0.9 would remove all 4 kv groups \(2 heads each\)"),
    (0.0, 0.999, r"--mlp=0.999 would remove all 128 MLP neurons"),
])
def test_bad_fractions_are_errors_naming_the_flag(heads, mlp, message):
    cfg = small_config()
    _, params = random_model(cfg)
    with pytest.raises(SlimjaxError, match=message):
        structured_prune(cfg.model, params, None, heads, mlp)


def test_missing_statistics_and_adapter_parameters_are_errors():
    cfg = small_config()
    _, params = random_model(cfg)
    stats = fake_stats(cfg)
    del stats["blocks/1/mlp/down"]
    with pytest.raises(SlimjaxError, match="no entry for blocks/1/mlp/down"):
        structured_prune(cfg.model, params, stats, 0.5, 0.5)
    with_adapter = jax.tree.map(lambda x: x, params)
    with_adapter["blocks"]["attn"]["wq"]["tap"] = {"a": np.zeros(1), "b": np.zeros(1)}
    with pytest.raises(SlimjaxError, match="attn/wq also holds tap; export the run"):
        structured_prune(cfg.model, with_adapter, None, 0.5, 0.5)


def test_calibrated_pruning_of_sharded_parameters_on_a_2x2x2_mesh():
    """Statistics from collect_stats and parameters sharded on 8 devices: the pruned model still
    equals the masked original, and the choice follows the collected statistics."""
    cfg = with_mesh(small_config(), 2, 2, 2)
    mesh, rules = make_mesh(cfg.mesh), Rules.from_config(cfg.mesh)
    _, host = random_model(cfg)
    built = build(spec_from_config(cfg))
    params = jax.device_put(host, rules.tree_shardings(built.axes, built.shapes, mesh))
    batch = synthetic_batch(cfg)
    stats = collect_stats(spec_from_config(cfg), params, [batch], mesh, rules, ("attn/wo", "mlp/down"), gram=False)
    smaller, pruned, report = structured_prune(cfg.model, params, stats, 0.25, 0.5)
    assert (smaller.n_heads, smaller.n_kv_heads, smaller.d_ff) == (6, 3, 64)
    small = logits(smaller, jax.device_get(pruned), batch)
    reference = logits(cfg.model, masked(cfg.model, host, report), batch)
    np.testing.assert_allclose(small, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    down = np.linalg.norm(host["blocks"]["mlp"]["down"]["kernel"][1].astype(np.float64), axis=1)
    scores = down * np.sqrt(np.asarray(stats["blocks/1/mlp/down"].sq_norm, np.float64))
    assert report["layers"]["blocks/1"]["neurons"] == sorted(np.argsort(-scores)[:64].tolist())
