"""Quantization transforms: fake quantization while training (``qat``) and quantized storage (``quant``).

``qat`` (``slim.qat``) keeps the parameters as they are and changes only what the loss sees: each
targeted kernel is replaced, inside the loss, by ``dequantize(quantize(w))`` (round to nearest,
per-channel or group-wise, as in :mod:`slimjax.slim.quantize`), and the gradient passes straight
through the rounding to ``w`` (the straight-through estimator). It keeps no state, so a QAT run
resumes like any other, and every option may change between runs.

``quant`` (``slim.quant``) is model surgery: each targeted ``Dense`` loses its float kernel and
gets a :class:`QuantTap` holding integer codes (``int8``; at 2, 3 or 4 bits packed along the
kernel's last dim into ``uint8``), float32 scales ``[*lead, groups, *out]`` and, asymmetric, zero
points of the same shape. Codes carry the kernel's logical axes and scales its output axes, so
the rules shard them like the kernel. The layer dequantizes and multiplies
(``dense.product(x, kernel=deq)``); none of it trains. Widths may differ per layer
(``slim.quant.layer_bits``), also within a scanned stack (codes are int8 either way; a stack
packs at its widest layer's container). The rewrite quantizes by round to nearest; a calibrated
method (GPTQ) writes its own codes into the same parameters afterwards. ``export`` dequantizes
back into a plain kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimjax.config import FLOAT_BITS, QatConfig, QuantConfig, parse_layer_bits
from slimjax.errors import SlimjaxError
from slimjax.models.layers import Dense
from slimjax.sharding import tree_paths
from slimjax.slim import quantize as Q
from slimjax.slim.select import Selected, Target, bake_taps, layer_names, select_layers, stacked_layers
from slimjax.slim.transform import Transform

TAP_NAME = "tap"  # the Dense attribute holding the codes: <dense>/tap/{codes,scale,zero}
STORED = ("codes", "scale", "zero")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def fake_quantize_ste(w: jax.Array, bits: int, group_size: int, symmetric: bool) -> jax.Array:
    """``dequantize(quantize(w))`` of ``w [..., d_in, d_out]`` whose gradient is the identity."""
    flat = w.reshape(-1, *w.shape[-2:])
    out = jax.vmap(lambda m: Q.fake_quantize(m, bits, group_size, symmetric))(flat)
    return out.reshape(w.shape).astype(w.dtype)


fake_quantize_ste.defvjp(lambda w, bits, group, symmetric: (fake_quantize_ste(w, bits, group, symmetric), None),
                         lambda bits, group, symmetric, _, g: (g,))


def _matrix_targets(model: nnx.Module, patterns: tuple[str, ...], key: str, group_size: int) -> list[Selected]:
    """The selected Dense layers, each checked for the group size; the embedding table is refused."""
    chosen = select_layers(model, patterns, key)
    for sel in chosen:
        if not isinstance(sel.dense, Dense):
            raise SlimjaxError(f"{key} selects the embedding table '{sel.name}'; quantization covers Dense "
                               "projections only: narrow the patterns (e.g. '^blocks/')")
        n_in, n_out = sel.dense.kernel.get_metadata()["matrix"]
        shape = sel.dense.kernel.shape
        d_in = math.prod(shape[len(shape) - n_in - n_out:len(shape) - n_out])
        Q.group_count(d_in, group_size, f"{key.rsplit('.', 1)[0]}.group_size", sel.name)
    return chosen



class Qat(Transform):
    """Quantization-aware training from ``slim.qat``: a fake-quantizing view with a straight-through gradient."""

    name = "qat"
    runtime_options = frozenset(f.name for f in dataclasses.fields(QatConfig))

    def __init__(self, cfg: QatConfig):
        self.cfg = cfg
        self.targets: list[Target] = []

    def options(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "targets": list(self.cfg.targets)}

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Records the targeted kernels (the model is unchanged)."""
        self.targets = [Target.of(s) for s in _matrix_targets(model, self.cfg.targets, "slim.qat.targets",
                                                            self.cfg.group_size)]

    def view(self, params: dict, state: dict) -> dict:
        c = self.cfg
        by_path = {t.path: t for t in self.targets}

        def one(path: str, x: jax.Array) -> jax.Array:
            t = by_path.get(path)
            if t is None:
                return x
            fq = t.from_layers(fake_quantize_ste(t.as_layers(x), c.bits, c.group_size, c.symmetric))
            if t.layers is None or all(t.layers):
                return fq
            chosen = jnp.asarray(t.layers).reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(chosen, fq, x)

        leaves = [one(p, x) for p, x in zip(tree_paths(params), jax.tree.leaves(params))]
        return jax.tree.unflatten(jax.tree.structure(params), leaves)


class QuantTap(nnx.Module):
    """A Dense's kernel as integer codes plus scales (and zero points), for all its stacked layers."""

    def __init__(self, kernel: nnx.Param, bits: tuple[int, ...], group_size: int, symmetric: bool, pack: bool,
                 pack_bits: int = 0):
        """``pack_bits``: the width whose container the codes are packed in (default: the widest of ``bits``)."""
        meta = kernel.get_metadata()
        self.n_in, self.n_out = meta["matrix"]
        self.kernel_axes = tuple(meta["axes"])
        self.kernel_shape = tuple(kernel.shape)
        self.bits = tuple(bits)
        lead = len(self.kernel_shape) - self.n_in - self.n_out
        dims = self.kernel_shape[lead:]
        d_in, d_out = math.prod(dims[:self.n_in]), math.prod(dims[self.n_in:])
        self.groups = Q.group_count(d_in, group_size)
        self.container = Q.container_bits(max(*bits, pack_bits)) if pack else 8
        w = jnp.asarray(kernel[...], jnp.float32).reshape(len(bits), d_in, d_out)
        parts = [Q.quantize(w[i], b, group_size, symmetric) for i, b in enumerate(bits)]
        codes = jnp.stack([p[0] for p in parts]).reshape(self.kernel_shape)
        side = (*self.kernel_shape[:lead], self.groups, *dims[self.n_in:])
        side_axes = (*self.kernel_axes[:lead], None, *self.kernel_axes[lead + self.n_in:])
        self.codes = nnx.Param(Q.pack(codes, self.container), axes=self.kernel_axes, matrix=(self.n_in, self.n_out))
        self.scale = nnx.Param(jnp.stack([p[1] for p in parts]).reshape(side), axes=side_axes, matrix=(1, self.n_out))
        self.zero = (None if symmetric else
                     nnx.Param(jnp.stack([p[2] for p in parts]).reshape(side), axes=side_axes, matrix=(1, self.n_out)))

    def __call__(self, dense: Dense, x: jax.Array) -> jax.Array:
        return dense.product(x, kernel=self.dequantized())

    def dequantized(self) -> jax.Array:
        """The float32 kernel the codes stand for (per layer inside a scan, all layers outside)."""
        q = Q.unpack(self.codes[...], self.container)
        trailing = self.kernel_shape[len(self.kernel_shape) - self.n_in - self.n_out:]
        lead = q.shape[:q.ndim - len(trailing)]
        d_in, d_out = math.prod(trailing[:self.n_in]), math.prod(trailing[self.n_in:])
        scale = self.scale[...].reshape(*lead, self.groups, d_out)
        zero = None if self.zero is None else self.zero[...].reshape(*lead, self.groups, d_out)
        return Q.dequantize(q.reshape(*lead, d_in, d_out), scale, zero).reshape(*lead, *trailing)


def _stack_key(name: str) -> str:
    """A Dense's name without its block index: the layers one scanned stack would hold."""
    return re.sub(r"^blocks/\d+/", "blocks/", name)


def is_stored(path: str) -> bool:
    """Whether a parameter path is part of a quantized kernel (``.../wq/tap/codes``)."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[-2] == TAP_NAME and parts[-1] in STORED


class Quant(Transform):
    """Quantized storage from ``slim.quant``."""

    name = "quant"

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg

    def options(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "targets": list(self.cfg.targets),
                "layer_bits": list(self.cfg.layer_bits)}

    def layer_bits(self, model: nnx.Module) -> list[tuple[Selected, tuple[int, ...]]]:
        """Each selected Dense with its per-layer widths (16: left in float), checked."""
        c = self.cfg
        overrides = parse_layer_bits("slim.quant.layer_bits", c.layer_bits)
        out, named = [], set()
        for sel in _matrix_targets(model, c.targets, "slim.quant.targets", c.group_size):
            if sel.dense.tap is not None:
                raise SlimjaxError(f"layer '{sel.name}' already has a {type(sel.dense.tap).__name__}; "
                                   "quant cannot be stacked on another layer transform in slim.recipe")
            names = layer_names(sel.path, stacked_layers(sel.dense))
            flags = sel.layers or (True,)
            bits = tuple(overrides.get(n, c.bits) if f else FLOAT_BITS for n, f in zip(names, flags))
            named |= set(names)
            if all(b == FLOAT_BITS for b in bits):
                continue
            if any(b == FLOAT_BITS for b in bits):
                floats = [n for n, b in zip(names, bits) if b == FLOAT_BITS]
                raise SlimjaxError(f"layer '{floats[0]}' would stay float inside the scanned stack '{sel.name}', "
                                   "whose other layers are quantized; quantize every layer of the stack or set "
                                   "model.scan_layers=False")
            out.append((sel, bits))
        unknown = sorted(set(overrides) - named)
        if unknown:
            raise SlimjaxError(f"slim.quant.layer_bits names layer '{unknown[0]}', which slim.quant.targets does not "
                               "select; name layers like blocks/0/attn/wq")
        return out

    def rewrite(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        c = self.cfg
        chosen = self.layer_bits(model)
        # A stack packs at its widest layer's container; unrolled, each layer packs at the widest
        # container of the layers it would be stacked with, so both layouts hold the same arrays
        # (the generator and calibration unstack scanned parameters into the unrolled layout).
        widest: dict[str, int] = {}
        for sel, bits in chosen:
            key = _stack_key(sel.name)
            widest[key] = max(widest.get(key, 0), *bits)
        for sel, bits in chosen:
            tap = QuantTap(sel.dense.kernel, bits, c.group_size, c.symmetric, c.pack, widest[_stack_key(sel.name)])
            sel.dense.tap = tap
            sel.dense.kernel = None

    def trainable(self, path: str, current: bool) -> bool:
        return False if is_stored(path) else current

    def export(self, model: nnx.Module) -> bool:
        dequantize_taps(model)
        return False


def dequantize_taps(model: nnx.Module) -> None:
    """Replaces every quantized kernel by its dequantized float32 kernel, in place."""
    bake_taps(model, QuantTap, QuantTap.dequantized)


def stored_bytes(params: dict) -> int:
    """Bytes of every quantized kernel's codes, scales and zero points in a parameter tree."""
    flat = dict(zip(tree_paths(params), jax.tree.leaves(params)))
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for p, x in flat.items() if is_stored(p))
