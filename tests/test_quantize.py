"""Quantization: RTN error bounds, exact packing, GPTQ against RTN, the exact bit allocator, the
QAT view's straight-through gradient, and the quantized-storage model (forward, sharding, export)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import build, build_state, flat, run_steps, small_config, synthetic_batch, with_mesh

from slimjax import config as C
from slimjax.checkpoint import Checkpointer
from slimjax.configs import base
from slimjax.data import pipeline
from slimjax.errors import SlimjaxError
from slimjax.infer.scoring import forward
from slimjax.sharding import make_mesh
from slimjax.slim import quantize as Q
from slimjax.slim import spec as S
from slimjax.slim.quant import fake_quantize_ste, stored_bytes
from slimjax.train.run import fresh_state

RNG = np.random.default_rng(0)


def correlated_inputs(n: int, d_in: int, rank: int, seed: int = 0) -> np.ndarray:
    """Calibration inputs dominated by a few directions (as real activations are)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_in)) + 0.1 * rng.standard_normal((n, d_in))


def reference_dequantize(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Float64 NumPy RTN of the documented scheme: (dequantized w, scale per element, whether the
    element lies on a rounding tie, where float32 may round the other way)."""
    d_in = w.shape[0]
    g = d_in if group in (0, -1) else group
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, scales = np.zeros_like(w, np.float64), np.zeros_like(w, np.float64)
    tie = np.zeros(w.shape, bool)
    for start in range(0, d_in, g):
        x = w[start:start + g].astype(np.float64)
        if symmetric:
            s = np.abs(x).max(axis=0) / (hi + 0.5)
            s = np.where(s > 0, s, 1.0)  # an all-zero group: any scale reproduces it
            r = x / s
            q = np.clip(np.round(r), lo, hi)
            out[start:start + g] = q * s
        else:
            mn, mx = np.minimum(x.min(axis=0), 0), np.maximum(x.max(axis=0), 0)
            s = (mx - mn) / (hi - lo)
            s = np.where(s > 0, s, 1.0)
            z = np.clip(np.round(lo - mn / s), lo, hi)
            r = x / s + z
            q = np.clip(np.round(r), lo, hi)
            out[start:start + g] = (q - z) * s
        scales[start:start + g] = s
        tie[start:start + g] = np.abs(np.abs(r - np.floor(r)) - 0.5) < 1e-4
    return out, scales, tie


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("group", [0, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_within_half_a_scale_and_matches_the_reference(bits, group, symmetric):
    w = RNG.standard_normal((64, 24)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column stays exactly zero
    q, scale, zero = Q.quantize(w, bits, group, symmetric)
    assert q.dtype == jnp.int8 and scale.shape == (1 if group == 0 else 64 // group, 24)
    assert (zero is None) == symmetric
    lo, hi = Q.code_range(bits)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    deq = np.asarray(Q.dequantize(q, scale, zero))
    ref, per_elem, tie = reference_dequantize(w, bits, group, symmetric)
    per_elem[:, 0] = 1.0
    # The top code sits exactly half a scale from the group's extreme: allow float32 rounding only.
    assert np.all(np.abs(deq - w) <= per_elem / 2 * (1 + 1e-4) + 1e-7)
    np.testing.assert_allclose(deq[~tie], ref[~tie], rtol=1e-5, atol=1e-6)
    assert tie.sum() <= 2 * scale.size  # at most the two extremes of a group sit on a tie
    assert np.all(deq[:, 0] == 0.0)


def test_bad_bits_and_group_sizes_are_one_line_errors():
    w = np.zeros((48, 8), np.float32)
    with pytest.raises(SlimjaxError, match="bits=5"):
        Q.quantize(w, 5)
    with pytest.raises(SlimjaxError, match="group_size=32 does not divide the input dim 48"):
        Q.quantize(w, 4, 32)


def test_packing_is_exact():
    for bits in (2, 3, 4, 8):
        lo, hi = Q.code_range(bits)
        q = jnp.asarray(RNG.integers(lo, hi + 1, (3, 5, 16)), jnp.int8)
        packed = Q.pack(q, bits)
        per = 8 // Q.container_bits(bits)
        assert packed.shape == (3, 5, 16 // per)
        assert packed.dtype == (jnp.int8 if per == 1 else jnp.uint8)
        np.testing.assert_array_equal(np.asarray(Q.unpack(packed, bits)), np.asarray(q))
    q4 = jnp.asarray([[-8, 7, -1, 0]], jnp.int8)
    np.testing.assert_array_equal(np.asarray(Q.pack_int4(q4)), [[0x78, 0x0F]])  # low nibble first
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(Q.pack_int4(q4))), np.asarray(q4))


@pytest.mark.parametrize("group,symmetric", [(0, True), (16, False)])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(group, symmetric):
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    x = correlated_inputs(512, 64, 8)
    gram = (x.T @ x).astype(np.float32)
    q, scale, zero = Q.gptq(w, gram, 4, group, symmetric, block=32)
    rq, rscale, _ = Q.quantize(w, 4, group, symmetric)
    assert q.dtype == jnp.int8 and scale.shape == rscale.shape
    err_gptq = float(Q.output_error(w, Q.dequantize(q, scale, zero), gram))
    err_rtn = float(Q.output_error(w, Q.dequantize(rq, rscale, _), gram))
    # float64 check of the error itself: sum ||x w - x w_q||^2
    diff = x @ (w.astype(np.float64) - np.asarray(Q.dequantize(q, scale, zero), np.float64))
    assert err_gptq == pytest.approx(float(np.sum(diff ** 2)), rel=1e-3)
    assert err_gptq < 0.5 * err_rtn
    # Codes stay within the range of their width.
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_sensitivity_falls_with_width():
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    x = correlated_inputs(128, 32, 4)
    s = Q.layer_sensitivity(w, (x.T @ x).astype(np.float32), (2, 3, 4, 8, 16))
    assert np.all(np.diff(s) < 0) and s[-1] < 1e-3 * s[0]


def brute_force(table, costs, budget):
    best = (np.inf, None)
    for combo in itertools.product(range(table.shape[1]), repeat=table.shape[0]):
        by = sum(table[i, k] for i, k in enumerate(combo))
        c = sum(costs[i, k] for i, k in enumerate(combo))
        if by <= budget and c < best[0]:
            best = (c, combo)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocator_is_the_brute_force_optimum_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    cands = (2, 3, 4, 8, 16)
    sizes = [(int(rng.choice([16, 32, 64])), int(rng.choice([8, 24])), int(rng.choice([0, 8])), bool(rng.integers(2)))
             for _ in range(5)]
    # Costs fall with width, with noise so that the optimum is not a threshold rule.
    costs = rng.random((5, 5)) * np.array([8, 4, 2, 1, 0.0]) + 0.1 * rng.random((5, 5))
    table = np.asarray([[Q.storage_bytes(s[0], s[1], b, *s[2:]) for b in cands] for s in sizes])
    budget = int(rng.integers(table.min(axis=1).sum(), table.max(axis=1).sum()))
    bits, cost, used = Q.allocate_bits(sizes, costs, budget, cands)
    best, _ = brute_force(table, costs, budget)
    assert cost == pytest.approx(best, abs=1e-12)
    chosen = [cands.index(b) for b in bits]
    assert used == sum(table[i, k] for i, k in enumerate(chosen)) <= budget
    assert sum(costs[i, k] for i, k in enumerate(chosen)) == pytest.approx(cost, abs=1e-12)


def test_allocator_budget_edges():
    sizes = [(64, 64), (64, 64)]
    costs = [[4.0, 2.0, 1.0, 0.5, 0.0], [40.0, 20.0, 10.0, 5.0, 0.0]]
    smallest = 2 * Q.storage_bytes(64, 64, 2)
    bits, _, used = Q.allocate_bits(sizes, costs, smallest)
    assert bits == [2, 2] and used == smallest
    with pytest.raises(SlimjaxError, match=f"below the smallest possible size {smallest}"):
        Q.allocate_bits(sizes, costs, smallest - 1)
    # One byte short of both at 8 bits: the more sensitive layer gets 8.
    both8 = 2 * Q.storage_bytes(64, 64, 8)
    bits, _, used = Q.allocate_bits(sizes, costs, both8 - 1)
    assert bits == [4, 8] and used <= both8 - 1


def with_quant(cfg, name="quant", **opts):
    for key in ("targets", "layer_bits"):
        if key in opts:
            opts[key] = tuple(opts[key])
    slim = dataclasses.replace(cfg.slim, recipe=(name,), **{name: dataclasses.replace(getattr(cfg.slim, name), **opts)})
    C.check_slim(slim)
    return dataclasses.replace(cfg, slim=slim)


def test_ste_forward_rounds_and_gradient_is_the_identity():
    # 2-bit symmetric, one column: absmax 1 -> scale 1 / 1.5; codes round(1.5 w) clipped to [-2, 1].
    w = jnp.asarray([[0.3], [-1.0], [0.62], [0.9]], jnp.float32)
    t = jnp.asarray([[1.0], [0.0], [-1.0], [2.0]], jnp.float32)
    fq = fake_quantize_ste(w, 2, 0, True)
    np.testing.assert_allclose(np.asarray(fq)[:, 0], [0.0, -4 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    grad = jax.grad(lambda w: jnp.sum((fake_quantize_ste(w, 2, 0, True) - t) ** 2))(w)
    # d/dw sum (fq(w) - t)^2 = 2 (fq(w) - t) * d fq / dw, and the straight-through d fq / dw is 1.
    np.testing.assert_allclose(np.asarray(grad), 2 * (np.asarray(fq) - np.asarray(t)), rtol=1e-6)
    # Stacked layers [L, d_in, d_out]: each layer quantized on its own.
    stack = jnp.stack([w, 2 * w])
    np.testing.assert_allclose(np.asarray(fake_quantize_ste(stack, 2, 0, True))[1], 2 * np.asarray(fq), rtol=1e-6)


def test_qat_view_fake_quantizes_only_the_selected_layers():
    cfg = with_quant(small_config(), "qat", bits=4, group_size=32, targets=["blocks/0/mlp/(up|down)$"])
    built = S.build(S.spec_from_config(cfg))
    params = jax.jit(S.init_fn(built))(jax.random.key(0))
    seen = flat(built.view(params, {}))
    for path, x in flat(params).items():
        if path in ("blocks/mlp/up/kernel", "blocks/mlp/down/kernel"):
            ref = np.asarray(Q.fake_quantize(x[0], 4, 32, True))
            np.testing.assert_array_equal(np.asarray(seen[path][0]), ref)
            np.testing.assert_array_equal(np.asarray(seen[path][1]), np.asarray(x[1]))  # layer 1 not selected
            assert not np.array_equal(ref, np.asarray(x[0]))
        else:
            np.testing.assert_array_equal(np.asarray(seen[path]), np.asarray(x), err_msg=path)


def test_qat_run_trains_and_matches_across_meshes():
    cfg = with_quant(small_config(), "qat", bits=4, group_size=16)
    one = run_steps(with_mesh(cfg, 1, 1, 1), 3, devices=jax.devices()[:1])
    many = run_steps(with_mesh(cfg, 2, 2, 2), 3)
    # Sharded reductions reorder float sums; after an update a weight that sits on a rounding
    # boundary may round the other way on one mesh, so later losses agree to 1e-4, not to 1e-6.
    np.testing.assert_allclose(many[0], one[0], rtol=1e-6)
    np.testing.assert_allclose(many, one, rtol=1e-4)
    assert one[-1] < one[0]


def quantized_pair(cfg, **opts):
    """(plain built, plain params, quantized built, quantized params from the plain ones)."""
    plain = S.build(S.spec_from_config(cfg))
    params = jax.jit(S.init_fn(plain))(jax.random.key(0))
    quant = S.build(S.spec_from_config(with_quant(cfg, **opts)))
    qparams = jax.jit(S.rewrite_fn(plain, quant))(params, jax.random.key(1))
    return plain, params, quant, qparams


@pytest.mark.parametrize("opts", [dict(bits=8), dict(bits=4, group_size=16, symmetric=False),
                                  dict(bits=4, layer_bits=["blocks/0/attn/wq=2", "blocks/1/mlp/down=3",
                                                           "blocks/1/attn/wo=8"])])
def test_quantized_forward_equals_the_dequantized_dense_model_and_exports_to_it(opts):
    cfg = small_config()
    plain, params, quant, qparams = quantized_pair(cfg, **opts)
    q = flat(qparams)
    assert all(not k.endswith("/kernel") for k in q if k.startswith("blocks/"))
    assert not any(t for p, t in flat(quant.trainable).items() if "/tap/" in p)
    layer_bits = dict(e.split("=") for e in opts.get("layer_bits", ()))
    # Every stored kernel, dequantized, is the math module's RTN of the original, layer by layer.
    exported = S.export_fn(quant)(qparams)
    assert S.export_spec(quant.spec) == plain.spec
    assert jax.tree.structure(exported) == jax.tree.structure(params)
    for path, w in flat(params).items():
        if not (path.startswith("blocks/") and path.endswith("/kernel")):
            np.testing.assert_array_equal(np.asarray(flat(exported)[path]), np.asarray(w), err_msg=path)
            continue
        name = "/".join(path.split("/")[1:-1])
        d_in = 128 if name == "mlp/down" else 64  # wo's input is heads x head_dim = 64
        for i in range(w.shape[0]):
            bits = int(layer_bits.get(f"blocks/{i}/{name}", opts["bits"]))
            ref = Q.fake_quantize(np.asarray(w[i]).reshape(d_in, -1), bits, opts.get("group_size", 0),
                                  opts.get("symmetric", True))
            np.testing.assert_allclose(np.asarray(flat(exported)[path][i]).reshape(ref.shape), np.asarray(ref),
                                       rtol=1e-6, atol=1e-7, err_msg=path)
    batch = synthetic_batch(cfg)
    logits_q = jax.jit(forward, static_argnums=0)(quant.graphdef, qparams, batch)
    logits_d = jax.jit(forward, static_argnums=0)(plain.graphdef, exported, batch)
    np.testing.assert_allclose(np.asarray(logits_q), np.asarray(logits_d), atol=1e-5)
    logits_f = jax.jit(forward, static_argnums=0)(plain.graphdef, params, batch)
    assert not np.allclose(np.asarray(logits_q), np.asarray(logits_f), atol=1e-5)
    # Bytes: int8 codes are 1/4 of float32, 4-bit packed 1/8 (plus scales).
    kernels = sum(x.size for p, x in flat(params).items() if p.startswith("blocks/") and p.endswith("/kernel"))
    scales = sum(x.size for p, x in q.items() if p.endswith("/tap/scale"))
    if opts == dict(bits=8):
        assert stored_bytes(qparams) == kernels + 4 * scales
        # The allocator's byte count agrees with what is stored: 7 matrices per layer, 2 layers.
        shapes = [(64, 32), (64, 32), (64, 64), (64, 64), (64, 128), (64, 128), (128, 64)]
        assert stored_bytes(qparams) == 2 * sum(Q.storage_bytes(i, o, 8) for i, o in shapes)


def test_stored_codes_are_sharded_by_the_kernel_axes_frozen_and_restored(tmp_path):
    cfg = with_quant(with_mesh(small_config(), 2, 2, 2), bits=4, group_size=32)
    plain_cfg = with_mesh(small_config(), 2, 2, 2)
    *_, plain_state = build_state(plain_cfg)
    *_, state = build_state(cfg)
    frozen, trained = flat(state.frozen), flat(state.params)
    assert not any("/tap/" in p for p in trained) and any(p.endswith("/tap/codes") for p in frozen)
    kernels = flat(plain_state.params)
    for path, x in frozen.items():
        kernel = kernels[path.rsplit("/tap/", 1)[0] + "/kernel"]
        spec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
        if path.endswith("/codes"):
            assert x.dtype == jnp.uint8 and x.shape[:-1] == kernel.shape[:-1]
            assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == spec, path
        else:  # scales: the kernel's leading and output dims, groups replicated
            n_out = 2 if "/attn/w" in path and "/wo/" not in path else 1
            want = (spec[0], None, *spec[len(spec) - n_out:])
            assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == want, path
    # A train step trains the rest and leaves the codes as they are.
    _, _, state, train_step, _, sharding = build(cfg)
    before = jax.device_get(state.frozen)
    state, metrics = train_step(state, pipeline.to_global(synthetic_batch(cfg), sharding))
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), before)
    # Orbax: save on (2,2,2), restore on (1,2,4): same leaves, each sharded as the setup says.
    ck = Checkpointer(tmp_path, dataclasses.replace(cfg.checkpoint, async_save=False))
    ck.save(1, state.as_dict(), {"position": 1}, {"step": 1, "config": cfg.to_dict()})
    ck.close()
    other = with_mesh(cfg, 1, 2, 4)
    _, setup2, _ = fresh_state(other, make_mesh(other.mesh))
    ck = Checkpointer(tmp_path, other.checkpoint, read_only=True)
    got, _, _ = ck.restore(1, setup2.abstract.as_dict())
    ck.close()
    for (path, leaf), want, sh in zip(flat(got["frozen"]).items(), jax.tree.leaves(before),
                                      jax.tree.leaves(setup2.shardings.frozen)):
        assert leaf.dtype == want.dtype and leaf.sharding == sh, path
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=path)


@pytest.mark.parametrize("section,key,value,match", [
    ("quant", "bits", 5, "slim.quant.bits' is 5"),
    ("qat", "bits", 16, "slim.qat.bits' is 16"),
    ("quant", "layer_bits", ("blocks/0/attn/wq",), "is not 'LAYER=BITS'"),
    ("quant", "targets", (), "slim.quant.targets' is empty"),
])
def test_bad_config_values_are_one_line_errors(section, key, value, match):
    c = base.get_config()
    setattr(getattr(c.slim, section), key, value)
    with pytest.raises(SlimjaxError, match=match):
        C.validate(c)


@pytest.mark.parametrize("opts,match", [
    (dict(group_size=48), "slim.quant.group_size=48 does not divide the input dim 64 of layer 'blocks/attn/wk'"),
    (dict(targets=["nothing$"]), "pattern 'nothing\\$' matches no layer"),
    (dict(targets=["^embed$"]), "selects the embedding table"),
    (dict(layer_bits=["blocks/7/attn/wq=4"]), "names layer 'blocks/7/attn/wq'"),
    (dict(targets=["blocks/0/attn/wq$"]), None),
    (dict(layer_bits=["blocks/0/attn/wq=16"]), "would stay float inside the scanned stack"),
])
def test_bad_quant_layouts_fail_at_build_with_the_layer_named(opts, match):
    spec = S.spec_from_config(with_quant(small_config(), **opts))
    if match is None:  # a single layer of a stack: the other layer stays float, which a stack cannot hold
        match = "blocks/1/attn/wq' would stay float"
    with pytest.raises(SlimjaxError, match=match):
        S.build(spec)


@pytest.mark.parametrize("bits,group,symmetric", [(8, 0, True), (4, 128, True), (4, 128, False), (8, 0, False)])
def test_matches_qwix(bits, group, symmetric):
    """slimjax's RTN equals qwix's (0.1.8) weight quantization on the same matrix: int8 per-channel
    and int4 with 128-row groups; and the quantized model's forward equals the plain model run on
    qwix-dequantized kernels. qwix's model-level PTQ (``quantize_model``) does not run on the slimjax
    decoder (qwix 0.1.8, jax 0.10.2, flax 0.12.8): rules matching the scanned or merged blocks
    leave their kernels float32, and a rule matching ``lm_head`` fails in ``Dense.product``'s
    ``kernel.astype(dtype)`` (``ValueError: Unsupported type: QArray`` in qwix's
    ``flax_util.update_boxed``), so qwix's array API is compared instead."""
    qwix = pytest.importorskip("qwix")
    qtype = {8: jnp.int8, 4: jnp.int4}[bits]
    method = "absmax" if symmetric else "minmax"

    def by_qwix(m):
        tiles = {0: group} if group else None
        qa = qwix.quantize(jnp.asarray(m), qtype, channelwise_axes=(1,), tiled_axes=tiles, calibration_method=method)
        return np.asarray(qwix.dequantize(qa))

    w = RNG.standard_normal((256, 96)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(Q.fake_quantize(w, bits, group, symmetric)), by_qwix(w), rtol=1e-6, atol=1e-7)
    if group:
        return
    cfg = small_config()
    plain, params, quant, qparams = quantized_pair(cfg, bits=bits, symmetric=symmetric)
    theirs = {}
    for path, x in flat(params).items():
        if path.startswith("blocks/") and path.endswith("/kernel"):
            d_in = 128 if "/down/" in path else 64
            x = np.stack([by_qwix(np.asarray(layer).reshape(d_in, -1)).reshape(layer.shape) for layer in x])
        theirs[path] = x
    theirs = jax.tree.unflatten(jax.tree.structure(params), [theirs[p] for p in flat(params)])
    batch = synthetic_batch(cfg)
    ours = jax.jit(forward, static_argnums=0)(quant.graphdef, qparams, batch)
    ref = jax.jit(forward, static_argnums=0)(plain.graphdef, theirs, batch)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
