"""Sequence (context) parallelism: attention, the loss and its gradients, a train step and decoding
with the length split over the ``sequence`` mesh axis equal the unsharded results; bad layouts fail
in one line."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import build, random_model, small_config
from slimjax import config as C
from slimjax.data import pipeline
from slimjax.errors import SlimjaxError
from slimjax.infer import scoring
from slimjax.infer.generate import Generator
from slimjax.models import sequence
from slimjax.models.attention import Attention
from slimjax.train.sequence_memory import attention_memory
from slimjax.sharding import DEFAULT_RULES, Rules, activation_rules, build_mesh, make_mesh

BATCH, SEQ = 4, 32


def tiny(family="llama", seq_len=SEQ, **model):
    """d_model 32, 2 layers, grouped-query heads (4 query heads over 2 key/value heads)."""
    kw = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64) | model
    if family == "bert":  # multi-head attention
        kw["n_kv_heads"] = 4
    cfg = small_config(family, **kw)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len),
                               train=dataclasses.replace(cfg.train, global_batch_size=BATCH))


def on_mesh(cfg, data=1, fsdp=1, tensor=1, sequence=1, attention="allgather", balance=True):
    return dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, data=data, fsdp=fsdp, tensor=tensor, sequence=sequence, sequence_attention=attention,
        sequence_balance=balance))


def packed(rows=BATCH, length=SEQ, vocab=256, seed=0):
    """Rows of several documents each (positions restart at 0) and padding (segment 0) at the end,
    as the data pipeline packs them."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for r in range(rows):
        end, t, s = length - int(rng.integers(0, 6)), 0, 1
        while t < end:
            n = min(int(rng.integers(2, 12)), end - t)
            seg[r, t:t + n], pos[r, t:t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    tokens = np.where(seg > 0, rng.integers(4, vocab, (rows, length)), 0).astype(np.int32)
    targets = np.where(seg > 0, rng.integers(4, vocab, (rows, length)), 0).astype(np.int32)
    return {"inputs": tokens, "targets": targets, "segment_ids": seg, "positions": pos,
            "loss_mask": (seg > 0).astype(np.float32)}


# (data, fsdp, tensor, sequence): the sequence axis alone, and with the other axes on the remaining devices.
MESHES = [(1, 1, 1, 2), (1, 1, 1, 4), (2, 1, 1, 4), (1, 2, 2, 2), (1, 1, 2, 4)]


def sharded(fn, cfg, *args):
    """``fn(*args)`` jitted on ``cfg``'s mesh inside its rules context (a fresh trace each call)."""
    mesh = make_mesh(cfg.mesh, jax.devices()[: np.prod([getattr(cfg.mesh, a) for a in
                                                         ("data", "fsdp", "tensor", "sequence")])])
    with activation_rules(mesh, Rules.from_config(cfg.mesh)):
        return jax.device_get(jax.jit(lambda *a: fn(*a))(*args))


def assert_close(got, want, rtol=1e-4):
    """Leaf by leaf, within f32 rounding relative to each leaf's largest entry (sums run in another order)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.abs(w).max()))


ATTENTION_CASES = [(shape, attention, True) for shape in MESHES[::2] for attention in ("allgather", "ring")] + [
    (MESHES[2], attention, False) for attention in ("allgather", "ring")]  # bidirectional (the encoder's)


@pytest.mark.parametrize("shape,attention,causal", ATTENTION_CASES)
def test_attention_equals_unsharded(shape, attention, causal):
    cfg = tiny()
    graphdef, params = nnx.split(Attention(cfg.model, jnp.float32, nnx.Rngs(0), causal=causal))
    b = packed()
    x = np.random.default_rng(1).normal(size=(BATCH, SEQ, cfg.model.d_model)).astype(np.float32)
    real = b["segment_ids"] > 0

    def out_and_grads(params, x):
        def loss(params, x):
            y = nnx.merge(graphdef, params)(x, b["positions"], b["segment_ids"])
            return jnp.sum(jnp.sin(y) * real[..., None]), y
        (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, g

    want_y, want_g = jax.device_get(jax.jit(out_and_grads)(params, x))
    got_y, got_g = sharded(out_and_grads, on_mesh(cfg, *shape, attention=attention), params, x)
    # Padding (segment 0) sees the other padding by position, not by index: compare real tokens;
    # padding rows are never fully masked, so they stay finite.
    assert np.isfinite(got_y).all()
    assert_close(got_y[real], want_y[real], rtol=1e-5)
    assert_close(got_g, want_g)


def test_balanced_order_pairs_early_and_late_chunks():
    order = sequence.balanced_order(16, 4)  # 8 chunks of 2: device i gets chunks i and 7 - i
    assert order.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    # Each device's causal work (keys visible to its queries) is the same.
    work = (order.reshape(4, 4) + 1).sum(1)
    assert (work == work[0]).all()


@pytest.mark.parametrize("ways", [2, 4, 8])
def test_restore_undoes_balance(ways):
    mesh = build_mesh(1, 1, 1, jax.devices()[:ways], sequence=ways)
    x = np.arange(2 * 32 * 3, dtype=np.float32).reshape(2, 32, 3)
    layout = sequence.Layout(Rules(DEFAULT_RULES), ("sequence",), ways)
    balanced = np.asarray(sequence.balance(layout, jnp.asarray(x))[0])
    np.testing.assert_array_equal(balanced, x[:, sequence.balanced_order(32, ways)])
    with activation_rules(mesh, Rules(DEFAULT_RULES)):
        back = jax.jit(lambda y: sequence.restore(layout, y, ("batch", "act_length", None)))(balanced)
    np.testing.assert_array_equal(np.asarray(back), x)


LOSS_CASES = [(MESHES[0], "allgather", True), (MESHES[0], "ring", False), (MESHES[2], "allgather", False),
              (MESHES[2], "ring", True), (MESHES[3], "ring", True), (MESHES[4], "allgather", True)]


@pytest.fixture(scope="module")
def decoder():
    cfg = tiny()
    graphdef, params = random_model(cfg)

    def loss_and_grads(params, batch):
        (total, parts), g = jax.value_and_grad(scoring.summed_loss, argnums=1, has_aux=True)(graphdef, params, batch,
                                                                                               1e-3)
        return total, parts, g

    batch = packed(seed=3)
    return cfg, params, batch, loss_and_grads, jax.device_get(jax.jit(loss_and_grads)(params, batch))


@pytest.mark.parametrize("shape,attention,balance", LOSS_CASES)
def test_loss_and_gradients_equal_unsharded(decoder, shape, attention, balance):
    cfg, params, batch, loss_and_grads, (want, want_parts, want_g) = decoder
    got, got_parts, got_g = sharded(loss_and_grads, on_mesh(cfg, *shape, attention=attention, balance=balance),
                                    params, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_parts, want_parts, rtol=1e-5)
    assert_close(got_g, want_g)


def test_encoder_loss_equals_unsharded():
    """Bidirectional ring attention (the encoder, never balanced); all-gather's is in the attention test."""
    cfg = tiny("bert")
    graphdef, params = random_model(cfg)
    batch = packed(seed=4)
    hidden = lambda p, b: scoring.encoder_features(graphdef, p, b | {"token_types": jnp.zeros_like(b["inputs"])})  # noqa: E731
    want = jax.device_get(jax.jit(hidden)(params, batch))
    real = batch["segment_ids"] > 0
    got = sharded(hidden, on_mesh(cfg, data=2, sequence=4, attention="ring"), params, batch)
    assert_close(got[0][real], want[0][real])
    assert_close(got[1][real], want[1][real])


def test_train_step_equals_unsharded():
    """The compiled train and eval steps (ring, balanced): loss, gradient norm, updated parameters, eval sums."""
    cfg = tiny()
    batch = packed(seed=5)

    def one_step(cfg, devices):
        _, _, state, train_step, eval_step, shardings = build(cfg, devices)
        placed = pipeline.to_global(batch, shardings)
        new, metrics = train_step(state, placed)
        return jax.device_get((metrics["loss"], metrics["grad_norm"], new.params, eval_step(new, placed)))

    want = one_step(on_mesh(cfg), jax.devices()[:1])
    got = one_step(on_mesh(cfg, data=2, sequence=4, attention="ring"), jax.devices())
    assert_close(got, want)


def test_kv_cache_decoding_on_a_sequence_mesh():
    cfg = on_mesh(tiny(), data=2, sequence=4, attention="ring")
    _, params = random_model(cfg)
    prompts = [np.random.default_rng(i).integers(4, 256, size=n).tolist() for i, n in enumerate((3, 10, 7))]
    mesh = make_mesh(cfg.mesh, jax.devices())
    on_sequence = Generator(cfg.model, params, mesh, Rules.from_config(cfg.mesh))
    assert on_sequence.generate(prompts, 8).tokens == Generator(cfg.model, params).generate(prompts, 8).tokens


def test_ring_needs_less_memory_than_allgather_and_falls_with_the_axis():
    """The compiler's own figure (not a timing): peak temporary bytes per device of one attention
    forward + backward over 512 positions. Ring's falls at least as 1 / sequence-axis size."""
    ring = {w: attention_memory(512, w, "ring") for w in (1, 2, 4)}
    assert ring[4] < attention_memory(512, 4, "allgather"), ring
    assert ring[2] <= ring[1] / 2 and ring[4] <= ring[2] / 2, ring


def test_ring_rejects_different_head_layouts():
    cfg = tiny()
    graphdef, params = nnx.split(Attention(cfg.model, jnp.float32, nnx.Rngs(0)))
    mesh = build_mesh(1, 1, 2, jax.devices()[:4], sequence=2)
    rules = Rules({**DEFAULT_RULES, "act_kv_heads": ()}, "ring")
    x, b = np.zeros((BATCH, SEQ, cfg.model.d_model), np.float32), packed()
    with activation_rules(mesh, rules), pytest.raises(SlimjaxError, match="'act_heads' and 'act_kv_heads'"):
        jax.jit(lambda p: nnx.merge(graphdef, p)(x, b["positions"], b["segment_ids"]))(params)


BAD = {
    "axis does not divide the length": ({"mesh.sequence": 3, "data.seq_len": 64},
                                        "data.seq_len=64 cannot be split into 2 x mesh.sequence=6 chunks"),
    "balanced chunks do not divide": ({"mesh.sequence": 8, "data.seq_len": 72},
                                      "make data.seq_len a multiple of 16 or set mesh.sequence_balance=False"),
    "unbalanced shards do not divide": ({"mesh.sequence": 8, "data.seq_len": 60, "mesh.sequence_balance": False},
                                        "data.seq_len=60 cannot be split into mesh.sequence=8 shards"),
    "ring with cudnn": ({"mesh.sequence": 2, "mesh.sequence_attention": "ring", "model.attention": "cudnn"},
                        "not cuDNN's"),
    "ring with kv heads the tensor axis cannot split": (
        {"mesh.sequence": 2, "mesh.tensor": 4, "mesh.sequence_attention": "ring", "model.n_heads": 8,
         "model.n_kv_heads": 2}, "mesh.tensor=4 must divide model.n_kv_heads=2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layout_is_a_config_error(case):
    from slimjax.configs import base

    overrides, expected = BAD[case]
    c = base.get_config()
    c.update_from_flattened_dict(overrides)
    with pytest.raises(SlimjaxError) as err:
        C.validate(c)
    assert expected in str(err.value)


def test_bad_layout_is_one_line_exit_2_from_the_cli(tmp_path):
    overrides, expected = BAD["ring with cudnn"]
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    result = subprocess.run([sys.executable, "-m", "slimjax.cli", "train", *flags, f"--workdir={tmp_path / 'new'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("attention", ["allgather", "ring"])
def test_sequence_parallelism_inside_pipeline_stages_equals_the_plain_step(attention):
    """stage 2 x sequence 2 x data 2: the pipeline's shard_map over stage nests the sequence layout."""
    from helpers import synthetic_batch, with_mesh
    from slimjax.train.run import build_fresh

    def step(cfg):
        _, state, train_step, _, sharding = build_fresh(cfg, make_mesh(cfg.mesh))
        _, metrics = train_step(state, pipeline.to_global(synthetic_batch(cfg), sharding))
        return float(metrics["loss"]), float(metrics["grad_norm"])

    base = small_config("llama", n_layers=4)
    nested = with_mesh(base, 2, 1, 1)
    nested = dataclasses.replace(nested, mesh=dataclasses.replace(
        nested.mesh, stage=2, sequence=2, sequence_attention=attention, pipeline_microbatches=2))
    np.testing.assert_allclose(step(nested), step(with_mesh(base, 8, 1, 1)), rtol=1e-5)
