"""LoRA (Hu et al. 2021): a trainable low-rank update ``scale * A @ B`` beside each frozen kernel.

Adapters sit in the ``Dense`` seam (``Dense.tap``): the layer computes ``x @ W + scale *
(dropout(x) @ A) @ B``. For a kernel ``[*in, *out]`` (with a leading stacked-layer dim when layers
are scanned), ``A`` is ``[*in, r]`` and ``B`` is ``[r, *out]`` with the kernel's own logical axes on
the in and out dims and ``lora_rank`` on r, so an adapter is sharded like its base kernel (the
rank dim replicated by default). ``A`` starts uniform in ``±1/sqrt(fan_in)`` and ``B`` at zero,
so the first forward pass equals the base model's exactly. ``scale`` is ``alpha / r`` or, with
rsLoRA, ``alpha / sqrt(r)``. Only adapters are trainable: the base weights get no gradient and no
optimizer state. ``export`` merges each adapter into its kernel (``W + scale * A @ B``).

The embedding table takes an adapter too when a pattern names it (``^embed$``): rows of ``A``
are gathered on lookup and, when the output layer is tied, logits add ``scale * (x @ B.T) @ A.T``,
so the table is never materialised. Patterns may pick some layers of a scanned (stacked) projection: the adapter then spans all
layers and a static per-layer gate, read from the decoder's layer index, zeroes the others.
"""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slimjax.config import LoraConfig
from slimjax.errors import SlimjaxError
from slimjax.models import scope
from slimjax.models.layers import Dense, Embed
from slimjax.slim.select import Selected, select_layers, weight
from slimjax.slim.transform import Transform

RANK_AXIS = "lora_rank"
TAP_NAME = "tap"  # the Dense attribute holding the adapter; its params are at <dense>/tap/{a,b}


def lora_scale(cfg: LoraConfig) -> float:
    """The adapter output multiplier: alpha / r, or alpha / sqrt(r) under rsLoRA."""
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


class LoraTap(nnx.Module):
    """The adapter of one Dense (all its stacked layers): parameters ``a`` and ``b``."""

    def __init__(self, dense: Dense, rank: int, scale: float, dropout: float, salt: int,
                 layers: tuple[bool, ...] | None, rngs: nnx.Rngs):
        meta = dense.kernel.get_metadata()
        n_in, n_out = meta["matrix"]
        shape, axes = tuple(dense.kernel.shape), tuple(meta["axes"])
        lead = len(shape) - n_in - n_out
        fan_in = math.prod(shape[lead:lead + n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a_shape = (*shape[:lead + n_in], rank)
        self.a = nnx.Param(jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound),
                           axes=(*axes[:lead + n_in], RANK_AXIS), matrix=(n_in, 1))
        self.b = nnx.Param(jnp.zeros((*shape[:lead], rank, *shape[lead + n_in:]), jnp.float32),
                           axes=(*axes[:lead], RANK_AXIS, *axes[lead + n_in:]), matrix=(1, n_out))
        self.scale, self.rate, self.salt = scale, dropout, salt
        self.layers = layers
        ins = string.ascii_lowercase[1:1 + n_in]
        outs = string.ascii_lowercase[1 + n_in:1 + n_in + n_out]
        self.down_eq = f"...{ins},{ins}z->...z"
        self.up_eq = f"...z,z{outs}->...{outs}"
        self.delta_eq = f"{ins}z,z{outs}->{ins}{outs}"

    def __call__(self, dense: Dense, x: jax.Array) -> jax.Array:
        y = dense.product(x)
        h = scope.dropout(x, self.rate, self.salt)
        a, b = self.a[...].astype(dense.dtype), self.b[...].astype(dense.dtype)
        update = jnp.einsum(self.up_eq, jnp.einsum(self.down_eq, h, a), b)
        return y + jnp.asarray(self.scale * self.gate(), dense.dtype) * update

    def gate(self) -> jax.Array | float:
        """1 for adapted layers, 0 for the stacked layers the patterns left out."""
        if self.layers is None or all(self.layers):
            return 1.0
        index = scope.layer_index()
        if index is None:
            raise ValueError("a layer-selective LoRA adapter was called outside the decoder's layer loop")
        return jnp.asarray(self.layers, jnp.float32)[index]

    def delta(self) -> jax.Array:
        """``scale * A @ B`` in the kernel's layout (stacked layers gated)."""
        a, b = self.a[...], self.b[...]
        if self.layers is None:
            return self.scale * jnp.einsum(self.delta_eq, a, b)
        d = jax.vmap(lambda ai, bi: jnp.einsum(self.delta_eq, ai, bi))(a, b)
        gates = jnp.asarray(self.layers, jnp.float32).reshape((-1,) + (1,) * (d.ndim - 1))
        return self.scale * gates * d


class LoraEmbedTap(nnx.Module):
    """The adapter of the embedding table: ``table + scale * A @ B`` with ``A [vocab, r]`` and
    ``B [r, embed]``, read without materialising the table (lookups gather rows of ``A``; the
    tied output layer projects through ``B`` then ``A``). Like PEFT's embedding LoRA it has no
    dropout (a lookup has no input to drop)."""

    def __init__(self, embed: Embed, rank: int, scale: float, rngs: nnx.Rngs):
        vocab, dim = embed.embedding.shape
        axes = tuple(embed.embedding.get_metadata()["axes"])
        bound = 1.0 / math.sqrt(dim)
        self.a = nnx.Param(jax.random.uniform(rngs.params(), (vocab, rank), jnp.float32, -bound, bound),
                           axes=(axes[0], RANK_AXIS), matrix=(1, 1))
        self.b = nnx.Param(jnp.zeros((rank, dim), jnp.float32), axes=(RANK_AXIS, axes[1]), matrix=(1, 1))
        self.scale = scale

    def lookup(self, embed: Embed, tokens: jax.Array) -> jax.Array:
        rows = jnp.take(self.a[...], tokens, axis=0).astype(embed.dtype)
        return embed.lookup(tokens) + jnp.asarray(self.scale, embed.dtype) * (rows @ self.b[...].astype(embed.dtype))

    def attend(self, embed: Embed, x: jax.Array) -> jax.Array:
        x = x.astype(embed.dtype)
        low = jnp.einsum("...d,rd->...r", x, self.b[...].astype(embed.dtype))
        update = jnp.einsum("...r,vr->...v", low, self.a[...].astype(embed.dtype))
        return embed.project(x) + jnp.asarray(self.scale, embed.dtype) * update

    def delta(self) -> jax.Array:
        return self.scale * (self.a[...] @ self.b[...])


class Lora(Transform):
    """The LoRA transform from ``slim.lora``."""

    name = "lora"

    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg

    def options(self) -> dict[str, Any]:
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "rslora": self.cfg.rslora,
                "dropout": self.cfg.dropout, "targets": list(self.cfg.targets)}

    def targets(self, model: nnx.Module) -> list[Selected]:
        """The selected matrix layers, each checked against the rank."""
        chosen = select_layers(model, self.cfg.targets, "slim.lora.targets")
        for sel in chosen:
            n_in, n_out = weight(sel.dense).get_metadata()["matrix"]
            shape = weight(sel.dense).shape
            fan_in, fan_out = math.prod(shape[-n_in - n_out:-n_out]), math.prod(shape[-n_out:])
            if self.cfg.rank > min(fan_in, fan_out):
                raise SlimjaxError(f"slim.lora.rank={self.cfg.rank} exceeds the smaller side of layer '{sel.name}' "
                                   f"({fan_in} x {fan_out}); choose a rank <= {min(fan_in, fan_out)}")
            if sel.dense.tap is not None:
                raise SlimjaxError(f"layer '{sel.name}' already has a {type(sel.dense.tap).__name__}; "
                                   "LoRA cannot be stacked on another layer transform in slim.recipe")
        return chosen

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        scale = lora_scale(self.cfg)
        for sel in self.targets(model):
            if isinstance(sel.dense, Embed):
                sel.dense.tap = LoraEmbedTap(sel.dense, self.cfg.rank, scale, rngs)
            else:
                sel.dense.tap = LoraTap(sel.dense, self.cfg.rank, scale, self.cfg.dropout,
                                        scope.salt_of(sel.name), sel.layers, rngs)

    def trainable(self, path: str, current: bool) -> bool:
        return is_adapter(path)

    def export(self, model: nnx.Module) -> bool:
        merge_adapters(model)
        return False


def is_adapter(path: str) -> bool:
    """Whether a parameter path is a LoRA adapter matrix (``.../wq/tap/a``)."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[-2] == TAP_NAME and parts[-1] in ("a", "b")


LORA_TAPS = (LoraTap, LoraEmbedTap)


def merge_adapters(model: nnx.Module) -> None:
    """Folds every adapter into its matrix (``W + scale * A @ B``) and removes it, in place."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, (Dense, Embed)) and isinstance(node.tap, LORA_TAPS):
            w = weight(node)
            w[...] = w[...] + node.tap.delta().astype(w.dtype)
            node.tap = None


def unmerge_adapters(model: nnx.Module, adapters: nnx.Module) -> None:
    """The inverse of :func:`merge_adapters`: subtracts each adapter of ``adapters`` (a model with
    the same structure still holding its taps) from ``model``'s matrices and re-attaches it."""
    found = {tuple(p): n for p, n in nnx.iter_graph(adapters)
             if isinstance(n, (Dense, Embed)) and isinstance(n.tap, LORA_TAPS)}
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, (Dense, Embed)) and tuple(path) in found:
            tap = found[tuple(path)].tap
            w = weight(node)
            w[...] = w[...] - tap.delta().astype(w.dtype)
            node.tap = tap
