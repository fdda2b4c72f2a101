"""Self-attention (causal for the decoder, bidirectional for the encoder) with grouped-query heads,
RoPE and packed-segment isolation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import ModelConfig
from slimjax.models import dense_attention, layers, sequence
from slimjax.models.cache import LayerCache
from slimjax.sharding import constrain


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """``[batch, 1, q, k]`` True where query and key belong to the same packed document.

    Alone (the encoder) or combined with ``is_causal`` (the decoder) this keeps packed documents
    from attending across their boundary. Padding (segment 0) attends only to padding, so no row
    is fully masked and no real token sees padding.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same[:, None, :, :]


def attention_impl(name: str, dtype: jnp.dtype) -> str | None:
    """Resolves the config's backend; "auto" takes cuDNN flash attention on GPU in 16-bit."""
    if name != "auto":
        return name
    if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


class Attention(nnx.Module):
    """Multi-head / grouped-query attention (``dense_attention.attend`` for "xla", cuDNN through
    ``jax.nn.dot_product_attention``); ``causal``
    False (the encoder) lets every token see its whole segment."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, causal: bool = True):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        common = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.wq = layers.Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), std=cfg.init_std, **common)
        self.wk = layers.Dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), std=cfg.init_std, **common)
        self.wv = layers.Dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), std=cfg.init_std, **common)
        self.wo = layers.Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",),
                               std=layers.out_proj_std(cfg.init_std, cfg.n_layers), **common)
        self.rope_theta = cfg.rope_theta if cfg.positions == "rope" else None
        self.rope_scaling = (cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                             cfg.rope_high_freq_factor, cfg.rope_original_max_len)
        self.impl = attention_impl(cfg.attention, dtype)
        self.causal = causal

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """Self-attention over ``x``; with ``cache``, over the cached tokens plus ``x``.

        Without a cache the mask is causal within each packed segment. With one, the new keys and
        values are written at the cache's index first and the queries attend to every written
        slot of their own segment up to themselves (``LayerCache.attend``: the same arithmetic as
        the kernel, on the cache's own layouts); the result and the updated cache come back as a
        pair. The projections and RoPE are the same in both cases.
        """
        q = constrain(self.wq(x), ("batch", "act_length", "act_heads", None))
        k = constrain(self.wk(x), ("batch", "act_length", "act_kv_heads", None))
        v = constrain(self.wv(x), ("batch", "act_length", "act_kv_heads", None))
        if self.rope_theta is not None:
            q = layers.rope(q, positions, self.rope_theta, self.rope_scaling)
            k = layers.rope(k, positions, self.rope_theta, self.rope_scaling)
        if cache is not None:
            cache = cache.update(k, v)
            return self.wo(constrain(cache.attend(q, segment_ids), ("batch", "act_length", "act_heads", None))), cache
        if (layout := sequence.active_layout()) is not None:
            # The length is split over devices: masks from positions (the order may be balanced).
            out = sequence.attention(q, k, v, positions, segment_ids, self.causal, layout)
            return self.wo(constrain(out, ("batch", "act_length", "act_heads", None)))
        mask = segment_mask(segment_ids)
        if self.impl == "xla":
            out = dense_attention.attend(q, k, v, mask, self.causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.impl)
        return self.wo(constrain(out, ("batch", "act_length", "act_heads", None)))
