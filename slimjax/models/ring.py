"""Ring attention: the per-device kernel of sequence-parallel attention with rotating key/value blocks.

Each device of the ring holds one block of queries and, at first, the keys and values of the same
positions. Over ``ways`` steps every key/value block visits every device (passed to the next one
with ``jax.lax.ppermute``); the device folds each block into flash-attention style running
statistics (the row maximum ``m``, the softmax denominator ``l`` and the unnormalised output), so
no device ever holds more than one block of keys or one ``[queries, block]`` score matrix.

The backward pass is a second trip round the ring (a custom VJP, as in FlashAttention): it keeps
only the inputs, the output and the per-row log-sum-exp from the forward pass, recomputes each
block's probabilities, and sends the key/value gradients along with their block, so after
``ways`` steps each device holds the gradients of its own keys and values.

Which query sees which key is decided by positions and segment ids that travel with the blocks,
never by array index, so the sequence may be reordered (causal load balancing) and rows may hold
several packed documents. Grouped-query heads are handled by grouping the query heads of each
key/value head (``[.., kv_heads, group, ..]``), as ``jax.nn.dot_product_attention`` does.

Call :func:`ring_attention` inside ``shard_map`` over the mesh axes ``axes`` that split the length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Masked scores. Finite, so that (masked - running max) is never inf - inf; masked entries are
# zeroed explicitly anyway, as a block may hide every key from a row.
NEG = -1e30


def visible(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array, causal: bool) -> jax.Array:
    """``[batch, q, k]`` True where a query may attend to a key: the same packed document and, when
    ``causal``, a key position not after the query's (positions restart at 0 in every document).
    A query always sees itself, so no row (padding, segment 0, included) is fully masked."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    if not causal:
        return same
    return same & (k_pos[:, None, :] <= q_pos[:, :, None])


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
    """``[b, t, heads, d]`` -> float32 ``[b, t, kv_heads, group, d]``."""
    b, t, h, d = x.shape
    return x.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d)


def _ungrouped(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    b, t, k, g, d = x.shape
    return x.reshape(b, t, k * g, d).astype(dtype)


def _scores(qg: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled scores ``[b, kv_heads, group, q, k]`` with masked entries at :data:`NEG`."""
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (qg.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None], s, NEG)


def _rotate(axes: tuple[str, ...], ways: int, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Each device's arrays to the next device of the ring."""
    perm = [(i, (i + 1) % ways) for i in range(ways)]
    return tuple(jax.lax.ppermute(x, axes, perm) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                   axes: tuple[str, ...], ways: int, causal: bool) -> jax.Array:
    """Attention of this device's queries ``[b, t, heads, d]`` over the keys/values ``[b, t,
    kv_heads, d]`` of every device on the ring ``axes`` (``ways`` devices); ``positions`` and
    ``segment_ids`` ``[b, t]`` are this device's. Returns ``[b, t, heads, d]`` in ``q``'s dtype."""
    return _forward(q, k, v, positions, segment_ids, axes, ways, causal)[0]


def _forward(q, k, v, positions, segment_ids, axes, ways, causal):
    kv_heads = k.shape[2]
    qg = _grouped(q, kv_heads)

    def fold(carry, block):
        """Folds one key/value block into the running max, denominator and output."""
        m, l, o = carry
        kb, vb, k_pos, k_seg = block
        mask = visible(positions, segment_ids, k_pos, k_seg, causal)
        s = _scores(qg, kb, mask)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        return (m_new, l * correction + p.sum(-1),
                o * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, vb))

    def step(carry, _):
        stats, block = carry
        return (fold(stats, block), _rotate(axes, ways, *block)), None

    b, t, _, g, d = qg.shape
    stats = (jnp.full((b, kv_heads, g, t), NEG, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
             jnp.zeros((b, kv_heads, g, t, d), jnp.float32))
    block = (k.astype(jnp.float32), v.astype(jnp.float32), positions, segment_ids)
    # ways - 1 rotations: the last block is folded in without being passed on.
    (stats, block), _ = jax.lax.scan(step, (stats, block), None, length=ways - 1)
    m, l, o = fold(stats, block)
    out = _ungrouped(jnp.transpose(o / l[..., None], (0, 3, 1, 2, 4)), q.dtype)
    return out, (q, k, v, positions, segment_ids, out, m + jnp.log(l))


def _backward(axes, ways, causal, residuals, d_out):
    q, k, v, positions, segment_ids, out, lse = residuals
    kv_heads = k.shape[2]
    qg, dog = _grouped(q, kv_heads), _grouped(d_out, kv_heads)
    # D_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term.
    delta = jnp.transpose(jnp.sum(dog * _grouped(out, kv_heads), -1), (0, 2, 3, 1))
    scale = q.shape[-1] ** -0.5

    def step(carry, _):
        dq, block, grads = carry
        kb, vb, k_pos, k_seg = block
        dk, dv = grads
        mask = visible(positions, segment_ids, k_pos, k_seg, causal)
        p = jnp.where(mask[:, None, None], jnp.exp(_scores(qg, kb, mask) - lse[..., None]), 0.0)
        dv = dv + jnp.einsum("bkgts,btkgd->bskd", p, dog)
        ds = p * (jnp.einsum("btkgd,bskd->bkgts", dog, vb) - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb)
        dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, qg)
        # The block's gradients travel with it: after `ways` steps they are home. (The block makes
        # the last trip too: one scan of equal steps compiles to less temporary memory than
        # `ways - 1` steps and a final one outside the loop, 87 vs 119 MB at 2,048 positions / 2.)
        return (dq, _rotate(axes, ways, *block), _rotate(axes, ways, dk, dv)), None

    block = (k.astype(jnp.float32), v.astype(jnp.float32), positions, segment_ids)
    grads = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dq, _, (dk, dv)), _ = jax.lax.scan(step, (jnp.zeros(qg.shape, jnp.float32), block, grads), None, length=ways)
    return _ungrouped(dq, q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


ring_attention.defvjp(_forward, _backward)
