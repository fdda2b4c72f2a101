"""Next-token choice from logits: greedy, temperature, top-k, top-p and repetition penalty.

Each function is a pure function of ``[batch, vocab]`` logits (and a PRNG key), so it runs on
device inside the decode loop. The order of a step follows Hugging Face's logits processors:
repetition penalty, then temperature, then top-k, then top-p, then a categorical draw (or the
argmax when ``temperature == 0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slimjax.errors import SlimjaxError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. Hashable: a compiled decode loop is specialised to one of these."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the row (1: none)

    def __post_init__(self):
        if self.temperature < 0:
            raise SlimjaxError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SlimjaxError(f"--top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SlimjaxError(f"--top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SlimjaxError(f"--repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL (Keskar et al. 2019): a token already in the row has its logit divided by ``penalty``
    when positive and multiplied by it when negative. ``seen`` is a ``[batch, vocab]`` bool."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Logits outside each row's ``k`` largest set to -inf (ties with the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus sampling: keeps, per row, the most likely tokens until their probability reaches
    ``p`` (the token that crosses ``p`` is kept, so the top token always is); the rest -> -inf."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    # Scatter the decision back to vocabulary order through the inverse permutation.
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, NEG_INF)


def processed_logits(logits: jax.Array, seen: jax.Array | None, s: Sampling) -> jax.Array:
    """The logits a sample is drawn from, after penalty, temperature, top-k and top-p (float32)."""
    logits = logits.astype(jnp.float32)
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits
    logits = logits / s.temperature
    return top_p_mask(top_k_mask(logits, s.top_k), s.top_p)


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first index of the maximum) as int32, computed as
    two plain reductions: XLA's CPU argmax (one reduction over (value, index) pairs) cost about
    0.6 ms per step on ``[8, 16000]`` logits, 5x the pair of reductions."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
    """One token id per row ``[batch]`` (int32)."""
    logits = processed_logits(logits, seen, s)
    if s.greedy:
        return first_argmax(logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
