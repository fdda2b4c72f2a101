"""The key/value cache used by ``Decoder.prefill`` and ``Decoder.decode``.

One cache holds every layer: keys and values are ``[layers, batch, max_len, kv_heads, head_dim]``
with logical axes ``CACHE_AXES``, so ``constrain`` shards them like activations (batch over
data/fsdp, kv heads over tensor). Grouped-query models store ``kv_heads``, not ``heads``.

All rows write the same slot at each step (``index``); a row's own positions are carried
separately, so prompts of different lengths are left-padded and the padding slots are masked by
``segment_ids`` (0 marks an empty or padding slot). A layer writes only its new entries, with one
``dynamic_update_slice`` into the full array, so inside a compiled loop XLA updates the cache in
place instead of copying it every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slimjax.config import ModelConfig
from slimjax.sharding import constrain

CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", "head_dim")
SLOT_AXES = ("batch", "length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys, values and slot bookkeeping for all layers; a pytree, so it can be a loop carry."""

    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    segment_ids: jax.Array  # [batch, max_len] int32: 1 for a written token, 0 for empty/padding
    index: jax.Array  # scalar int32: the slot the next token(s) go to

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "KVCache":
        """An empty cache (zeros) for ``batch`` rows of up to ``max_len`` tokens."""
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        k = constrain(jnp.zeros(shape, dtype), CACHE_AXES)
        v = constrain(jnp.zeros(shape, dtype), CACHE_AXES)
        seg = constrain(jnp.zeros((batch, max_len), jnp.int32), SLOT_AXES)
        return cls(k=k, v=v, segment_ids=seg, index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def claim(self, segment_ids: jax.Array) -> "KVCache":
        """Marks the next ``segment_ids.shape[1]`` slots with the new tokens' segments."""
        seg = jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), (0, self.index))
        return dataclasses.replace(self, segment_ids=constrain(seg, SLOT_AXES))

    def advance(self, n: int) -> "KVCache":
        """The cache after ``n`` new tokens have been written by every layer."""
        return dataclasses.replace(self, index=self.index + n)

    def layer(self, i: jax.Array | int) -> "LayerCache":
        """The view one attention layer reads and writes."""
        return LayerCache(k=self.k, v=self.v, layer=jnp.asarray(i, jnp.int32), index=self.index,
                          segment_ids=self.segment_ids)

    def with_kv(self, k: jax.Array, v: jax.Array) -> "KVCache":
        return dataclasses.replace(self, k=k, v=v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's window onto the shared cache arrays (which it updates in place)."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array  # scalar int32
    index: jax.Array  # scalar int32
    segment_ids: jax.Array  # [batch, max_len], already including the new tokens

    def update(self, k_new: jax.Array, v_new: jax.Array) -> tuple["LayerCache", jax.Array, jax.Array]:
        """Writes ``[batch, new, kv_heads, head_dim]`` keys/values at ``index``; returns the
        updated view and this layer's full keys and values ``[batch, max_len, kv_heads, head_dim]``."""
        start = (self.layer, 0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k, k_new[None].astype(self.k.dtype), start)
        v = jax.lax.dynamic_update_slice(self.v, v_new[None].astype(self.v.dtype), start)
        k, v = constrain(k, CACHE_AXES), constrain(v, CACHE_AXES)
        k_l = constrain(jax.lax.dynamic_index_in_dim(k, self.layer, 0, keepdims=False), CACHE_AXES[1:])
        v_l = constrain(jax.lax.dynamic_index_in_dim(v, self.layer, 0, keepdims=False), CACHE_AXES[1:])
        return dataclasses.replace(self, k=k, v=v), k_l, v_l

    def with_kv(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        return dataclasses.replace(self, k=k, v=v)

    def mask(self, query_segments: jax.Array) -> jax.Array:
        """``[batch, 1, new, max_len]``: a query sees written slots of its own segment up to itself."""
        n_new = query_segments.shape[1]
        q_slot = self.index + jnp.arange(n_new)
        k_slot = jnp.arange(self.segment_ids.shape[1])
        causal = k_slot[None, :] <= q_slot[:, None]
        same = query_segments[:, :, None] == self.segment_ids[:, None, :]
        return (same & causal[None])[:, None]
