"""Calibration statistics: equal to a float64 NumPy recomputation from each layer's input, padding
excluded, the same for scanned and unrolled runs, computed on a (2, 2, 2) mesh; calibration rows
from the run's training stream, and a clear error when there are too few."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config, synthetic_batch, with_lora, with_mesh
from slimjax import config as C
from slimjax.configs import base
from slimjax.data import loader
from slimjax.errors import SlimjaxError
from slimjax.infer.generate import unstacked
from slimjax.models.layers import Dense
from slimjax.sharding import Rules, make_mesh, path_str
from slimjax.slim.calibrate import calibration_batches, collect_stats
from slimjax.slim.spec import build, export_fn, export_spec, init_fn, spec_from_config

ALL = ("blocks/", "lm_head")


def padded_batches(cfg):
    """Two batches; the second has padding rows and padded tails (segment 0, token 0)."""
    a, b = synthetic_batch(cfg, 0), synthetic_batch(cfg, 1)
    b["segment_ids"][12:] = 0
    b["segment_ids"][3, 20:] = 0
    b["segment_ids"][5, 9:] = 0
    b["inputs"] = np.where(b["segment_ids"] == 0, 0, b["inputs"])
    return [a, b]


def layer_inputs(cfg, params, batch):
    """{layer name: its input [batch, length, *in]} captured by an eager (un-jitted) forward pass
    of the unrolled model, without a mesh."""
    model_cfg = dataclasses.replace(cfg.model, scan_layers=False)
    built = build(dataclasses.replace(spec_from_config(cfg), model=model_cfg))
    flat = unstacked(cfg.model, params) if cfg.model.scan_layers else params
    model = nnx.merge(built.graphdef, flat)
    seen = {}

    def capture(name):
        def tap(dense, x):
            seen[name] = np.asarray(x, np.float64)
            return dense.product(x)
        return tap

    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            node.tap = capture("/".join(map(str, path)))
    model(batch["inputs"], batch["positions"], batch["segment_ids"])
    # The capture itself: layer 0's query input is the normed embedding.
    x0 = model.blocks[0].attn_norm(model._embed(batch["inputs"], batch["positions"]))
    np.testing.assert_allclose(seen["blocks/0/attn/wq"], np.asarray(x0), rtol=1e-6, atol=1e-6)
    return seen


def reference(cfg, params, batches, mask_padding=True):
    """float64 (sq_norm, gram, tokens) per layer from the captured inputs."""
    sums = {}
    tokens = 0
    for batch in batches:
        real = batch["segment_ids"] != 0 if mask_padding else np.ones(batch["segment_ids"].shape, bool)
        tokens += int(real.sum())
        for name, x in layer_inputs(cfg, params, batch).items():
            rows = x.reshape(*x.shape[:2], -1)[real]  # [tokens, d_in_flat]
            sq, g = (rows ** 2).sum(0), rows.T @ rows
            old = sums.get(name, (0.0, 0.0))
            sums[name] = (old[0] + sq, old[1] + g)
    return sums, tokens


def stats_on(cfg, params, batches, patterns=ALL, gram=True):
    mesh = make_mesh(cfg.mesh)
    return collect_stats(spec_from_config(cfg), params, batches, mesh, Rules.from_config(cfg.mesh), patterns,
                         gram=gram)


def assert_stats_equal(stats, ref, tokens, gram=True):
    assert sorted(stats) == sorted(ref)
    for name, s in stats.items():
        assert s.tokens == tokens, name
        np.testing.assert_allclose(np.asarray(s.sq_norm), ref[name][0], rtol=2e-5, err_msg=name)
        if gram:
            g = np.asarray(s.gram)
            np.testing.assert_allclose(g, ref[name][1], rtol=2e-5, atol=2e-5 * np.abs(ref[name][1]).max(),
                                       err_msg=name)
        else:
            assert s.gram is None


def test_stats_equal_a_float64_recomputation_on_a_2x2x2_mesh_padding_excluded():
    """Llama (SwiGLU, GQA, scanned) on 8 devices: every layer's sums of x^2 and x x^T over real tokens."""
    cfg = with_mesh(small_config(), 2, 2, 2)
    _, params = random_model(cfg)
    batches = padded_batches(cfg)
    stats = stats_on(cfg, params, batches)
    ref, tokens = reference(cfg, params, batches)
    assert tokens == 2 * 16 * 32 - 4 * 32 - 12 - 23
    assert stats["blocks/1/attn/wo"].sq_norm.shape == (8 * 8,)  # [heads, head_dim] flattened
    assert stats["blocks/0/mlp/down"].gram.shape == (128, 128)
    assert_stats_equal(stats, ref, tokens)
    # The padding mattered: counted in, the sums would differ.
    unmasked, _ = reference(cfg, params, batches, mask_padding=False)
    assert not np.allclose(np.asarray(stats["blocks/0/attn/wq"].sq_norm), unmasked["blocks/0/attn/wq"][0], rtol=1e-3)
    # Padding tokens' values never reach the statistics.
    moved = [dict(b) for b in batches]
    moved[1]["inputs"] = np.where(moved[1]["segment_ids"] == 0, 77, moved[1]["inputs"])
    again = stats_on(cfg, params, moved, patterns=("blocks/1/mlp/down",))
    np.testing.assert_allclose(np.asarray(again["blocks/1/mlp/down"].gram), np.asarray(stats["blocks/1/mlp/down"].gram),
                               rtol=1e-6, atol=1e-6)


def test_scanned_and_unrolled_runs_give_identical_stats_gelu_with_bias():
    """GPT-2 (GELU, biases, learned positions): the same weights scanned or unrolled give the same
    per-layer statistics, which match the reference; a subset of layers by pattern; no gram."""
    scanned = with_mesh(small_config("gpt2"), 2, 2, 2)
    unrolled = dataclasses.replace(scanned, model=dataclasses.replace(scanned.model, scan_layers=False))
    _, params = random_model(scanned)
    batches = padded_batches(scanned)
    patterns = ("blocks/1/", "mlp/up$")
    a = stats_on(scanned, params, batches, patterns, gram=False)
    b = stats_on(unrolled, unstacked(scanned.model, params), batches, patterns, gram=False)
    assert sorted(a) == ["blocks/0/mlp/up", "blocks/1/attn/wk", "blocks/1/attn/wo", "blocks/1/attn/wq",
                         "blocks/1/attn/wv", "blocks/1/mlp/down", "blocks/1/mlp/up"]
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].sq_norm), np.asarray(b[name].sq_norm), rtol=1e-6, err_msg=name)
        assert a[name].tokens == b[name].tokens
    ref, tokens = reference(scanned, params, batches)
    assert_stats_equal(a, {k: ref[k] for k in a}, tokens, gram=False)


def test_a_pattern_matching_no_layer_is_an_error():
    cfg = small_config()
    _, params = random_model(cfg)
    with pytest.raises(SlimjaxError, match="'attn/wz' matches no layer"):
        stats_on(cfg, params, padded_batches(cfg)[:1], patterns=("attn/wz",))


def text_config(tmp_path, n_files):
    """Byte-tokenized text files (``n_files`` for training, one held out), one data shard."""
    for split, n in (("train", n_files), ("eval", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"{i:03d}.txt").write_text(f"document {i}: " + "words and more words " * 20)
    c = base.get_config()
    c.data.sources = ({"kind": "text", "path": f"{tmp_path}/train/*.txt", "eval_path": f"{tmp_path}/eval/*.txt"},)
    c.data.tokenizer_kind, c.data.shards, c.data.seq_len = "byte", 1, 64
    c.model.vocab_size, c.train.global_batch_size = 512, 4
    return C.validate(c)


def test_calibration_batches_are_the_training_stream_deterministic_and_padded_to_whole_batches(tmp_path):
    cfg = text_config(tmp_path, 40)
    batches = calibration_batches(cfg, str(tmp_path / "run"), 10)
    assert len(batches) == 3 and all(b["inputs"].shape == (4, 64) for b in batches)
    real_rows = sum(int((b["segment_ids"] != 0).any(axis=1).sum()) for b in batches)
    assert real_rows == 10 and not batches[-1]["segment_ids"][2:].any()
    data = loader.build(cfg.data, 4, cfg.train.seed, 1, 512, str(tmp_path / "run"))
    for s in range(2):
        for key in ("inputs", "segment_ids", "positions"):
            np.testing.assert_array_equal(batches[s][key], data.train[s][key])
    again = calibration_batches(cfg, str(tmp_path / "run"), 10)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    other = calibration_batches(cfg, str(tmp_path / "run"), 10, batch_size=8, seed=3)
    assert len(other) == 2 and not np.array_equal(other[0]["inputs"][:4], batches[0]["inputs"])


def test_too_few_training_rows_is_an_error_naming_the_flag(tmp_path):
    cfg = text_config(tmp_path, 5)
    rows = loader.build(cfg.data, 4, 0, 1, 512, str(tmp_path / "run")).stats["sources"]
    available = sum(s["rows"] for s in rows.values())
    with pytest.raises(SlimjaxError, match=rf"holds {available} rows .*--calibration_samples={available + 1}"):
        calibration_batches(cfg, str(tmp_path / "run"), available + 1)
    assert len(calibration_batches(cfg, str(tmp_path / "run"), available)) == -(-available // 4)


def test_a_lora_run_records_the_adapted_model_through_its_own_tap():
    """The recording tap keeps a transform's tap in the product: stats of a LoRA model (B random)
    equal those of its export with the adapters merged into the kernels."""
    cfg = with_lora(small_config(), targets=("attn/wq", "mlp/up"))
    spec = spec_from_config(cfg)
    built = build(spec)
    params = init_fn(built)(jax.random.key(3))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) if path_str(p).endswith("tap/b") else x
                                          for k, (p, x) in zip(keys, leaves)])
    merged_spec, merged = export_spec(spec), export_fn(built)(params)
    assert merged_spec.recipe == ()
    mesh, rules = make_mesh(cfg.mesh), Rules.from_config(cfg.mesh)
    batches = padded_batches(cfg)[:1]
    a = collect_stats(spec, params, batches, mesh, rules, ("mlp/",), gram=False)
    b = collect_stats(merged_spec, merged, batches, mesh, rules, ("mlp/",), gram=False)
    base_only = collect_stats(merged_spec, built.split(params)[1], batches, mesh, rules, ("mlp/",), gram=False)
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].sq_norm), np.asarray(b[name].sq_norm), rtol=1e-5, err_msg=name)
        assert not np.allclose(np.asarray(a[name].sq_norm), np.asarray(base_only[name].sq_norm), rtol=1e-3)
