"""The bidirectional encoder (BERT): token + learned position + token-type embeddings, the
decoder's blocks without the causal mask, a pooler, a tied MLM head and a sentence-pair head.

The blocks, attention, MLP, norms and the scan/remat runner are the decoder's (``Block`` with
``causal=False`` and, for BERT, ``post_norm=True``); only the embeddings and the heads are the
encoder's own. Parameter names follow Hugging Face's ``BertForPreTraining`` closely so the
mapping in ``slimjax.interop.bert`` stays a table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import ModelConfig
from slimjax.models import layers
from slimjax.models.decoder import ACTIVATIONS, Block, compute_dtype, run_blocks, stack_blocks
from slimjax.sharding import constrain

# Classes of the sentence-pair head: 0 = B follows A (NSP) / in order (SOP), 1 = it does not.
PAIR_CLASSES = 2


class MlmHead(nnx.Module):
    """BERT's ``cls.predictions``: dense -> activation -> LayerNorm, then the tied embedding table
    plus a per-token bias."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        self.dense = layers.Dense((d,), (d,), ("embed",), ("embed_out",), use_bias=True, std=cfg.init_std,
                                  dtype=dtype, rngs=rngs)
        self.norm = layers.Norm(d, kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype)
        self.bias = layers.const_param((cfg.vocab_size,), ("vocab",), 0.0)
        self.activation = ACTIVATIONS[cfg.mlp]  # BERT's hidden_act, the MLP's too

    def __call__(self, x: jax.Array, embed: layers.Embed) -> jax.Array:
        h = self.norm(self.activation(self.dense(x)))
        return embed.attend(h) + self.bias[...].astype(h.dtype)


class Encoder(nnx.Module):
    """Token ids (+ token types) -> per-token hidden states, MLM logits, pooled output, pair logits.

    Logical axis names only; never a mesh. ``segment_ids`` both mask padding (0) and keep rows
    packed with several examples apart, as in the decoder.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        self.cfg = cfg
        self.dtype = compute_dtype(cfg.dtype) if dtype is None else dtype
        d, std = cfg.d_model, cfg.init_std
        self.embed = layers.Embed(cfg.vocab_size, d, std=std, dtype=self.dtype, rngs=rngs)
        self.pos_embed = layers.normal_param(rngs, (cfg.max_seq_len, d), ("positions", "embed"), std)
        self.type_embed = layers.normal_param(rngs, (cfg.type_vocab_size, d), ("types", "embed"), std)
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=self.dtype)
        self.embed_norm = layers.Norm(d, **norm)
        post = cfg.norm_position == "post"
        self.blocks = stack_blocks(cfg, rngs, lambda r: Block(cfg, self.dtype, r, causal=False, post_norm=post))
        # Post-norm blocks end normalised; pre-norm ones need a last norm (as the decoder's).
        self.final_norm = None if post else layers.Norm(d, **norm)
        self.mlm = MlmHead(cfg, self.dtype, rngs)
        self.pooler = layers.Dense((d,), (d,), ("embed",), ("embed_out",), use_bias=True, std=std,
                                   dtype=self.dtype, rngs=rngs)
        self.nsp = layers.Dense((d,), (PAIR_CLASSES,), ("embed_out",), ("classes",), use_bias=True, std=std,
                                dtype=self.dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(MLM logits ``[batch, length, vocab]``, pair logits ``[batch, 2]``)."""
        h = self.features(tokens, token_types, positions, segment_ids)
        return self.head(h), self.pair_logits(h)

    def features(self, tokens: jax.Array, token_types: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Per-token hidden states ``[batch, length, d_model]`` (BERT's ``last_hidden_state``).

        ``token_types`` (0 = sentence A, 1 = B) default to 0, ``positions`` to 0.. per row and
        ``segment_ids`` to one unpacked example per row (0 marks padding).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        x = (self.embed(tokens) + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
             + jnp.take(self.type_embed[...], token_types, axis=0).astype(self.dtype))
        x = constrain(self.embed_norm(x), ("batch", "act_length", "act_embed"))
        x = run_blocks(self.blocks, self.cfg, x, positions, segment_ids)
        return x if self.final_norm is None else self.final_norm(x)

    def head(self, x: jax.Array) -> jax.Array:
        """Hidden states -> MLM logits over the vocabulary (through the tied embedding table)."""
        return constrain(self.mlm(x, self.embed), ("batch", "act_length", "act_vocab"))

    def pooled(self, x: jax.Array) -> jax.Array:
        """BERT's pooler: ``tanh(dense(h[:, 0]))``, the [CLS] position's summary ``[batch, d_model]``."""
        return jnp.tanh(self.pooler(x[:, 0]))

    def pair_logits(self, x: jax.Array) -> jax.Array:
        """Hidden states -> next-sentence / sentence-order logits ``[batch, 2]`` from the pooled output."""
        return self.nsp(self.pooled(x))
