"""The key/value cache used by ``Decoder.prefill`` and ``Decoder.decode``.

Each layer has its own key array ``[batch, kv_heads, max_len, head_dim]`` and value array
``[batch, kv_heads, head_dim, max_len]`` with logical axes ``CACHE_AXES`` / ``V_CACHE_AXES``, so
``constrain`` shards them like activations (batch over data/fsdp, kv heads over tensor).
Grouped-query models store ``kv_heads``, not ``heads``.

The layouts are chosen for the decode step, measured on CPU with XLA: heads come before length
because the attention matmuls take batch and head as batch dimensions; keys keep head_dim minor
(it is contracted with the query), values keep length minor (it is contracted with the
probabilities: with head_dim minor XLA fell back to a slower matmul, 30 -> 21 ms per batch-8
step at 1,024 cached tokens). Layers are separate arrays rather than one stacked array because
XLA copies a slice of a stacked array before a matmul reads it: with a stacked, length-major
cache every layer's whole cache was copied (and transposed) at every step. Now a step writes
only the new entries, in place.

All rows write the same slot at each step (``index``); a row's own positions are carried
separately, so prompts of different lengths are left-padded and the padding slots are masked by
``segment_ids`` (0 marks an empty or padding slot).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slimjax.config import ModelConfig
from slimjax.models import dense_attention
from slimjax.sharding import constrain

CACHE_AXES = ("batch", "act_kv_heads", "length", "head_dim")
V_CACHE_AXES = ("batch", "act_kv_heads", "head_dim", "length")
SLOT_AXES = ("batch", "length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys, values and slot bookkeeping for all layers; a pytree, so it can be a loop carry."""

    k: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, max_len, head_dim]
    v: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, head_dim, max_len]
    segment_ids: jax.Array  # [batch, max_len] int32: 1 for a written token, 0 for empty/padding
    index: jax.Array  # scalar int32: the slot the next token(s) go to

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "KVCache":
        """An empty cache (zeros) for ``batch`` rows of up to ``max_len`` tokens."""
        k_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        v_shape = (batch, cfg.n_kv_heads, cfg.head_dim, max_len)
        k = lambda: constrain(jnp.zeros(k_shape, dtype), CACHE_AXES)  # noqa: E731
        v = lambda: constrain(jnp.zeros(v_shape, dtype), V_CACHE_AXES)  # noqa: E731
        seg = constrain(jnp.zeros((batch, max_len), jnp.int32), SLOT_AXES)
        return cls(k=tuple(k() for _ in range(cfg.n_layers)), v=tuple(v() for _ in range(cfg.n_layers)),
                   segment_ids=seg, index=jnp.zeros((), jnp.int32))

    def claim(self, segment_ids: jax.Array) -> "KVCache":
        """Marks the next ``segment_ids.shape[1]`` slots with the new tokens' segments."""
        seg = jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), (0, self.index))
        return dataclasses.replace(self, segment_ids=constrain(seg, SLOT_AXES))

    def layer(self, i: int) -> "LayerCache":
        """The view attention layer ``i`` reads and writes."""
        return LayerCache(k=self.k[i], v=self.v[i], index=self.index, segment_ids=self.segment_ids)

    def updated(self, layers: list["LayerCache"], n_new: int) -> "KVCache":
        """The cache after every layer has written its ``n_new`` tokens."""
        return dataclasses.replace(self, k=tuple(lc.k for lc in layers), v=tuple(lc.v for lc in layers),
                                   index=self.index + n_new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values plus the slot bookkeeping its mask needs."""

    k: jax.Array  # [batch, kv_heads, max_len, head_dim]
    v: jax.Array  # [batch, kv_heads, head_dim, max_len]
    index: jax.Array  # scalar int32
    segment_ids: jax.Array  # [batch, max_len], already including the new tokens

    def update(self, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Writes ``[batch, new, kv_heads, head_dim]`` keys/values at ``index`` (in place in a loop
        carry); returns the updated view."""
        k_new = jnp.transpose(k_new, (0, 2, 1, 3)).astype(self.k.dtype)
        v_new = jnp.transpose(v_new, (0, 2, 3, 1)).astype(self.v.dtype)
        k = constrain(jax.lax.dynamic_update_slice(self.k, k_new, (0, 0, self.index, 0)), CACHE_AXES)
        v = constrain(jax.lax.dynamic_update_slice(self.v, v_new, (0, 0, 0, self.index)), V_CACHE_AXES)
        return dataclasses.replace(self, k=k, v=v)

    def mask(self, query_segments: jax.Array) -> jax.Array:
        """``[batch, new, max_len]``: a query sees written slots of its own segment up to itself."""
        n_new = query_segments.shape[1]
        q_slot = self.index + jnp.arange(n_new)
        k_slot = jnp.arange(self.segment_ids.shape[1])
        causal = k_slot[None, :] <= q_slot[:, None]
        same = query_segments[:, :, None] == self.segment_ids[:, None, :]
        return same & causal[None]

    def attend(self, q: jax.Array, query_segments: jax.Array) -> jax.Array:
        """Queries ``[batch, new, heads, head_dim]`` attending to this layer's written slots (after
        :meth:`update`): ``[batch, new, heads, head_dim]``.

        The same arithmetic as ``jax.nn.dot_product_attention``'s XLA path (query heads grouped
        ``[kv_heads, group]``, logits and softmax in float32, masked logits at a large negative
        value), but the contractions read the stored layouts directly: transposed to the kernel's
        ``[batch, length, heads, head_dim]``, the value cache was copied whole at every step.
        """
        b, n, h, hd = q.shape
        kv = self.k.shape[1]
        allowed = self.mask(query_segments)[:, None, None]  # [batch, 1, 1, new, max_len]
        out = dense_attention.softmax_attention(q.reshape(b, n, kv, h // kv, hd), self.k, self.v, allowed,
                                                "bnkgd,bktd->bkgnt", "bkgnt,bkdt->bnkgd")
        return out.reshape(b, n, h, hd).astype(q.dtype)
