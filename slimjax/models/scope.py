"""Per-call context a layer may read while it is traced: the dropout key and the current layer index.

Neither is stored in the model. A training step opens :func:`dropout_key` around its forward pass;
layers that drop (LoRA's adapter input today, an encoder's hidden states later) call
:func:`dropout` with a static ``salt`` that tells them apart. The decoder's layer loop (scanned,
unrolled or cached) opens :func:`layer_scope`, which folds the layer index into the key, so every
layer draws its own mask, and publishes the index, so a transform that acts on some layers of a
stacked (scanned) weight can select them (:func:`layer_index`). Outside a dropout context
(evaluation, generation) dropout is the identity, so no inference path needs a key.
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from typing import Iterator

import jax
import jax.numpy as jnp

_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("slimjax_dropout_key", default=None)
_LAYER: contextvars.ContextVar[jax.Array | int | None] = contextvars.ContextVar("slimjax_layer", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
    """While active (during tracing), :func:`dropout` draws from ``key``; None disables dropout."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


@contextlib.contextmanager
def layer_scope(index: jax.Array | int) -> Iterator[None]:
    """Inside decoder layer ``index``: folds it into the active key and publishes it."""
    key = _KEY.get()
    layer = _LAYER.set(index)
    try:
        with dropout_key(None if key is None else jax.random.fold_in(key, index)):
            yield
    finally:
        _LAYER.reset(layer)


def layer_index() -> jax.Array | int | None:
    """The index of the decoder layer being traced (a tracer when scanned), or None outside one."""
    return _LAYER.get()


def salt_of(name: str) -> int:
    """A stable 31-bit salt from a name (e.g. a parameter path)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def dropout(x: jax.Array, rate: float, salt: int) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate`` when a key is active, else ``x`` unchanged."""
    key = _KEY.get()
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
