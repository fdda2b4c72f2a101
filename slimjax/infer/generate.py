"""Batched generation with a KV cache: one prefill, then a decode loop that stays on device.

Layout choice: prompts are **left-padded** to a common length and every row writes the same
cache slot at each step, so the cache update is one ``dynamic_update_slice`` at a scalar index
for the whole batch (no per-row scatter). Each row still carries its own positions (0 at its
first real token) and padding slots are masked out by segment id, so a row's tokens are exactly
those it would get alone. Prompt lengths are bucketed to powers of two (at least
``MIN_BUCKET``) and the batch is padded to a multiple of the mesh's batch ways, so a compiled
program serves every call with the same (bucket, batch, max_new_tokens, sampling, number of stop
tokens); ``Generator`` keeps those programs and reuses them.

The decode loop is a ``jax.lax.while_loop`` that ends early once every row has produced a stop
token; the cache is created inside the compiled program, so it never leaves the device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import ModelConfig
from slimjax.errors import SlimjaxError
from slimjax.infer.sampling import Sampling, sample
from slimjax.models import abstract_params, compute_dtype
from slimjax.models.cache import KVCache
from slimjax.sharding import Rules, activation_rules, tree_partition, tree_paths

MIN_BUCKET = 8
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class Generated:
    """New tokens per prompt, cut before the first stop token; ``stopped`` says whether one came."""

    tokens: list[list[int]]
    stopped: list[bool]


def unstacked(cfg: ModelConfig, params: dict) -> dict:
    """A scanned model's parameters in the layout of the unrolled one (``scan_layers=False``):
    the same weights, one subtree per layer."""
    blocks = {i: jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(cfg.n_layers)}
    return {**params, "blocks": blocks}


def bucket_length(n: int) -> int:
    """The padded prompt length for a longest prompt of ``n`` tokens: a power of two >= MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


class Generator:
    """Generates from one model's parameters, on one device or on a mesh.

    With a mesh, parameters, prompts and the cache are placed by the rules table exactly like
    training (activations through ``constrain``); without one, everything runs on the default
    device. Compiled programs are cached per (bucket, batch, max_new_tokens, sampling, stops).
    """

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh | None = None, rules: Rules | None = None,
                 dtype: Any = None, abstract: Callable[..., tuple] = abstract_params):
        """``abstract(model_cfg, dtype) -> (graphdef, axes, shapes)`` builds the model's structure:
        the plain decoder by default; a model spec's (``slimjax.slim.spec.abstract_fn``) for
        transformed models (LoRA adapters ...), whose extra parameters then decode too."""
        if (mesh is None) != (rules is None):
            raise ValueError("give both mesh and rules, or neither")
        self.mesh, self.rules = mesh, rules
        self.dtype = compute_dtype(cfg.dtype) if dtype is None else dtype
        scanned = cfg.scan_layers
        # Decoding runs the layers unrolled with the weights unstacked once, here: sliced inside
        # the decode loop, XLA would copy every layer's weights at every step.
        self.cfg = cfg = dataclasses.replace(cfg, scan_layers=False)
        self.graphdef, axes, shapes = abstract(cfg, self.dtype)
        if scanned:
            # A transform may act on some stacked layers only (a layer-selective adapter, gated to
            # zero elsewhere): unrolled, the others have no such parameter, so they are dropped.
            wanted = set(tree_paths(shapes))
            place = lambda p: tree_partition(unstacked(cfg, p), lambda path: path in wanted)[0]  # noqa: E731
        else:
            place = lambda p: p  # noqa: E731
        if mesh is None:
            self.param_shardings = None
            self.params = place(params)
        else:
            self.param_shardings = rules.tree_shardings(axes, shapes, mesh)
            # One jitted placement: it also works when the parameters span several processes.
            self.params = jax.jit(place, out_shardings=self.param_shardings)(params)
        self.compiled: dict[tuple, Any] = {}

    @property
    def batch_ways(self) -> int:
        """How many ways the batch is split (rows are padded to a multiple of this)."""
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in self.rules.table.get("batch", ())]))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_tokens: Sequence[int] = (), seed: int = 0) -> Generated:
        """Continues each prompt (a list of token ids) by up to ``max_new_tokens`` tokens."""
        if not prompts:
            raise SlimjaxError("no prompts to generate from; give at least one")
        if max_new_tokens < 1:
            raise SlimjaxError(f"max new tokens must be >= 1, got {max_new_tokens}")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise SlimjaxError(f"prompt {lengths.index(0)} is empty; give at least one token")
        if max(lengths) + max_new_tokens > self.cfg.max_seq_len:
            raise SlimjaxError(
                f"the longest prompt ({max(lengths)} tokens) plus {max_new_tokens} new tokens exceeds "
                f"model.max_seq_len={self.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
        bucket = bucket_length(max(lengths))
        batch = -(-len(prompts) // self.batch_ways) * self.batch_ways
        tokens = np.full((batch, bucket), PAD_ID, np.int32)
        lens = np.zeros((batch,), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, bucket - len(p):] = np.asarray(p, np.int32)  # left padding
            lens[row] = len(p)
        stops = np.asarray(list(stop_tokens) or [-1], np.int32)
        fn = self._program(bucket, batch, max_new_tokens, sampling, len(stops))
        out = fn(self.params, *self._place(tokens, lens, stops, np.asarray(seed, np.uint32)))
        out = np.asarray(jax.device_get(out))[: len(prompts)]
        stop_set = set(int(s) for s in stop_tokens)
        result, stopped = [], []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_set), None)
            result.append(row if cut is None else row[:cut])
            stopped.append(cut is not None)
        return Generated(result, stopped)

    def _place(self, *host: np.ndarray) -> tuple:
        if self.mesh is None:
            return host
        # make_array_from_callback builds global arrays from host data every process holds.
        return tuple(jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
                     for x, sh in zip(host, self._input_shardings()))

    def _input_shardings(self) -> tuple[NamedSharding, ...]:
        spec = self.rules.spec(("batch", "length"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        rows = NamedSharding(self.mesh, PartitionSpec(*spec[:1]))
        return NamedSharding(self.mesh, spec), rows, replicated, replicated

    def _program(self, bucket: int, batch: int, max_new: int, sampling: Sampling, n_stops: int):
        """The compiled prefill + decode loop for these static shapes (compiled on first use)."""
        key = (bucket, batch, max_new, sampling, n_stops)
        if key in self.compiled:
            return self.compiled[key]
        fn = functools.partial(_generate, self.graphdef, self.cfg, self.dtype, max_new, sampling)
        abstract = (jax.ShapeDtypeStruct((batch, bucket), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
                    jax.ShapeDtypeStruct((n_stops,), jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32))
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
        if self.mesh is None:
            compiled = jax.jit(fn).lower(params, *abstract).compile()
        else:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            with activation_rules(self.mesh, self.rules):  # constraints are resolved while tracing
                compiled = jax.jit(fn, in_shardings=(self.param_shardings, *self._input_shardings()),
                                   out_shardings=replicated).lower(params, *abstract).compile()
        self.compiled[key] = compiled
        return compiled


def _generate(graphdef: nnx.GraphDef, cfg: ModelConfig, dtype: Any, max_new: int, s: Sampling,
              params: dict, tokens: jax.Array, lengths: jax.Array, stops: jax.Array, seed: jax.Array) -> jax.Array:
    """Prefill + decode loop: ``[batch, max_new]`` new tokens (``PAD_ID`` after a row stops)."""
    key = jax.random.key(seed)
    model = nnx.merge(graphdef, params)
    batch, bucket = tokens.shape
    slot = jnp.arange(bucket)[None, :]
    pad = (bucket - lengths)[:, None]
    real = slot >= pad
    positions = jnp.where(real, slot - pad, 0)
    cache = KVCache.init(cfg, batch, bucket + max_new, dtype)
    logits, cache = model.prefill(tokens, positions, real.astype(jnp.int32), cache)

    rows = jnp.arange(batch)
    # Which tokens each row already holds (prompt + generated): the repetition penalty's input.
    seen = None
    if s.repetition_penalty != 1.0:
        seen = jnp.zeros((batch, cfg.vocab_size), bool).at[rows[:, None], tokens].max(real)
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, s, seen)
    out = jnp.full((batch, max_new), PAD_ID, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stops) | (lengths == 0)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, out, cache, seen, key = carry
        logits, cache = model.decode(tok, lengths + i - 1, cache)
        if seen is not None:
            seen = seen.at[rows, tok].set(True)
        key, sub = jax.random.split(key)
        new = jnp.where(done, PAD_ID, sample(logits, sub, s, seen))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, new, done | jnp.isin(new, stops), out, cache, seen, key

    carry = (jnp.ones((), jnp.int32), tok, done, out, cache, seen, key)
    return jax.lax.while_loop(cond, body, carry)[3]


def complete(generator: Generator, tok: Any, prompts: Sequence[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
    """Text continuations of text prompts: each encoded after BOS, generation stops at EOS.

    ``max_new_tokens`` is capped so the longest prompt still fits the model's context.
    """
    ids = [[tok.bos_id, *tok.encode_batch([p])[0]] for p in prompts]
    room = generator.cfg.max_seq_len - max(len(i) for i in ids)
    if room < 1:
        raise SlimjaxError(f"the longest prompt is {max(len(i) for i in ids)} tokens, which leaves no room in "
                           f"model.max_seq_len={generator.cfg.max_seq_len}; shorten it")
    out = generator.generate(ids, min(max_new_tokens, room), sampling, stop_tokens=(tok.eos_id,), seed=seed)
    return [tok.decode(t) for t in out.tokens]
