"""slimjax's XLA attention kernel against ``jax.nn.dot_product_attention`` and a float64 NumPy
reference: outputs and gradients, every head grouping, causal or not, masks, unequal lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimjax.models.dense_attention import attend

CASES = {  # (batch, queries, keys, heads, kv_heads, head_dim, causal, mask)
    "gqa-causal-packed": (2, 16, 16, 8, 2, 8, True, True),
    "mha-bidirectional-packed": (2, 16, 16, 4, 4, 8, False, True),
    "gqa-cache-shaped": (3, 5, 12, 6, 3, 8, False, True),
    "mqa-causal": (2, 16, 16, 4, 1, 8, True, False),
}


def _inputs(b, t, s, n, k, d, use_mask, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (b, t, n, d), dtype)
    kk = jax.random.normal(keys[1], (b, s, k, d), dtype)
    v = jax.random.normal(keys[2], (b, s, k, d), dtype)
    if not use_mask:
        return q, kk, v, None
    seg_q, seg_k = jax.random.randint(keys[3], (b, t), 0, 3), jax.random.randint(keys[4], (b, s), 0, 3)
    mask = (seg_q[:, :, None] == seg_k[:, None, :])[:, None].at[..., 0].set(True)  # no query sees nothing
    return q, kk, v, mask


def _numpy_attention(q, k, v, mask, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
    allowed = np.ones((b, 1, t, s), bool) if mask is None else np.asarray(mask)
    if causal:
        allowed = allowed & np.tril(np.ones((t, s), bool))
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("name", CASES)
def test_matches_jax_nn_and_float64(name):
    b, t, s, n, k, d, causal, use_mask = CASES[name]
    q, kk, v, mask = _inputs(b, t, s, n, k, d, use_mask)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,  # noqa: E731
                                                        implementation="xla")
    ours = lambda q, k, v: attend(q, k, v, mask, causal)  # noqa: E731
    np.testing.assert_allclose(ours(q, kk, v), ref(q, kk, v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(q, kk, v), _numpy_attention(q, kk, v, mask, causal), rtol=1e-4, atol=1e-5)
    grads = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, kk, v)  # noqa: E731
    for got, want in zip(grads(ours), grads(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_matches_jax_nn():
    q, kk, v, mask = _inputs(2, 16, 16, 8, 2, 8, True, jnp.bfloat16)
    out = attend(q, kk, v, mask, True)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q, kk, v, mask=mask, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
