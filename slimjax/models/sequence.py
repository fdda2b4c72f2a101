"""Sequence (context) parallelism: attention and causal load balancing when the rules split the
activations' length (the logical name ``act_length``) over mesh axes.

The model still names axes logically: the mesh, the mesh axes that split ``act_length`` and the
chosen attention (``mesh.sequence_attention``) come from the rules context the caller opened
(``slimjax.sharding.activation_rules``). Outside one, or when ``act_length`` is not split, the
helpers here are not used and the model runs as before.

- ``allgather`` (the default): queries stay split along the length; keys, values and the key-side
  positions and segment ids are replicated along it (the compiler all-gathers them), so each
  device scores its queries against the whole sequence.
- ``ring``: :mod:`slimjax.models.ring` inside ``shard_map``: key/value blocks travel round the
  devices; no device holds more than one block of keys or a ``[queries, block]`` score matrix.

Masks come from positions and segment ids (same document, key position <= query position), so
both hold when the sequence is reordered. Causal load balancing (``mesh.sequence_balance``): with
causal attention the device holding the end of the sequence has the most keys to look at; split
the length into ``2 * ways`` chunks and give device ``i`` chunks ``i`` and ``2 * ways - 1 - i``,
and every device does the same work. The decoder reorders its inputs that way and restores the
order of its final hidden states, so logits, losses and metrics are exactly as without it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from slimjax import sharding
from slimjax.errors import SlimjaxError
from slimjax.models import dense_attention, ring
from slimjax.sharding import Rules, constrain, per_device

LENGTH = "act_length"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The active rules when they split ``act_length`` ``ways`` ways over the mesh axes ``axes``."""

    rules: Rules
    axes: tuple[str, ...]
    ways: int


def active_layout() -> Layout | None:
    """The sequence-parallel layout of the enclosing rules context; None if the length is whole."""
    axes, ways = sharding.split_of(LENGTH)
    return Layout(sharding.active()[1], axes, ways) if ways > 1 else None


# --- attention --------------------------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
              causal: bool, layout: Layout) -> jax.Array:
    """Self-attention ``[b, t, heads, d]`` with the length split as ``layout`` says (see module doc)."""
    if layout.rules.sequence_attention == "ring":
        return _ring(q, k, v, positions, segment_ids, causal, layout)
    return _allgather(q, k, v, positions, segment_ids, causal)


def _allgather(q, k, v, positions, segment_ids, causal):
    # None on the length: replicated along it, which the compiler does with one all-gather each.
    k = constrain(k, ("batch", None, "act_kv_heads", None))
    v = constrain(v, ("batch", None, "act_kv_heads", None))
    mask = ring.visible(constrain(positions, ("batch", LENGTH)), constrain(segment_ids, ("batch", LENGTH)),
                        constrain(positions, ("batch", None)), constrain(segment_ids, ("batch", None)), causal)
    mask = constrain(mask, ("batch", LENGTH, None))
    # The XLA kernel: a fused kernel (cuDNN) would not keep the queries split along the length.
    return dense_attention.attend(q, k, v, mask[:, None])


def _ring(q, k, v, positions, segment_ids, causal, layout):
    heads, kv_heads = (tuple(layout.rules.table[n]) for n in ("act_heads", "act_kv_heads"))
    if heads != kv_heads:
        # Each device groups its own query heads over its own key/value heads.
        raise SlimjaxError(
            f"ring attention needs 'act_heads' and 'act_kv_heads' on the same mesh axes, got {heads} and "
            f"{kv_heads} (mesh.rules); map them alike or use mesh.sequence_attention='allgather'")
    q_names, kv_names, row_names = ("batch", LENGTH, "act_heads", None), ("batch", LENGTH, "act_kv_heads", None), (
        "batch", LENGTH)
    kernel = functools.partial(ring.ring_attention, axes=layout.axes, ways=layout.ways, causal=causal)
    run = per_device(lambda *a: kernel(*a), (q_names, kv_names, kv_names, row_names, row_names), q_names)
    return run(q, k, v, positions, segment_ids)


# --- causal load balancing --------------------------------------------------------------------

def balanced_order(length: int, ways: int) -> np.ndarray:
    """The balanced order of ``length`` positions over ``ways`` devices: device ``i`` gets chunks
    ``i`` and ``2 * ways - 1 - i`` of ``2 * ways``, so early (cheap) and late (costly) causal rows pair up."""
    if length % (2 * ways):
        raise SlimjaxError(f"causal load balancing splits the length into 2 x {ways} chunks, but the length "
                           f"{length} does not divide by {2 * ways}; change data.seq_len or set "
                           "mesh.sequence_balance=False")
    chunks = np.arange(length).reshape(2 * ways, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ways - 1 - i]]) for i in range(ways)])


def balance(layout: Layout, *rows: jax.Array) -> tuple[jax.Array, ...]:
    """``[b, length]`` arrays (token ids, positions, segment ids) in the balanced order."""
    order = balanced_order(rows[0].shape[1], layout.ways)
    return tuple(jnp.take(r, order, axis=1) for r in rows)


def restore(layout: Layout, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Undoes :func:`balance` on an activation ``[b, length, ...]`` split along the length (logical
    ``names``): each device swaps its two chunks with their owners (two ``ppermute``), never
    gathering the whole length."""
    return per_device(functools.partial(_unbalance_local, axes=layout.axes, ways=layout.ways), (names,), names)(x)


def _unbalance_local(x: jax.Array, axes: tuple[str, ...], ways: int) -> jax.Array:
    # Device t holds chunks (t, 2w-1-t) and must end with chunks (2t, 2t+1) of the original order.
    # Even chunks go home in one permutation and odd ones in another (each a bijection: even
    # chunks below w come from even devices, those above from odd ones, and likewise for odd).
    def home(c: int) -> int:
        return c // 2

    def holder(c: int) -> int:
        return c if c < ways else 2 * ways - 1 - c

    first, second = jnp.split(x, 2, axis=1)
    even_here = jax.lax.axis_index(axes) % 2 == 0  # device t's first chunk (t) is even iff t is
    even = jnp.where(even_here, first, second)
    odd = jnp.where(even_here, second, first)
    even = jax.lax.ppermute(even, axes, [(holder(c), home(c)) for c in range(0, 2 * ways, 2)])
    odd = jax.lax.ppermute(odd, axes, [(holder(c), home(c)) for c in range(1, 2 * ways, 2)])
    return jnp.concatenate([even, odd], axis=1)
