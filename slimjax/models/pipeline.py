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
from jax.sharding import NamedSharding, PartitionSpec

from slimjax.config import MeshConfig, ModelConfig, check_pipeline
from slimjax.models import scope
from slimjax.sharding import active_rules

STAGE_AXIS = "stage"
# Logical names of the hidden state a pipeline moves between stages.
HIDDEN_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``stages`` x ``microbatches`` x ``repeats`` (1: GPipe, > 1: circular)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def period(self) -> int:
        """Iterations between a microbatch's successive visits to stage 0."""
        return max(self.microbatches, self.stages)

    @property
    def iterations(self) -> int:
        """Scan iterations per forward pass (each: every stage computes, then one shift)."""
        return (self.repeats - 1) * self.period + self.microbatches + self.stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of stage-iterations spent idle: ``1 - R*M / ((R-1)*max(M,S) + M + S - 1)``;
    for ``M >= S`` that is ``(S-1) / (R*M + S-1)`` (GPipe: ``R = 1``)."""
    s = Schedule(stages, microbatches, repeats)
    return 1.0 - repeats * microbatches / s.iterations


def schedule_of(mesh: MeshConfig, stages: int) -> Schedule | None:
    """The schedule ``mesh``'s pipeline keys ask for on a mesh of ``stages`` stages (None: no pipeline)."""
    if stages == 1:
        return None
    repeats = mesh.pipeline_repeats if mesh.pipeline_schedule == "circular" else 1
    return Schedule(stages, mesh.pipeline_microbatches or stages, repeats)


def describe(mesh: MeshConfig, stages: int) -> dict[str, Any] | None:
    """The pipeline a run uses, for its summary (None without one): schedule, sizes, scan
    iterations per forward pass and the bubble fraction."""
    sched = schedule_of(mesh, stages)
    if sched is None:
        return None
    return {"schedule": mesh.pipeline_schedule, "stages": sched.stages, "microbatches": sched.microbatches,
            "repeats": sched.repeats, "iterations": sched.iterations,
            "bubble_fraction": bubble_fraction(sched.stages, sched.microbatches, sched.repeats)}


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one train step's pipeline does: scan iterations and bytes sent over ``stage``."""

    iterations: int  # per forward pass
    passes: int  # forward passes per step (train.microbatches)
    permute_bytes: int  # one shift: every stage sends one microbatch's hidden state
    forward_bytes: int  # all shifts of a step's forward passes
    step_bytes: int  # forward and backward (the gradients travel the same way back)
    bubble: float


def traffic(mesh: MeshConfig, model: ModelConfig, stages: int, global_batch: int, grad_microbatches: int,
            seq_len: int, itemsize: int) -> Traffic | None:
    """Theoretical pipeline traffic of a train step (None without a pipeline), summed over the
    mesh: per iteration each of the ``stages`` stages sends one microbatch's hidden state
    ``[rows, seq_len, d_model]`` to the next (``iterations + 1`` shifts per forward pass, the last
    delivering the final outputs), once per gradient-accumulation microbatch; the backward pass
    sends the gradients of the same arrays back. ``rows`` counts a microbatch's rows over all
    batch shards (each data/fsdp shard's pipeline moves its own share)."""
    sched = schedule_of(mesh, stages)
    if sched is None:
        return None
    check_pipeline(mesh, stages, model, global_batch // grad_microbatches)
    rows = global_batch // grad_microbatches // sched.microbatches
    permute = stages * rows * seq_len * model.d_model * itemsize
    forward = (sched.iterations + 1) * permute * grad_microbatches
    return Traffic(sched.iterations, grad_microbatches, permute, forward, 2 * forward,
                   bubble_fraction(sched.stages, sched.microbatches, sched.repeats))


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
        params = jax.tree.map(lambda a: _regroup(a, S, R, K), stacked)
        x_mb = _split(x, M)  # [M, mb, ...]
        rows_mb = tuple(_split(r, M) for r in rows)
        if P > M:  # idle slots (M < S): zeros, never read back as outputs
            x_mb = jnp.concatenate([x_mb, jnp.zeros((P - M, *x_mb.shape[1:]), x_mb.dtype)])
        # Only stage 0's buffer is used; one per stage keeps it on stage 0's devices (no broadcast).
        buf = _place(jnp.broadcast_to(x_mb, (S, *x_mb.shape)), (STAGE_AXIS, None))
        hidden = _place(jnp.zeros((S, *x_mb.shape[1:]), x.dtype), (STAGE_AXIS,))

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
            h, buf_ = all_stages(jnp.arange(S), params, _shift(h, S), buf_, t)
            return (_place(h, (STAGE_AXIS,)), _place(buf_, (STAGE_AXIS, None))), None

        (hidden, buf), _ = jax.lax.scan(iteration, (hidden, buf), jnp.arange(T))
        # The last item reaches stage 0 with one more shift; the buffer then holds the outputs.
        last = _shift(hidden, S)
        out = jax.lax.dynamic_update_index_in_dim(buf[0], last[0], (T - S) % P, 0)[:M]
        return _merge(out)


def _split(x: jax.Array, m: int) -> jax.Array:
    """``[B, ...] -> [m, B/m, ...]``, microbatch i taking rows i, i+m, ... so that every
    microbatch stays spread over all batch shards (as the train step's gradient accumulation)."""
    y = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return _place(y, (None,))


def _merge(y: jax.Array) -> jax.Array:
    """The inverse of :func:`_split`."""
    x = y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])
    return _place(x, ())


def _place(x: jax.Array, lead: tuple[str | None, ...]) -> jax.Array:
    """Constrains ``x`` (leading dims ``lead``, then a hidden state's or a per-row array's
    dims) to the active mesh; a no-op outside :func:`slimjax.sharding.activation_rules`."""
    active = active_rules()
    if active is None:
        return x
    mesh, rules = active
    axes = HIDDEN_AXES[: x.ndim - len(lead)]
    spec = rules.spec(axes, x.shape[len(lead):], mesh, what=f"pipeline {tuple(axes)}")
    lead_spec = tuple(a if a is None or mesh.shape[a] > 1 else None for a in lead)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*lead_spec, *spec)))


def _regroup(a: jax.Array, stages: int, repeats: int, per_group: int) -> jax.Array:
    """A stacked weight ``[L, ...]`` (natural order, contiguous blocks on ``stage``) as
    ``[S, R, K, ...]``: stage s, repeat r holds group ``r*S + s`` (layers ``(r*S + s)*K + k``).

    GPipe (``R = 1``) is a reshape. Circular with ``S | R`` is one ``all_to_all`` over ``stage``:
    stage s' holds groups ``s'*R + j1*S + j2`` (``j1 < R/S``, ``j2 < S``) and sends group j2 of each
    ``j1`` to stage ``j2``, which files it as repeat ``s'*R/S + j1``. Otherwise the compiler
    regroups (it gathers the stacked weight over ``stage``)."""
    rest = a.shape[1:]
    if repeats == 1:
        return _on_stages(a.reshape(stages, 1, per_group, *rest))
    active = active_rules()
    if active is None or active[0].shape[STAGE_AXIS] == 1 or repeats % stages:
        return _on_stages(a.reshape(repeats, stages, per_group, *rest).swapaxes(0, 1))

    def local(block):  # this stage's R*K contiguous layers
        block = block.reshape(repeats // stages, stages, per_group, *rest)
        block = jax.lax.all_to_all(block, STAGE_AXIS, split_axis=1, concat_axis=0, tiled=True)
        return block.reshape(1, repeats, per_group, *rest)

    return jax.shard_map(local, mesh=active[0], in_specs=PartitionSpec(STAGE_AXIS),
                         out_specs=PartitionSpec(STAGE_AXIS), axis_names={STAGE_AXIS})(a)


def _on_stages(a: jax.Array) -> jax.Array:
    """Pins a stacked weight's leading (stage) dimension to ``stage``, leaving the rest to
    propagation (fsdp and tensor shard the weights' own dimensions)."""
    active = active_rules()
    if active is None:
        return a
    rest = (PartitionSpec.UNCONSTRAINED,) * (a.ndim - 1)
    return jax.lax.with_sharding_constraint(a, NamedSharding(active[0], PartitionSpec(STAGE_AXIS, *rest)))


def _shift(h: jax.Array, stages: int) -> jax.Array:
    """Stage s's ``h[s]`` to stage s+1 (the last to stage 0): a ``ppermute`` over ``stage``."""
    active = active_rules()
    if active is None or active[0].shape[STAGE_AXIS] == 1:
        return jnp.roll(h, 1, axis=0)
    mesh = active[0]
    ring = [(i, (i + 1) % stages) for i in range(stages)]
    return jax.shard_map(lambda a: jax.lax.ppermute(a, STAGE_AXIS, ring), mesh=mesh,
                         in_specs=PartitionSpec(STAGE_AXIS), out_specs=PartitionSpec(STAGE_AXIS),
                         axis_names={STAGE_AXIS})(h)

