"""Softmax attention written out in XLA ops: the kernel behind ``model.attention = "xla"``.

Same numerics as ``jax.nn.dot_product_attention(implementation="xla")`` (logits accumulated in
float32, masked with -0.7 x float32's largest value, softmax in float32, the probabilities cast to the
value dtype for the second product), with the operands laid out for plain batched GEMMs: heads
move ahead of the length once (``[b, kv_heads, group, t, d]``) and keys are stored transposed
(``[b, kv_heads, d, s]``), so neither product nor its gradients contracts over a non-minor dim.
On CPU, ``jax.nn``'s ``BTNH,BSNH->BNTS`` einsums made XLA transpose the probabilities and their
gradients through memory in the backward pass (the costliest attention ops of a ``llama_20m``
step); grouped-query heads share their key/value head through a broadcast group dim, not a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           causal: bool = False) -> jax.Array:
    """Attention of ``q [b, t, heads, d]`` over ``k, v [b, s, kv_heads, d]`` -> ``[b, t, heads, d]``.

    ``mask`` (bool, broadcastable to ``[b, 1, t, s]``) says which keys each query may see;
    ``causal`` also hides keys after the query (query i sees keys ``<= i``, as in ``jax.nn``).
    Heads are grouped as ``jax.nn.dot_product_attention`` groups them: query head ``j`` reads
    key/value head ``j // (heads // kv_heads)``.
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    qt = jnp.transpose(q.reshape(b, t, kv, n // kv, d), (0, 2, 3, 1, 4))  # [b, kv, group, t, d]
    kt = jnp.transpose(k, (0, 2, 3, 1))  # [b, kv, d, s]
    vt = jnp.transpose(v, (0, 2, 1, 3))  # [b, kv, s, d]
    allowed = None if mask is None else jnp.broadcast_to(mask, (b, 1, t, s))[:, :, None]  # [b, 1, 1, t, s]
    if causal:
        tri = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
        allowed = tri if allowed is None else allowed & tri
    out = softmax_attention(qt, kt, vt, allowed, "bkgtd,bkds->bkgts", "bkgts,bksd->bkgtd")
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, d)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None,
                      logits_eq: str, out_eq: str) -> jax.Array:
    """``softmax(q k / sqrt(d)) v`` with the operands in whatever layouts the two einsums name
    (``logits_eq``: q, k -> logits with the keys last; ``out_eq``: probabilities, v -> out).

    ``q``'s last dim is the head width; ``allowed`` (bool, broadcastable to the logits) hides
    keys. Logits accumulate in float32 at least, the softmax runs in float32 and the
    probabilities are cast to ``v``'s dtype, as in ``jax.nn.dot_product_attention``'s XLA path.
    """
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum(logits_eq, q, k.astype(q.dtype), preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(q.shape[-1] ** -0.5, logits_dtype)
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum(out_eq, probs, v)
