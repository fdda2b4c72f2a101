"""Building blocks with logical axis names on every parameter.

Parameters are stored in float32 (``param_dtype``) and cast to the compute dtype at use, so
mixed precision needs no second copy of the weights. Each ``nnx.Param`` carries an ``axes``
metadata tuple naming its dimensions; ``slimjax.sharding`` maps those names onto the mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

PARAM_DTYPE = jnp.float32


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
                 std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std^2), tagged with its logical axes."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), PARAM_DTYPE)
    return nnx.Param(value, axes=tuple(axes))


def const_param(shape: Sequence[int], axes: Sequence[str | None], value: float) -> nnx.Param:
    """A float32 parameter filled with ``value`` (norm scales, biases)."""
    return nnx.Param(jnp.full(tuple(shape), value, PARAM_DTYPE), axes=tuple(axes))


def flat_matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """``x [..., *in] @ kernel [*in, *out] -> [..., *out]`` as one 2-D matrix product.

    Leading dims of ``x`` merge into rows and the kernel's input/output dims into one each (free
    reshapes of row-major arrays). Why not one einsum: with several leading dims (batch, length)
    the weight gradient contracts two dims, and XLA's CPU pipeline then transposes the output
    gradient ``[tokens, out] -> [out, tokens]`` through memory before its GEMM, which cost about a
    third of a ``llama_20m`` step; on the flat form every product is a plain GEMM.
    """
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[:x.ndim - n_in]
    rows = jnp.reshape(x, (-1, math.prod(in_shape)))
    y = jnp.dot(rows, jnp.reshape(kernel, (math.prod(in_shape), -1)))
    return jnp.reshape(y, (*lead, *out_shape))


class Dense(nnx.Module):
    """A linear map contracting the trailing input dims into output dims (an einsum).

    ``kernel`` has shape ``in_shape + out_shape``: e.g. the query projection is
    ``(embed, heads, head_dim)``, so heads stay a real axis that can be sharded by name. The
    kernel's metadata states its matrix view, ``matrix=(n_in, n_out)``: its last ``n_in + n_out``
    dimensions are ``n_in`` input dims then ``n_out`` output dims (a stacked-layer dim, when
    layers are scanned, comes before them), so transforms (LoRA, low-rank, quantization) read the
    view instead of parsing the einsum.

    ``tap`` is the one seam where a transform changes how this layer computes: when set, the
    layer returns ``tap(self, x)`` instead of ``self.product(x)``; the tap may call
    ``product`` with a substituted kernel or add a term of its own.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_axes: Sequence[str], out_axes: Sequence[str], *, use_bias: bool,
                 std: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), std)
        self.kernel.set_metadata(matrix=(len(in_shape), len(out_shape)))
        self.bias = const_param(out_shape, out_axes, 0.0) if use_bias else None
        self.dtype = dtype
        self.tap = nnx.data(None)
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.tap is not None:
            return self.tap(self, x)
        return self.product(x)

    def product(self, x: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """``x @ kernel + bias`` in the compute dtype (``kernel`` defaults to the stored one)."""
        kernel = self.kernel[...] if kernel is None else kernel
        y = flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``(vocab, embed)``; ``attend`` reuses it as the output layer.

    As for ``Dense``, ``tap`` is the seam a transform uses to change how the table is read: when
    set, lookups go through ``tap.lookup(self, tokens)`` and the output layer through
    ``tap.attend(self, x)``; ``lookup`` and ``project`` are the plain reads. The table's matrix
    view is ``matrix=(1, 1)``: rows are tokens, columns the residual width.
    """

    def __init__(self, vocab: int, dim: int, *, std: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (vocab, dim), ("vocab", "embed"), std)
        self.embedding.set_metadata(matrix=(1, 1))
        self.dtype = dtype
        self.tap = nnx.data(None)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.tap is not None:
            return self.tap.lookup(self, tokens)
        return self.lookup(tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.tap is not None:
            return self.tap.attend(self, x)
        return self.project(x)

    def lookup(self, tokens: jax.Array) -> jax.Array:
        """The table's rows for ``tokens``, in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def project(self, x: jax.Array) -> jax.Array:
        """``x @ table.T``: logits over the vocabulary."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class Norm(nnx.Module):
    """LayerNorm (scale and optional bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, dim: int, *, kind: str, eps: float, use_bias: bool, dtype: jnp.dtype):
        self.scale = const_param((dim,), ("norm",), 1.0)
        self.bias = const_param((dim,), ("norm",), 0.0) if use_bias and kind == "layernorm" else None
        self.kind, self.eps, self.dtype = kind, eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


# (kind, factor, low_freq_factor, high_freq_factor, original_max_len): model.rope_* from the config.
RopeScaling = tuple[str, float, float, float, int]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Per-pair rotation frequencies ``[head_dim // 2]`` in float32, with optional scaling.

    "linear" divides every frequency by the factor (position interpolation); "llama3" (Llama 3.1)
    divides only the low frequencies (wavelengths longer than ``original_max_len /
    low_freq_factor``), keeps the high ones (shorter than ``original_max_len / high_freq_factor``)
    and blends linearly in between. Hugging Face's ``rope_scaling`` means the same.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    kind = "none" if scaling is None else scaling[0]
    if kind == "linear":
        return inv_freq / scaling[1]
    if kind == "llama3":
        _, factor, low, high, original = scaling
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return jnp.where(medium, blended, scaled)
    return inv_freq


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary embedding in the half-split layout of Hugging Face Llama checkpoints.

    x: ``[batch, length, heads, head_dim]``; positions: ``[batch, length]`` (restart at 0 in
    each packed document). Angles are computed in float32 for accuracy at long positions.
    """
    inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, half]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's tanh approximation of GELU."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf (BERT's ``hidden_act="gelu"``)."""
    return jax.nn.gelu(x, approximate=False)


def out_proj_std(std: float, n_layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layers)
