"""The compiler's memory figure for sequence-parallel attention, for benchmarks and tests.

:func:`attention_memory` compiles one causal attention forward and backward (a loss on its output,
differentiated for the queries, keys and values) with the length split ``ways`` ways and returns
XLA's peak temporary bytes per device (``compiled.memory_analysis().temp_size_in_bytes``): the
activations and scratch the program needs beyond its inputs and outputs. It is a deterministic
figure of the compiled program, not a measurement of a run.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from slimjax.models import sequence
from slimjax.sharding import DEFAULT_RULES, Rules, activation_rules, build_mesh


def attention_memory(seq_len: int, ways: int, attention: str, *, batch: int = 1, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 32, devices: Sequence[jax.Device] | None = None) -> int:
    """Peak temporary bytes per device of causal attention (forward + backward, float32) over
    ``seq_len`` positions split ``ways`` ways over the ``sequence`` mesh axis, with ``attention``
    "ring" or "allgather". ``ways`` 1 runs the same kernel on one device (the baseline)."""
    devices = list(jax.devices() if devices is None else devices)[:ways]
    mesh = build_mesh(1, 1, 1, devices, sequence=ways)
    rules = Rules(DEFAULT_RULES, attention)
    layout = sequence.Layout(rules, ("sequence",), ways)

    def loss(q, k, v, positions, segment_ids):
        out = sequence.attention(q, k, v, positions, segment_ids, True, layout)
        return jnp.sum(out * out)

    q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), jnp.float32)
    rows = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
    q_sh, kv_sh, row_sh = (NamedSharding(mesh, rules.spec(names)) for names in (
        ("batch", "act_length", "act_heads", None), ("batch", "act_length", "act_kv_heads", None),
        ("batch", "act_length")))
    with activation_rules(mesh, rules):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(q_sh, kv_sh, kv_sh, row_sh, row_sh))
        compiled = step.lower(q, kv, kv, rows, rows).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)
