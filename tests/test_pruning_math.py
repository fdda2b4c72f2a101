"""The pruning math (slimjax.slim.pruning) against float64 NumPy references, with exact counts."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimjax.errors import SlimjaxError
from slimjax.slim import pruning as P


def _tied(rng, shape, levels=8):
    """Random weights on a coarse grid, so that many scores tie."""
    return (rng.integers(-levels, levels + 1, size=shape) / levels).astype(np.float32)


def _top_k_mask(scores, k, axis):
    """NumPy reference: the k highest along axis, equal scores kept by lower index (stable argsort)."""
    order = np.argsort(-scores, axis=axis, kind="stable")
    ranks = np.argsort(order, axis=axis, kind="stable")
    return ranks < k


def _ref_sparsegpt(w, gram, sparsity, nm=None, block=128, damp=0.01):
    """Float64 NumPy SparseGPT, row by row with explicit OBS updates (the documented algorithm)."""
    w = w.astype(np.float64).copy()
    d_in, d_out = w.shape
    h = gram.astype(np.float64).copy()
    diag = np.diag(h).copy()
    live = diag > 0
    h[~live, :] = 0
    h[:, ~live] = 0
    diag[~live] = 1
    diag += damp * diag.mean()
    h[np.diag_indices(d_in)] = diag
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    if nm:
        block = max(nm[1], block // nm[1] * nm[1])
    mask = np.zeros(w.shape, bool)
    for start in range(0, d_in, block):
        end = min(start + block, d_in)
        err = np.zeros((end - start, d_out))
        group = nm[1] if nm else end - start
        keep = nm[0] if nm else (end - start) - (round(sparsity * end) - round(sparsity * start))
        for j in range(start, end):
            if (j - start) % group == 0:
                score = (w[j:j + group] / np.diag(u)[j:j + group, None]) ** 2 * live[j:j + group, None]
                mask[j:j + group] = _top_k_mask(score, keep, axis=0)
            err[j - start] = np.where(mask[j], 0.0, w[j] / u[j, j])
            w[j:end] -= np.outer(u[j, j:end], err[j - start])
        w[start:end] *= mask[start:end]
        w[end:] -= u[start:end, end:].T @ err
    return w, mask


def _error(w, w_new, gram):
    d = np.asarray(w, np.float64) - np.asarray(w_new, np.float64)
    return float(np.sum(d * (gram @ d)))


def _calibration(rng, d_in, tokens=512):
    """Correlated inputs X = Z A (as real activations are) and their gram X^T X, float64."""
    x = rng.standard_normal((tokens, d_in)) @ rng.standard_normal((d_in, d_in))
    return x, x.T @ x


def test_keep_count_rounding():
    assert P.keep_count(10, 0.3) == 7
    assert P.keep_count(7, 0.5) == 3  # 3.5 pruned rounds to 4 (halves to even)
    assert P.keep_count(5, 0.5) == 3  # 2.5 pruned rounds to 2
    assert P.keep_count(8, 0.0) == 8 and P.keep_count(8, 1.0) == 0
    with pytest.raises(SlimjaxError, match="sparsity"):
        P.keep_count(8, 1.5)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_keep_mask_matrix_is_best_k_sparse_approximation(sparsity):
    rng = np.random.default_rng(0)
    w = _tied(rng, (24, 10))
    mask = np.asarray(P.keep_mask(P.magnitude_scores(w), sparsity))
    k = P.keep_count(w.size, sparsity)
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, _top_k_mask(np.abs(w).reshape(-1), k, 0).reshape(w.shape))
    # min ||W - W'|| s.t. ||W'||_0 <= k drops the n - k smallest magnitudes.
    residual = np.sum((w.astype(np.float64) * ~mask) ** 2)
    assert residual == pytest.approx(np.sum(np.sort(w.reshape(-1).astype(np.float64) ** 2)[:w.size - k]))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_keep_mask_per_output(sparsity):
    rng = np.random.default_rng(1)
    scores = np.abs(_tied(rng, (30, 7)))
    mask = np.asarray(P.keep_mask(scores, sparsity, per="output"))
    k = P.keep_count(30, sparsity)
    assert (mask.sum(axis=0) == k).all()
    np.testing.assert_array_equal(mask, _top_k_mask(scores, k, axis=0))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_keep_mask_n_of_m(nm):
    n, m = nm
    rng = np.random.default_rng(2)
    scores = np.abs(_tied(rng, (32, 6), levels=3))
    mask = np.asarray(P.keep_mask(scores, 0.9, nm=nm))  # sparsity is ignored under nm
    groups = mask.reshape(32 // m, m, 6)
    assert (groups.sum(axis=1) == n).all()
    np.testing.assert_array_equal(groups, _top_k_mask(scores.reshape(32 // m, m, 6), n, axis=1))


def test_keep_mask_bad_input():
    with pytest.raises(SlimjaxError, match="not a multiple of M=4"):
        P.keep_mask(jnp.ones((10, 3)), 0.5, nm=(2, 4))
    with pytest.raises(SlimjaxError, match="0 < N <= M"):
        P.keep_mask(jnp.ones((8, 3)), 0.5, nm=(5, 4))
    with pytest.raises(SlimjaxError, match="per='row'"):
        P.keep_mask(jnp.ones((8, 3)), 0.5, per="row")


def test_keep_mask_jit_vmap_over_layers():
    rng = np.random.default_rng(3)
    stacked = np.abs(rng.standard_normal((3, 16, 8))).astype(np.float32)
    masks = jax.jit(jax.vmap(functools.partial(P.keep_mask, sparsity=0.5, per="output")))(stacked)
    for layer, mask in zip(stacked, np.asarray(masks)):
        np.testing.assert_array_equal(mask, _top_k_mask(layer, 8, axis=0))


def test_global_keep_masks():
    rng = np.random.default_rng(4)
    scores = [np.abs(_tied(rng, shape, levels=5)) for shape in [(8, 4), (16, 12), (4, 4)]]
    masks = [np.asarray(m) for m in P.global_keep_masks(scores, 0.6)]
    total = sum(s.size for s in scores)
    assert sum(m.sum() for m in masks) == P.keep_count(total, 0.6)
    kept = np.concatenate([s[m] for s, m in zip(scores, masks)])
    dropped = np.concatenate([s[~m] for s, m in zip(scores, masks)])
    assert kept.min() >= dropped.max()
    flat = np.concatenate([s.reshape(-1) for s in scores])
    np.testing.assert_array_equal(np.concatenate([m.reshape(-1) for m in masks]),
                                  _top_k_mask(flat, P.keep_count(total, 0.6), 0))
    assert [m.shape for m in masks] == [s.shape for s in scores]


def test_wanda_scores():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    x = rng.standard_normal((40, 12))
    sq_norm = np.sum(x ** 2, axis=0)
    expected = np.abs(w.astype(np.float64)) * np.linalg.norm(x, axis=0)[:, None]
    np.testing.assert_allclose(np.asarray(P.wanda_scores(w, sq_norm)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(P.magnitude_scores(w)), np.abs(w))


@pytest.mark.parametrize("d_in,d_out,sparsity,nm,block", [
    (96, 48, 0.5, None, 32),     # three blocks
    (100, 32, 0.6, None, 32),    # a short last block, uneven per-block shares
    (128, 64, 0.0, (2, 4), 128),
    (64, 32, 0.0, (4, 8), 20),   # block rounded down to 16
])
def test_sparsegpt_pattern_and_error(d_in, d_out, sparsity, nm, block):
    rng = np.random.default_rng(6)
    _, gram = _calibration(rng, d_in)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    w_new, mask = jax.jit(functools.partial(P.sparsegpt, sparsity=sparsity, nm=nm, block=block))(w, gram)
    w_new, mask = np.asarray(w_new), np.asarray(mask)
    if nm:
        assert (mask.reshape(d_in // nm[1], nm[1], d_out).sum(axis=1) == nm[0]).all()
    else:
        assert (mask.sum(axis=0) == P.keep_count(d_in, sparsity)).all()
    assert (w_new[~mask] == 0).all()

    ours = _error(w, w_new, gram)
    assert ours == pytest.approx(float(P.reconstruction_error(w, w_new, gram)), rel=1e-4)
    per = "output"
    magnitude = w * np.asarray(P.keep_mask(P.magnitude_scores(w), sparsity, per=per, nm=nm))
    wanda = w * np.asarray(P.keep_mask(P.wanda_scores(w, np.diag(gram)), sparsity, per=per, nm=nm))
    assert ours < _error(w, magnitude, gram)
    assert ours < _error(w, wanda, gram)
    if not nm:  # also below magnitude pruning with a free per-matrix pattern
        assert ours < _error(w, w * np.asarray(P.keep_mask(P.magnitude_scores(w), sparsity)), gram)

    ref_w, ref_mask = _ref_sparsegpt(w, gram, sparsity, nm, block)
    assert (mask == ref_mask).mean() >= 0.99
    assert ours == pytest.approx(_error(w, ref_w, gram), rel=1e-3)


def test_sparsegpt_sparsity_zero_is_identity():
    rng = np.random.default_rng(7)
    _, gram = _calibration(rng, 64)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w_new, mask = P.sparsegpt(w, gram, 0.0, block=16)
    assert np.asarray(mask).all()
    np.testing.assert_allclose(np.asarray(w_new), w, atol=1e-5)


def test_sparsegpt_dead_inputs_vmapped():
    rng = np.random.default_rng(8)
    x, _ = _calibration(rng, 32)
    x[:, [3, 17]] = 0.0  # two inputs never fire
    gram = x.T @ x
    ws = rng.standard_normal((2, 32, 16)).astype(np.float32)
    prune = jax.jit(jax.vmap(functools.partial(P.sparsegpt, sparsity=0.25, block=8), in_axes=(0, None)))
    w_new, mask = (np.asarray(a) for a in prune(ws, gram))
    assert np.isfinite(w_new).all()
    assert not mask[:, [3, 17]].any()  # dead inputs score 0: pruned first
    for layer in range(2):
        ref_w, ref_mask = _ref_sparsegpt(ws[layer], gram, 0.25, block=8)
        np.testing.assert_array_equal(mask[layer], ref_mask)
        np.testing.assert_allclose(w_new[layer], ref_w, atol=2e-4, rtol=2e-4)


def test_cubic_sparsity():
    initial, final, begin, end, every = 0.1, 0.8, 100, 500, 50

    def expected(step):
        if step < begin:
            return initial
        if step >= end:
            return final
        t = begin + (step - begin) // every * every
        return final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3

    schedule = jax.jit(functools.partial(P.cubic_sparsity, initial=initial, final=final, begin=begin,
                                         end=end, every=every))
    for step in [0, 99, 100, 101, 149, 150, 275, 300, 499, 500, 10_000]:
        assert float(schedule(step)) == pytest.approx(expected(step), abs=1e-6), step
    assert float(P.cubic_sparsity(320, 0.0, 0.9, 0, 1000, 1)) == pytest.approx(0.9 * (1 - 0.68 ** 3), abs=1e-6)
    with pytest.raises(SlimjaxError, match="begin < end"):
        P.cubic_sparsity(0, 0.0, 0.5, 10, 10, 1)


def test_cosine_fraction():
    fraction = jax.jit(functools.partial(P.cosine_fraction, alpha=0.3, end=1000))
    for step in [0, 1, 250, 500, 999, 1000, 5000]:
        expected = 0.3 / 2 * (1 + math.cos(math.pi * step / 1000)) if step < 1000 else 0.0
        assert float(fraction(step)) == pytest.approx(expected, abs=1e-6), step


def test_erk_densities():
    shapes = [(8, 8), (64, 32), (512, 256), (256, 1024), (3, 3, 16, 32)]
    sizes = [math.prod(s) for s in shapes]
    for density in [0.05, 0.2, 0.5, 0.9]:
        densities = P.erk_densities(shapes, density)
        assert all(0.0 <= d <= 1.0 for d in densities)
        assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(density * sum(sizes), abs=1.0)
        matrices = sorted(range(4), key=lambda i: sizes[i])
        assert all(densities[a] >= densities[b] for a, b in itertools.pairwise(matrices))
        free = [i for i, d in enumerate(densities) if d < 1.0]  # uncapped layers follow the ERK ratio
        for i in free:
            ratio = densities[i] / (sum(shapes[i]) / sizes[i])
            assert ratio == pytest.approx(densities[free[0]] / (sum(shapes[free[0]]) / sizes[free[0]]))
    assert P.erk_densities(shapes, 0.05)[0] == 1.0  # the 8x8 layer is capped at low density already
    assert P.erk_densities(shapes, 1.0) == [1.0] * 5
    assert P.erk_densities(shapes, 0.0) == [0.0] * 5


def test_drop_and_grow():
    rng = np.random.default_rng(9)
    shape = (24, 16)
    mask = np.asarray(P.keep_mask(rng.random(shape), 0.7))
    n_active = int(mask.sum())
    update = jax.jit(P.drop_and_grow)
    for i in range(25):
        w = _tied(rng, shape, levels=6) * mask  # ties among magnitudes
        grow_scores = np.abs(_tied(rng, shape, levels=6))
        fraction = float(rng.uniform(0.0, 0.5))
        new = np.asarray(update(w, mask, grow_scores, jnp.float32(fraction)))
        k = math.floor(np.float32(fraction) * np.float32(n_active))
        assert new.sum() == n_active
        dropped, grown = mask & ~new, new & ~mask
        assert dropped.sum() == grown.sum() == k
        # dropped: the k active of smallest |w| (lower index first among ties)
        drop_key = np.where(mask, np.abs(w), np.inf).reshape(-1)
        np.testing.assert_array_equal(dropped.reshape(-1), mask.reshape(-1) & _top_k_mask(-drop_key, k, 0))
        # grown: the k highest-scoring positions among those inactive before the update
        grow_key = np.where(mask, -np.inf, grow_scores).reshape(-1)
        np.testing.assert_array_equal(grown.reshape(-1), _top_k_mask(grow_key, k, 0))
        mask = new


def test_drop_and_grow_caps_at_free_positions():
    mask = np.ones((4, 4), bool)
    mask[0, :2] = False  # 14 active, 2 free: fraction 0.5 wants 7
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    new = np.asarray(P.drop_and_grow(w, mask, np.ones((4, 4)), 0.5))
    assert new.sum() == 14
    assert new[0, :2].all() and not new[0, 2:].any()  # the two smallest actives make way
