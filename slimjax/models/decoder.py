"""The decoder-only language model: GPT-2 and Llama families in one class.

Family differences are config switches (positions, norm, MLP, biases, tied embeddings). Layers
are either a list (unrolled) or one stacked block scanned with ``jax.lax.scan`` (fast compiles
for deep models); both are initialised from the same per-layer keys, so they hold the same
weights. Remat wraps the per-layer function in ``jax.checkpoint`` with the configured policy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import ModelConfig
from slimjax.models import layers, scope, sequence
from slimjax.models.attention import Attention
from slimjax.models.cache import KVCache, LayerCache
from slimjax.sharding import constrain, replicated

# Logical names the model uses on activations (parameters carry theirs as metadata).
ACTIVATION_AXES = ("batch", "length", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    # Keep the outputs of matmuls without batch dims (projections), recompute the cheap rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
    """Resolves model.dtype; "auto" is bfloat16 on accelerators and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16
    return DTYPES[name]


ACTIVATIONS = {"gelu": layers.gelu, "gelu_exact": layers.gelu_exact}


class Mlp(nnx.Module):
    """GELU (GPT-2: tanh approximation; BERT: exact erf) or SwiGLU (Llama) feed-forward block."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        common = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate = layers.Dense((d,), (f,), ("embed",), ("mlp",), std=cfg.init_std, **common)
        self.up = layers.Dense((d,), (f,), ("embed",), ("mlp",), std=cfg.init_std, **common)
        self.down = layers.Dense((f,), (d,), ("mlp",), ("embed",),
                                 std=layers.out_proj_std(cfg.init_std, cfg.n_layers), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = ACTIVATIONS[self.kind](self.up(x))
        return self.down(constrain(h, ("batch", "act_length", "act_mlp")))


class Block(nnx.Module):
    """Residual block. Pre-norm (``post_norm`` False): x + attn(norm(x)), then + mlp(norm(.)).
    Post-norm (BERT): norm(x + attn(x)), then norm(. + mlp(.)); the norms keep their names."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, *, causal: bool = True,
                 post_norm: bool = False):
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype)
        self.attn_norm = layers.Norm(cfg.d_model, **norm)
        self.attn = Attention(cfg, dtype, rngs, causal)
        self.mlp_norm = layers.Norm(cfg.d_model, **norm)
        self.mlp = Mlp(cfg, dtype, rngs)
        self.post_norm = post_norm

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, positions, segment_ids))
            x = constrain(x, ("batch", "act_length", "act_embed"))
            return constrain(self.mlp_norm(x + self.mlp(x)), ("batch", "act_length", "act_embed"))
        attn = self.attn(self.attn_norm(x), positions, segment_ids, cache)
        if cache is not None:
            attn, cache = attn
        x = constrain(x + attn, ("batch", "act_length", "act_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        x = constrain(x, ("batch", "act_length", "act_embed"))
        return x if cache is None else (x, cache)


def stack_blocks(cfg: ModelConfig, rngs: nnx.Rngs, make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``cfg.n_layers`` blocks made by ``make(rngs)``: one stacked module (its parameters gain a
    leading "layers" axis) when ``cfg.scan_layers``, else a list. One key per layer, so the
    scanned and unrolled layouts get identical weights."""
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    one = lambda key: make(nnx.Rngs(params=key))  # noqa: E731
    if cfg.scan_layers:
        return nnx.vmap(one, in_axes=0, out_axes=0,
                        transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})(keys)
    return nnx.List([one(keys[i]) for i in range(cfg.n_layers)])


def run_blocks(blocks: nnx.Module, cfg: ModelConfig, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """``x`` through the blocks of :func:`stack_blocks`: scanned (or, stacked, through the active
    :func:`slimjax.models.scope.layer_runner`, e.g. a pipeline) or unrolled, with ``cfg.remat``."""
    # Each layer runs as a pure function of (its state, x, per-row inputs) so scan, remat and a
    # layer runner (pipeline) see plain arrays.
    def one_layer(graphdef, state, h, index, rows):
        with scope.layer_scope(index):  # each layer draws its own dropout masks
            return nnx.merge(graphdef, state)(h, *rows)

    if cfg.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))
    rows = (positions, segment_ids)
    if cfg.scan_layers:
        graphdef, state = nnx.split(blocks)
        if (runner := scope.active_runner()) is not None:
            return runner(functools.partial(one_layer, graphdef), state, x, rows)
        index = jnp.arange(cfg.n_layers)
        # unroll > 1 puts several layers in each loop iteration (the parameters stay stacked);
        # at n_layers the loop is gone and XLA slices weights and saved activations statically.
        x, _ = jax.lax.scan(lambda h, si: (one_layer(graphdef, si[0], h, si[1], rows), None), x, (state, index),
                            unroll=min(cfg.scan_unroll, cfg.n_layers))
        return x
    for i, block in enumerate(blocks):
        graphdef, state = nnx.split(block)
        x = one_layer(graphdef, state, x, i, rows)
    return x


class Decoder(nnx.Module):
    """Token ids -> next-token logits. Logical axis names only; never a mesh."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None):
        self.cfg = cfg
        self.dtype = compute_dtype(cfg.dtype) if dtype is None else dtype
        self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=self.dtype, rngs=rngs)
        if cfg.positions == "learned":
            self.pos_embed = layers.normal_param(rngs, (cfg.max_seq_len, cfg.d_model),
                                                 ("positions", "embed"), cfg.init_std)
        else:
            self.pos_embed = None
        self.blocks = stack_blocks(cfg, rngs, lambda r: Block(cfg, self.dtype, r))
        self.final_norm = layers.Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps,
                                      use_bias=cfg.use_bias, dtype=self.dtype)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = layers.Dense((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",),
                                        use_bias=False, std=cfg.init_std, dtype=self.dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens ``[batch, length]`` -> logits ``[batch, length, vocab]`` in the compute dtype.

        ``positions`` restart at 0 in each packed document; ``segment_ids`` tell documents
        apart (0 marks padding). Both default to one unpacked sequence per row.
        """
        return self.head(self.features(tokens, positions, segment_ids))

    def features(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """The last hidden state ``[batch, length, d_model]`` (after the final norm): what
        :meth:`head` turns into logits and what distillation matches between models."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        layout = sequence.active_layout()
        balanced = layout is not None and layout.rules.sequence_balance
        if balanced:  # equal causal work on every sequence shard; the order is restored below
            tokens, positions, segment_ids = sequence.balance(layout, tokens, positions, segment_ids)
        x = self.final_norm(self._run_blocks(self._embed(tokens, positions), positions, segment_ids))
        return sequence.restore(layout, x, ("batch", "act_length", "act_embed")) if balanced else x

    def head(self, x: jax.Array) -> jax.Array:
        """Normalised hidden states -> logits over the vocabulary (the tied table or ``lm_head``)."""
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return constrain(logits, ("batch", "act_length", "act_vocab"))

    def prefill(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs a prompt block ``[batch, length]`` through the model, writing its keys and values
        into ``cache`` at the cache's index; returns the last position's logits ``[batch, vocab]``.

        Prompts of different lengths are left-padded: padding has segment id 0 (it attends only
        to padding and nothing real attends to it) and the real tokens carry their own positions
        (0 at each row's first real token), so every row sees exactly its own prompt.
        """
        with replicated("act_length"):  # the cached path keeps the length whole (see _run_blocks_cached)
            x, cache = self._run_blocks(self._embed(tokens, positions), positions, segment_ids, cache)
            return self._logits(x[:, -1:])[:, 0], cache

    def decode(self, token: jax.Array, position: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step: ``token`` and ``position`` ``[batch]`` -> next-token logits ``[batch, vocab]``
        and the cache holding this token's keys and values."""
        tokens, positions = token[:, None], position[:, None]
        with replicated("act_length"):
            x, cache = self._run_blocks(self._embed(tokens, positions), positions, jnp.ones_like(tokens), cache)
            return self._logits(x)[:, 0], cache

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "act_length", "act_embed"))

    def _logits(self, x: jax.Array) -> jax.Array:
        return self.head(self.final_norm(x))

    def _run_blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                    cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
        if cache is not None:
            return self._run_blocks_cached(x, positions, segment_ids, cache)

        return run_blocks(self.blocks, self.cfg, x, positions, segment_ids)

    def _run_blocks_cached(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                           cache: KVCache) -> tuple[jax.Array, KVCache]:
        # The same blocks as training, unrolled even when stacked for scanning: a scan slices each
        # layer's weights with a dynamic index, which XLA materialises as a copy of every weight
        # at every decode step; a constant slice is a view. The length is not split over the
        # sequence axis here (a decode step has one token); the cache is split like the batch.
        cache = cache.claim(segment_ids)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            layers = [(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(self.cfg.n_layers)]
        else:
            layers = [nnx.split(block) for block in self.blocks]
        written = []
        for i, (graphdef, state) in enumerate(layers):
            with scope.layer_scope(i):
                x, lc = nnx.merge(graphdef, state)(x, positions, segment_ids, cache.layer(i))
            written.append(lc)
        return x, cache.updated(written, segment_ids.shape[1])
