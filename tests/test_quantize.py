"""Quantization: RTN error bounds, exact packing, GPTQ against RTN, the exact bit allocator, the
QAT view's straight-through gradient, and the quantized-storage model (forward, sharding, export)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimjax.errors import SlimjaxError
from slimjax.slim import quantize as Q

RNG = np.random.default_rng(0)


def correlated_inputs(n: int, d_in: int, rank: int, seed: int = 0) -> np.ndarray:
    """Calibration inputs dominated by a few directions (as real activations are)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_in)) + 0.1 * rng.standard_normal((n, d_in))


def reference_dequantize(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Float64 NumPy RTN of the documented scheme: (dequantized w, scale per element, whether the
    element lies on a rounding tie, where float32 may round the other way)."""
    d_in, d_out = w.shape
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
    best, combo = brute_force(table, costs, budget)
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
