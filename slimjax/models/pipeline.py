"""Pipeline parallelism over the ``stage`` mesh axis: a layer runner for the stacked blocks.

The blocks never know about it. A caller opens :func:`pipelined` around tracing and the decoder's
(or encoder's) stacked layers run through :class:`Pipeline` instead of a plain scan
(``slimjax.models.scope.layer_runner`` is the seam).

**Layout.** Stacked parameters ``[L, ...]`` carry the logical axis ``layers``, which the default
rules map to ``stage``: stage ``s`` holds the contiguous layers ``s*L/S .. (s+1)*L/S - 1``, and
checkpoints hold the natural layer order on every mesh, so a pipelined run restores onto an
unpipelined mesh and back with nothing to convert. GPipe views ``[L, ...]`` as ``[S, L/S, ...]``,
a reshape that moves no data.

**Schedule.** ``S`` stages, ``M`` microbatches, ``R`` repeats (1 for GPipe), ``G = S*R`` layer
groups of ``K = L/G`` layers; group ``g`` lives on stage ``g mod S`` (the circular placement: stage
``s`` holds groups ``s, s+S, s+2S ...``). Every iteration all stages compute at once (``vmap`` over
the stage dimension with ``spmd_axis_name="stage"``, so each device runs only its stage), then
the activations move one stage on (``ppermute`` over ``stage`` inside ``shard_map``; the last
stage's output wraps round to stage 0). Stage ``s`` at iteration ``t`` works on item ``i = t - s``:
repeat ``i // P`` of microbatch ``i mod P``, with period ``P = max(M, S)`` (a microbatch cannot
re-enter stage 0 before it has left stage ``S-1``; with ``M < S`` the missing items are idle).
Stage 0 keeps a ``P``-slot buffer: it starts as the input microbatches, stage 0 reads its next
input from it, and stores each item that wraps round from the last stage (the next repeat's input,
and at the end the outputs). Hence ``(R-1)*P + M + S - 1`` iterations (a ``scan``), of which each
stage is busy ``R*M``: :func:`bubble_fraction`.

**Circular layout.** Groups ``s, s+S ...`` are not contiguous in the natural order, so the
circular schedule regroups the stacked weights ``[L] -> [S, R, K]`` inside the step: with ``S``
dividing ``R``, one ``all_to_all`` over ``stage`` per forward pass (each device sends and receives
its own ``L/S`` layers, ``(S-1)/S`` of them leaving it; the gradients go back the same way);
otherwise the compiler's regrouping, which gathers the stacked weights over ``stage`` (choose
``R`` a multiple of ``S`` for large models). That is the price of keeping the live state and the
checkpoints in natural order: no conversion at init, restore or save, and every other reader of
the state (evaluation, sampling, export, a plain mesh resuming the run) sees plain layers. A
permuted live layout converted at those boundaries would save the per-step exchange; it is not
built. GPipe pays nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from slimjax.models import scope
from slimjax.sharding import STAGE_AXIS, constrain_staged, regroup_stages, shift_stages

# Logical names of the hidden state a pipeline moves between stages.
HIDDEN_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``stages`` x ``microbatches`` x ``repeats`` (1: GPipe, > 1: circular)."""

    stages: int
    microbatches: int
    repeats: int = 1
    name: str = "gpipe"  # mesh.pipeline_schedule, for reports

    @property
    def period(self) -> int:
        """Iterations between a microbatch's successive visits to stage 0."""
        return max(self.microbatches, self.stages)

    @property
    def iterations(self) -> int:
        """Scan iterations per forward pass (each: every stage computes, then one shift)."""
        return (self.repeats - 1) * self.period + self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """:func:`bubble_fraction` of this schedule."""
        return 1.0 - self.repeats * self.microbatches / self.iterations


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of stage-iterations spent idle: ``1 - R*M / ((R-1)*max(M,S) + M + S - 1)``;
    for ``M >= S`` that is ``(S-1) / (R*M + S-1)`` (GPipe: ``R = 1``)."""
    return Schedule(stages, microbatches, repeats).bubble


def make_schedule(name: str, stages: int, microbatches: int, repeats: int) -> Schedule | None:
    """The schedule the ``mesh.pipeline_*`` keys ask for on ``stages`` stages (None: no pipeline);
    ``microbatches`` 0 means one per stage, ``repeats`` apply to the circular schedule only."""
    if stages == 1:
        return None
    return Schedule(stages, microbatches or stages, repeats if name == "circular" else 1, name)


def describe(schedule: Schedule | None) -> dict[str, Any] | None:
    """A run's pipeline for its summary (None without one): schedule, sizes, scan iterations per
    forward pass and the bubble fraction."""
    if schedule is None:
        return None
    return {"schedule": schedule.name, "stages": schedule.stages, "microbatches": schedule.microbatches,
            "repeats": schedule.repeats, "iterations": schedule.iterations, "bubble_fraction": schedule.bubble}


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one train step's pipeline does: scan iterations and bytes sent over ``stage``."""

    iterations: int  # per forward pass
    passes: int  # forward passes per step (train.microbatches)
    permute_bytes: int  # one shift: every stage sends one microbatch's hidden state
    forward_bytes: int  # all shifts of a step's forward passes
    step_bytes: int  # forward and backward (the gradients travel the same way back)
    bubble: float


def traffic(schedule: Schedule | None, rows: int, seq_len: int, d_model: int, itemsize: int,
            passes: int = 1) -> Traffic | None:
    """Theoretical pipeline traffic of a train step (None without a pipeline), summed over the
    mesh, for ``passes`` forward passes (train.microbatches) of ``rows`` rows each: per iteration
    every stage sends one microbatch's hidden state ``[rows / M, seq_len, d_model]`` to the next
    (``iterations + 1`` shifts per pass, the last delivering the final outputs); the backward pass
    sends the gradients of the same arrays back. Rows count over all batch shards (each data/fsdp
    shard's pipeline moves its own share). The circular schedule's weight regrouping is extra."""
    if schedule is None:
        return None
    permute = schedule.stages * (rows // schedule.microbatches) * seq_len * d_model * itemsize
    forward = (schedule.iterations + 1) * permute * passes
    return Traffic(schedule.iterations, passes, permute, forward, 2 * forward, schedule.bubble)


@contextlib.contextmanager
def pipelined(schedule: Schedule | None) -> Iterator[None]:
    """While active (around tracing), stacked layers run through a :class:`Pipeline` of
    ``schedule``; None leaves them to the plain scan."""
    with scope.layer_runner(None if schedule is None else Pipeline(schedule)):
        yield


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A :class:`slimjax.models.scope.LayerRunner` that streams microbatches through stages."""

    schedule: Schedule

    def __call__(self, layer: scope.LayerFn, stacked: Any, x: jax.Array, rows: tuple[jax.Array, ...]) -> jax.Array:
        S, M, R = self.schedule.stages, self.schedule.microbatches, self.schedule.repeats
        P, T = self.schedule.period, self.schedule.iterations
        n_layers = jax.tree.leaves(stacked)[0].shape[0]
        K = n_layers // (S * R)
        params = jax.tree.map(lambda a: regroup_stages(a, S, R, K), stacked)
        x_mb = _split(x, M)  # [M, mb, ...]
        rows_mb = tuple(_split(r, M) for r in rows)
        if P > M:  # idle slots (M < S): zeros, never read back as outputs
            x_mb = jnp.concatenate([x_mb, jnp.zeros((P - M, *x_mb.shape[1:]), x_mb.dtype)])
        # Only stage 0's buffer is used; one per stage keeps it on stage 0's devices (no broadcast).
        buf = constrain_staged(jnp.broadcast_to(x_mb, (S, *x_mb.shape)), (STAGE_AXIS, None), HIDDEN_AXES)
        hidden = constrain_staged(jnp.zeros((S, *x_mb.shape[1:]), x.dtype), (STAGE_AXIS,), HIDDEN_AXES)

        def stage_step(s, params_s, h, buf_s, t):
            # Stage 0 first stores what just wrapped round from the last stage (item t - S) ...
            done = t - S
            slot_done = jnp.mod(done, P)
            keep = jnp.where((s == 0) & (done >= 0), h, buf_s[slot_done])
            buf_s = jax.lax.dynamic_update_index_in_dim(buf_s, keep, slot_done, 0)
            # ... then every stage runs item t - s: stage 0 reads it from the buffer, the others
            # take what the previous stage just sent.
            item = t - s
            slot = jnp.mod(item, P)
            repeat = jnp.clip(item // P, 0, R - 1)
            h = jnp.where(s == 0, buf_s[slot], h)
            group_params = jax.tree.map(lambda a: a[repeat] if R > 1 else a[0], params_s)  # [K, ...]
            first = (repeat * S + s) * K
            micro_rows = tuple(r[jnp.minimum(slot, M - 1)] for r in rows_mb)

            def one(hk, pk):
                p, k = pk
                return layer(p, hk, first + k, micro_rows), None

            with scope.folded(slot):  # microbatches draw their own dropout masks
                h, _ = jax.lax.scan(one, h, (group_params, jnp.arange(K)))
            return h, buf_s

        all_stages = jax.vmap(stage_step, in_axes=(0, 0, 0, 0, None), spmd_axis_name=STAGE_AXIS)

        def iteration(carry, t):
            h, buf_ = carry
            h, buf_ = all_stages(jnp.arange(S), params, shift_stages(h, S), buf_, t)
            return (constrain_staged(h, (STAGE_AXIS,), HIDDEN_AXES),
                    constrain_staged(buf_, (STAGE_AXIS, None), HIDDEN_AXES)), None

        (hidden, buf), _ = jax.lax.scan(iteration, (hidden, buf), jnp.arange(T))
        # The last item reaches stage 0 with one more shift; the buffer then holds the outputs.
        last = shift_stages(hidden, S)
        out = jax.lax.dynamic_update_index_in_dim(buf[0], last[0], (T - S) % P, 0)[:M]
        return _merge(out)


def _split(x: jax.Array, m: int) -> jax.Array:
    """``[B, ...] -> [m, B/m, ...]``, microbatch i taking rows i, i+m, ... so that every
    microbatch stays spread over all batch shards (as the train step's gradient accumulation)."""
    y = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return constrain_staged(y, (None,), HIDDEN_AXES)


def _merge(y: jax.Array) -> jax.Array:
    """The inverse of :func:`_split`."""
    x = y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])
    return constrain_staged(x, (), HIDDEN_AXES)
