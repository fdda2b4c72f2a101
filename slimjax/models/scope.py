"""Per-call context a layer may read while it is traced: the dropout key, the current layer index,
and the runner of stacked layers.

None of them is stored in the model. A training step opens :func:`dropout_key` around its forward pass;
layers that drop (LoRA's adapter input today, an encoder's hidden states later) call
:func:`dropout` with a static ``salt`` that tells them apart. The decoder's layer loop (scanned,
unrolled or cached) opens :func:`layer_scope`, which folds the layer index into the key, so every
layer draws its own mask, and publishes the index, so a transform that acts on some layers of a
stacked (scanned) weight can select them (:func:`layer_index`). Outside a dropout context
(evaluation, generation) dropout is the identity, so no inference path needs a key.

:func:`layer_runner` is the seam through which a caller changes *how* stacked (scanned) layers run
without the block code knowing: the default is a ``scan`` over the layers; a pipeline
(``slimjax.models.pipeline``) splits them into stages and streams microbatches through them.
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp

_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("slimjax_dropout_key", default=None)
_LAYER: contextvars.ContextVar[jax.Array | int | None] = contextvars.ContextVar("slimjax_layer", default=None)

# One layer as a pure function: (that layer's state, hidden [rows, ...], layer index, per-row
# arrays such as positions and segment ids) -> hidden.
LayerFn = Callable[[Any, jax.Array, jax.Array, tuple[jax.Array, ...]], jax.Array]


class LayerRunner(Protocol):
    """Runs ``x`` through stacked layers: ``stacked`` holds every layer's state with a leading
    layer axis; ``rows`` are arrays whose leading axis is ``x``'s rows (split alongside it)."""

    def __call__(self, layer: LayerFn, stacked: Any, x: jax.Array, rows: tuple[jax.Array, ...]) -> jax.Array: ...


_RUNNER: contextvars.ContextVar[LayerRunner | None] = contextvars.ContextVar("slimjax_layer_runner", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
    """While active (during tracing), :func:`dropout` draws from ``key``; None disables dropout."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


@contextlib.contextmanager
def folded(index: jax.Array | int) -> Iterator[None]:
    """Folds ``index`` into the active dropout key (if any): e.g. a microbatch's number, so
    microbatches that share a layer draw different masks."""
    key = _KEY.get()
    with dropout_key(None if key is None else jax.random.fold_in(key, index)):
        yield


@contextlib.contextmanager
def layer_scope(index: jax.Array | int) -> Iterator[None]:
    """Inside decoder layer ``index``: folds it into the active key and publishes it."""
    layer = _LAYER.set(index)
    try:
        with folded(index):
            yield
    finally:
        _LAYER.reset(layer)


@contextlib.contextmanager
def layer_runner(runner: LayerRunner | None) -> Iterator[None]:
    """While active (during tracing), stacked layers run through ``runner`` instead of a scan."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def active_runner() -> LayerRunner | None:
    """The runner :func:`layer_runner` installed, or None (the plain scan)."""
    return _RUNNER.get()


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
