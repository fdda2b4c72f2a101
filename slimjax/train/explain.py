"""What a config will do to each device, before (and, on request, after) compiling it.

``layout(cfg)`` builds the train state abstractly (no array is allocated) and reports, per device:
where every parameter lives and which rule put it there, the optimizer state, gradients, an
estimate of the activations the backward pass keeps for the configured batch, microbatching and
remat, warnings (rules that change nothing, large parameters left replicated, mesh axes that split
no parameter) and whether it fits the device memory. ``compiled(cfg)`` lowers and compiles the real
train step and reads the compiler's memory analysis and the collectives in the optimized program,
each beside the figure the layout predicts.

The activation figure is an estimate from the model's shapes (stated assumptions below); the
compiled analysis is the ground truth for one backend and is what ``--compiled`` adds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from slimjax.config import Config
from slimjax.errors import SlimjaxError
from slimjax.models.decoder import compute_dtype
from slimjax.sharding import BATCH_AXES, MESH_AXES, Rules, explain, make_mesh, mesh_shape, path_str
from slimjax.tables import Table, human_bytes
from slimjax.train import optimizer as optim
from slimjax.train.state import Setup, make_setup
from slimjax.slim.spec import spec_from_config

# Mesh axes whose job is to split activations (batch rows, sequence positions), not parameters.
ACTIVATION_ONLY_AXES = (*BATCH_AXES, "sequence")
REPLICATED_WARN_BYTES = 1 << 20  # a replicated parameter larger than this on a multi-device mesh is worth a look

# Accelerators one can plan for without having them: platform, memory per device (the vendor's
# figure), and how many devices one unit of the slice name counts. TPU v4 and v5p slice names count
# TensorCores, two per chip (v5p-64 is 32 chips); v5e and v6e names count chips; GPUs count GPUs.
CHIPS: dict[str, tuple[str, int, float]] = {
    "v4": ("tpu", 32 * 2**30, 0.5),
    "v5p": ("tpu", 95 * 2**30, 0.5),
    "v5e": ("tpu", 16 * 2**30, 1),
    "v6e": ("tpu", 32 * 2**30, 1),
    "a100": ("gpu", 80 * 2**30, 1),
    "h100": ("gpu", 80 * 2**30, 1),
    "h200": ("gpu", 141 * 10**9, 1),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for without having it: how many devices, which platform (it decides the
    ``auto`` compute dtype) and the memory of each device (None: unknown)."""

    devices: int
    platform: str
    memory: int | None

    @classmethod
    def parse(cls, name: str) -> "Target":
        """``v5p-64`` (a TPU slice as Google names it), ``h100-8`` (eight GPUs), ``cpu-8``."""
        chip, _, count = name.lower().rpartition("-")
        if chip == "cpu" and count.isdigit() and int(count) > 0:
            return cls(int(count), "cpu", None)
        if chip not in CHIPS or not count.isdigit() or int(count) <= 0:
            raise SlimjaxError(f"--target={name!r} is not a known slice; write CHIP-COUNT with CHIP one of "
                               f"{', '.join(CHIPS)} or cpu (e.g. v5p-64, v5e-16, h100-8)")
        platform, memory, per_unit = CHIPS[chip]
        devices = int(count) * per_unit
        if devices != int(devices):
            raise SlimjaxError(f"--target={name!r}: {chip} slice names count TensorCores, two per chip; "
                               "give an even count (v5p-8 is 4 chips)")
        return cls(int(devices), platform, memory)

    def mesh(self, cfg: Config) -> AbstractMesh:
        """The config's mesh over this target's device count, as shapes only (no devices needed)."""
        sizes = mesh_shape(cfg.mesh, self.devices)
        return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def platform_of(mesh: Mesh | AbstractMesh, target: Target | None = None) -> str:
    """The platform a (possibly abstract) mesh is planned for."""
    return target.platform if target is not None else mesh.devices.flat[0].platform


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything ``slimjax explain`` prints, as data."""

    mesh: dict[str, int]
    params: Table  # one row per parameter
    activations: Table  # one row per key activation of one layer (and the logits)
    memory: Table  # per-device bytes by kind, with the verdict as a note
    warnings: tuple[str, ...]
    fits: bool | None  # None: the device memory is unknown

    def __str__(self) -> str:
        mesh = ", ".join(f"{a}={s}" for a, s in self.mesh.items())
        parts = [f"mesh ({mesh})", "", "parameters", str(self.params), "", "activations (one layer, per device)",
                 str(self.activations), "", "memory per device", str(self.memory)]
        if self.warnings:
            parts += ["", "warnings"] + [f"- {w}" for w in self.warnings]
        return "\n".join(parts)


def layout(cfg: Config, devices: Sequence[jax.Device] | None = None, device_memory: int | None = None,
           replicated_warn_bytes: int = REPLICATED_WARN_BYTES, target: Target | None = None) -> Layout:
    """The per-device picture of ``cfg`` on its mesh over ``devices`` (default: all), or over a
    ``target`` this machine does not have (``Target.parse("v5p-64")``: shapes only). ``device_memory``
    (bytes per device) defaults to the target's or to what the backend reports (GPU/TPU); on CPU it
    stays unknown."""
    mesh = make_mesh(cfg.mesh, devices) if target is None else target.mesh(cfg)
    platform = platform_of(mesh, target)
    rules = Rules.from_config(cfg.mesh)
    setup = abstract_setup(cfg, rules, mesh, platform)
    built = setup.built
    params = explain(built.axes, built.shapes, rules, mesh)
    params = _with_rule_column(params, rules, mesh)
    acts = activation_table(cfg, rules, mesh, platform)
    opt_bytes = per_device_bytes(setup.abstract.opt_state)
    grad_bytes = per_device_bytes(setup.abstract.params)  # gradients: one per trainable leaf, sharded alike
    param_bytes = sum(params.column("per-device bytes"))
    slim_bytes = per_device_bytes(setup.abstract.slim)
    act_bytes = activation_bytes(cfg, acts, mesh)
    rows = [("parameters", param_bytes), ("gradients (trainable)", grad_bytes), ("optimizer state", opt_bytes),
            ("transform state", slim_bytes), ("activations (estimate)", act_bytes)]
    total = sum(b for _, b in rows)
    limit = (device_memory if device_memory is not None else target.memory if target is not None
             else backend_memory(mesh))
    fits = None if limit is None else total <= limit
    verdict = (f"verdict: unknown ({human_bytes(total)} per device; give --device_memory to compare)" if limit is None
               else f"verdict: {'fits' if fits else 'does NOT fit'}: {human_bytes(total)} of {human_bytes(limit)} "
                    f"per device ({100 * total / limit:.0f}%)")
    memory = Table(("kind", "bytes", "human"), tuple((k, b, human_bytes(b)) for k, b in rows + [("total", total)]),
                   (verdict,))
    warnings = layout_warnings(cfg, rules, mesh, params, acts, replicated_warn_bytes)
    return Layout(dict(mesh.shape), params, acts, memory, warnings, fits)


def abstract_setup(cfg: Config, rules: Rules, mesh: Mesh | AbstractMesh, platform: str | None = None) -> Setup:
    """The train state's shapes and shardings for ``cfg``, nothing allocated."""
    dtype = compute_dtype(cfg.model.dtype, platform or platform_of(mesh))
    return make_setup(spec_from_config(cfg), dtype, optim.make_optimizer(cfg.optimizer, cfg.train.steps), rules, mesh)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` (the most-loaded device:
    shards of an unevenly split dimension are rounded up, as XLA pads them)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if isinstance(leaf.sharding, NamedSharding) else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _with_rule_column(table: Table, rules: Rules, mesh: Mesh) -> Table:
    """The parameter table with the rules that split each parameter (``embed->fsdp(2)``)."""
    i = table.columns.index("logical axes")
    rows = []
    for row in table.rows:
        applied = [f"{name}->{'x'.join(f'{a}({mesh.shape[a]})' for a in rules.table[name])}"
                   for name in row[i] if name is not None and rules.table.get(name)
                   and any(mesh.shape[a] > 1 for a in rules.table[name])]  # rules onto size-1 axes split nothing
        rows.append((*row[:i + 1], " ".join(applied) or "replicated", *row[i + 1:]))
    return Table((*table.columns[:i + 1], "rules", *table.columns[i + 1:]), tuple(rows), table.notes)


# --- activations ------------------------------------------------------------------------------

def activation_table(cfg: Config, rules: Rules, mesh: Mesh | AbstractMesh, platform: str) -> Table:
    """Key activations of one block for one microbatch, with logical axes and per-device shapes.

    The backward pass keeps these per layer unless remat recomputes them; ``attention scores``
    is the [heads, length, length] matrix the XLA attention materialises (cuDNN's flash kernel
    keeps only a per-row log-sum-exp instead)."""
    m = cfg.model
    rows_per_step = cfg.train.global_batch_size // cfg.train.microbatches
    b, t = rows_per_step // pipeline_microbatches(cfg, mesh), cfg.data.seq_len
    # With the sequence split, the all-gather layout holds every key and value of the sequence and a
    # score matrix against all of them; ring attention holds one key/value block of t / sequence.
    ring = cfg.mesh.sequence > 1 and cfg.mesh.sequence_attention == "ring"
    kv_len, tk = ("act_length", t // cfg.mesh.sequence) if ring else ("length", t)
    acts = [
        ("residual", ("batch", "act_length", "act_embed"), (b, t, m.d_model)),
        ("queries", ("batch", "act_length", "act_heads", "head_dim"), (b, t, m.n_heads, m.head_dim)),
        ("keys", ("batch", kv_len, "act_kv_heads", "head_dim"), (b, t, m.n_kv_heads, m.head_dim)),
        ("values", ("batch", kv_len, "act_kv_heads", "head_dim"), (b, t, m.n_kv_heads, m.head_dim)),
        ("attention scores", ("batch", "act_heads", "act_length", None), (b, m.n_heads, t, tk)),
        ("attention output", ("batch", "act_length", "act_heads", "head_dim"), (b, t, m.n_heads, m.head_dim)),
        ("mlp hidden", ("batch", "act_length", "act_mlp"), (b, t, m.d_ff)),
        ("logits", ("batch", "act_length", "act_vocab"), (b, t, m.vocab_size)),
    ]
    itemsize = np.dtype(compute_dtype(m.dtype, platform)).itemsize
    rows = []
    for name, axes, shape in acts:
        spec = rules.spec(axes, shape, mesh, what=f"activation '{name}'")
        local = NamedSharding(mesh, spec).shard_shape(shape)
        size = 4 if name == "logits" else itemsize  # the loss is computed from float32 logits
        rows.append((name, shape, axes, str(spec), local, math.prod(local) * size))
    return Table(("activation", "shape", "logical axes", "partition spec", "per-device shape", "per-device bytes"),
                 tuple(rows))


# Activations the backward pass keeps per layer, by remat policy, as multiples of the rows above.
# "none": the block's inputs and every intermediate (norm inputs and outputs, q/k/v, scores and
# probabilities, attention output, gate/up/activated hidden, residuals); "dots": matmul outputs
# only; "full": the block's input alone (one block is recomputed at a time, counted once).
_KEPT = {
    "none": {"residual": 6, "queries": 1, "keys": 1, "values": 1, "attention scores": 2, "attention output": 1,
             "mlp hidden": 3},
    "dots": {"residual": 2, "queries": 1, "keys": 1, "values": 1, "attention scores": 1, "attention output": 0,
             "mlp hidden": 2},
    "full": {"residual": 1},
}


def pipeline_microbatches(cfg: Config, mesh: Mesh | AbstractMesh) -> int:
    """Microbatches the pipeline cuts each step's rows into (1 without a pipeline)."""
    schedule = _schedule(cfg, mesh)
    return 1 if schedule is None else schedule.microbatches


def activation_bytes(cfg: Config, acts: Table, mesh: Mesh | AbstractMesh) -> int:
    """Estimated peak activation bytes per device for one (gradient-accumulation) microbatch: what
    every layer on this device keeps for the backward pass under ``model.remat``, plus one layer's
    full set while it is recomputed (full remat) and the logits with their gradient.

    With a pipeline a device holds ``n_layers / stages`` layers but keeps their activations for
    every pipeline microbatch (``acts`` describes one), plus stage 0's buffer of the microbatches'
    inputs and outputs; the logits are computed after the pipeline, for all rows at once."""
    per = dict(zip(acts.column("activation"), acts.column("per-device bytes")))
    micro, stages = pipeline_microbatches(cfg, mesh), mesh.shape["stage"]
    kept = sum(per[name] * k for name, k in _KEPT[cfg.model.remat].items())
    # Full remat rebuilds one block's intermediates at a time during the backward pass; "dots"
    # recomputes only elementwise ops, whose transients are small next to what it keeps.
    recompute = sum(per[n] * k for n, k in _KEPT["none"].items()) if cfg.model.remat == "full" else 0
    buffers = 2 * micro * per["residual"] if stages > 1 else 0
    return cfg.model.n_layers // stages * micro * kept + recompute + buffers + 2 * micro * per["logits"]


def backend_memory(mesh: Mesh) -> int | None:
    """Bytes per device the backend reports (GPU, TPU); None where it reports none (CPU)."""
    stats = mesh.devices.flat[0].memory_stats() if hasattr(mesh.devices.flat[0], "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# --- warnings ---------------------------------------------------------------------------------

def layout_warnings(cfg: Config, rules: Rules, mesh: Mesh, params: Table, acts: Table,
                    replicated_warn_bytes: int) -> tuple[str, ...]:
    """Rules that change nothing, large parameters left whole on every device, idle mesh axes."""
    out = []
    used = {name for axes in params.column("logical axes") + acts.column("logical axes") for name in axes if name}
    for name, axes in cfg.mesh.rules:
        if name not in used:
            out.append(f"mesh.rules entry '{name}' -> {axes} matches no parameter or activation of this model")
        elif axes and all(mesh.shape[a] == 1 for a in axes):
            out.append(f"mesh.rules entry '{name}' -> {axes} splits nothing: those mesh axes have size 1")
    if mesh.size > 1:
        for row in params.records():
            full = math.prod(row["shape"]) * (row["per-device bytes"] // max(math.prod(row["per-device shape"]), 1))
            if row["per-device shape"] == row["shape"] and full > replicated_warn_bytes:
                out.append(f"parameter '{row['parameter']}' ({human_bytes(full)}) is replicated on all {mesh.size} "
                           f"devices; map one of {row['logical axes']} to a mesh axis to split it")
    split = {a for spec in params.column("partition spec") for a in re.findall(r"'(\w+)'", spec)}
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in split and axis not in ACTIVATION_ONLY_AXES:
            out.append(f"mesh axis '{axis}' (size {size}) splits no parameter: it only replicates work")
    return tuple(out)


# --- compiled program -------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES)
                 + r")(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[^\s(]+) \(.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?body=%(?P<body>[^\s,]+).*?\"known_trip_count\":\{\"n\":\"(?P<n>[0-9]+)\"")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%(?P<name>[^\s,)]+)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """An HLO module's computations (name -> body lines) and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if (m := _HEADER.match(line)) is not None:
            current = m.group("name")
            computations[current] = []
            entry = current if m.group("entry") else entry
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _run_counts(computations: dict[str, list[str]], entry: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """(how often each computation runs per call of the entry, each loop body's trip count):
    loop bodies run their trip count times their caller's count, nested."""
    times = {entry: 1} if entry else {}
    trips: dict[str, int] = {}
    todo = [entry] if entry else []
    while todo:
        name = todo.pop()
        for line in computations.get(name, ()):
            loops = {m.group("body"): int(m.group("n")) for m in _WHILE.finditer(line)}
            trips.update(loops)
            for callee in _CALLS.findall(line):
                if callee in computations and callee not in times:
                    times[callee] = times[name] * loops.get(callee, 1)
                    todo.append(callee)
    return times, trips


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind in an optimized HLO module: how many ops run per step and the bytes of
    their results (per device: the SPMD program is one device's). An op inside a loop counts once
    per iteration (XLA's ``known_trip_count``: the scan over layers); async pairs count once."""
    computations, entry = _computations(hlo_text)
    times, _ = _run_counts(computations, entry)
    out = {kind: {"ops": 0, "bytes": 0} for kind in COLLECTIVES}
    for name, lines in computations.items():
        for m in filter(None, map(_OP.match, lines)):
            shapes = _ARRAY.findall(m.group("shape"))
            if m.group("shape").startswith("(") and len(shapes) > 1 and m.group("op") != "all-reduce":
                shapes = shapes[-1:]  # an async start's tuple holds (operand, result): count the result
            nbytes = sum(math.prod(int(d) for d in dims.split(",") if d) * _itemsize(dt) for dt, dims in shapes)
            out[m.group("op")]["ops"] += times.get(name, 1)
            out[m.group("op")]["bytes"] += times.get(name, 1) * nbytes
    return out


def permute_loop_trips(hlo_text: str) -> list[int]:
    """Trip counts of the loops whose own body passes data between devices with
    collective-permute: a pipeline's loop over iterations, forward and backward."""
    computations, entry = _computations(hlo_text)
    _, trips = _run_counts(computations, entry)
    return [n for body, n in trips.items()
            if any((m := _OP.match(line)) and m.group("op") == "collective-permute" for line in computations[body])]


def _itemsize(hlo_dtype: str) -> int:
    if hlo_dtype == "pred":
        return 1
    bits = int(re.sub(r"[a-z]", "", hlo_dtype) or 32)
    return max(bits // 8, 1)


def expected_collectives(cfg: Config, mesh: Mesh, setup: Setup, platform: str) -> dict[str, tuple[int, str]]:
    """What the layout should move per step, per device: ``{"kind (axis)": (result bytes, why)}``.

    The textbook figures, made exact for this model: data parallelism all-reduces the gradients
    once; FSDP all-gathers every weight for the forward pass (the untied embedding table is only
    looked up, which needs no gather) and the scanned layers' weights again for the backward pass
    (the scan's backward loop needs each layer's weights once more; outside the scan XLA keeps the
    gathered copy), then reduce-scatters the gradients but the looked-up table's (the CPU backend
    lowers that to an all-reduce of whole gradients); tensor parallelism all-reduces the residual
    twice per layer forward and twice backward.

    Under a pipeline the layers' weights are used once per pipeline iteration, inside XLA's loop,
    and XLA gathers them (FSDP) and reduces their gradients (data, FSDP) there: once per
    iteration, not once per step (MaxText's default does the same; gathering once per step, at
    the cost of holding a stage's whole weights, is not built)."""
    grads = per_device_bytes(setup.abstract.params)
    schedule = _schedule(cfg, mesh)
    per_iter = 1 if schedule is None else schedule.iterations * cfg.train.microbatches
    block_grads = per_device_bytes(_blocks(setup.abstract.params))
    out: dict[str, tuple[int, str]] = {}
    if mesh.shape["data"] > 1:
        why = "the gradients once" if schedule is None else "the layers' gradients every pipeline iteration, the rest once"
        out["all-reduce (data)"] = (grads + (per_iter - 1) * block_grads, why)
    if mesh.shape["fsdp"] > 1:
        weights = {**_unsplit_bytes(setup.abstract.params, "fsdp"), **_unsplit_bytes(setup.abstract.frozen, "fsdp")}
        looked_up = set() if cfg.model.tie_embeddings else {"embed/embedding"}
        times = lambda path: per_iter if path.startswith("blocks/") else 1  # noqa: E731
        forward = sum(b * times(path) for path, b in weights.items() if path not in looked_up)
        again = cfg.model.scan_layers or cfg.model.remat != "none"
        backward = sum(b * times(path) for path, b in weights.items() if again and path.startswith("blocks/"))
        out["all-gather (fsdp)"] = (forward + backward, "every weight forward, the scanned layers' again backward"
                                    + ("" if schedule is None else ", the layers' every pipeline iteration"))
        # The looked-up table's gradient needs no reduction: XLA moves the activation gradient to
        # the table's sharding with an all-to-all and scatters into the local rows.
        reduced = sum(b * times(p) for p, b in _unsplit_bytes(setup.abstract.params, "fsdp").items()
                      if p not in looked_up)
        if platform == "cpu":
            out["all-reduce (fsdp)"] = (reduced, "the gradients, reduced whole (CPU's lowering of reduce-scatter)")
        else:
            out["reduce-scatter (fsdp)"] = (reduced // mesh.shape["fsdp"], "the gradients once")
    if schedule is not None:
        out.update(_pipeline_collectives(cfg, mesh, setup, platform, schedule))
    if mesh.shape["tensor"] > 1:
        m = cfg.model
        rows = cfg.train.global_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        act = rows * cfg.data.seq_len * m.d_model * np.dtype(compute_dtype(m.dtype, platform)).itemsize
        # A pipeline runs layers per stage and iteration on one microbatch's rows.
        layer_runs = m.n_layers * act if schedule is None else (
            m.n_layers // (schedule.stages * schedule.repeats) * per_iter * act // schedule.microbatches)
        out["all-reduce (tensor)"] = (4 * layer_runs, "the residual twice per layer forward, twice backward")
    return out


def _schedule(cfg: Config, mesh: Mesh | AbstractMesh):
    """The run's pipeline schedule on ``mesh`` (None without a pipeline)."""
    from slimjax.train.run import pipeline_schedule  # run pulls in the data stack: only when asked

    return pipeline_schedule(cfg, mesh)


def _blocks(tree: dict) -> dict:
    """The stacked layers' part of a parameter tree."""
    return {k: v for k, v in tree.items() if k == "blocks"}


def _pipeline_collectives(cfg: Config, mesh: Mesh, setup: Setup, platform: str, schedule
                          ) -> dict[str, tuple[int, str]]:
    """A pipeline's traffic per device: each iteration every stage passes one microbatch's hidden
    state on (and its gradient back), stage 0 hands the finished outputs to every stage for the
    head (and gets their gradient back), and the circular schedule regroups the layer weights
    across stages (and the gradients back)."""
    m, passes = cfg.model, cfg.train.microbatches
    rows = cfg.train.global_batch_size // (passes * mesh.shape["data"] * mesh.shape["fsdp"])
    hidden = rows * (cfg.data.seq_len // mesh.shape["sequence"]) * m.d_model
    hidden *= np.dtype(compute_dtype(m.dtype, platform)).itemsize
    shift = hidden // schedule.microbatches
    out = {"collective-permute (stage)": (2 * passes * (schedule.iterations + 1) * shift,
                                          f"one microbatch's hidden state per iteration ({schedule.iterations + 1} "
                                          "shifts a pass), forward and back"),
           "all-reduce (stage)": (2 * passes * hidden, "the outputs handed to every stage, and their gradient")}
    if schedule.repeats > 1:
        layers = per_device_bytes(_blocks(setup.abstract.params)) + per_device_bytes(_blocks(setup.abstract.frozen))
        out["all-to-all (stage)"] = (2 * passes * layers, "the layer weights regrouped for the circular schedule, "
                                     "and their gradients back")
    return out


def _unsplit_bytes(tree: Any, axis: str) -> dict[str, int]:
    """Per leaf of a sharded abstract tree: its bytes on one device once ``axis``'s split is undone
    (what an all-gather over ``axis`` returns)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        local = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        spec = [a for part in leaf.sharding.spec for a in ((part,) if isinstance(part, str) else part or ())]
        out[path_str(path)] = local * (leaf.sharding.mesh.shape[axis] if axis in spec else 1)
    return out


def theory_by_kind(expected: dict[str, tuple[int, str]]) -> dict[str, int]:
    """The expected bytes summed per collective kind (``all-reduce (data)`` + ``all-reduce (tensor)``)."""
    out = {kind: 0 for kind in COLLECTIVES}
    for key, (nbytes, _) in expected.items():
        out[key.split(" (")[0]] += nbytes
    return out


def compile_step(cfg: Config, devices: Sequence[jax.Device] | None = None) -> tuple[Any, Mesh, Setup]:
    """(the compiled train step for ``cfg``, its mesh, the abstract setup)."""
    from slimjax.data import pipeline
    from slimjax.train.run import compile_steps

    mesh = make_mesh(cfg.mesh, devices)
    rules = Rules.from_config(cfg.mesh)
    setup = abstract_setup(cfg, rules, mesh)
    train_step, _, _ = compile_steps(cfg, setup, mesh, rules, pipeline.batch_shardings(mesh, rules))
    return train_step, mesh, setup


def compiled(cfg: Config, devices: Sequence[jax.Device] | None = None, step: tuple[Any, Mesh, Setup] | None = None
             ) -> tuple[Table, Table, dict[str, tuple[int, str]]]:
    """(memory analysis, collectives, expected) of the real train step compiled for ``cfg``
    (``step``: what :func:`compile_step` returned, to analyse a step compiled already)."""
    train_step, mesh, setup = step or compile_step(cfg, devices)
    mem = train_step.memory_analysis()
    if mem is None:
        raise SlimjaxError(f"the {mesh.devices.flat[0].platform} compiler reports no memory analysis")
    kinds = [("arguments", mem.argument_size_in_bytes), ("outputs", mem.output_size_in_bytes),
             ("aliased (donated state)", mem.alias_size_in_bytes), ("temporaries", mem.temp_size_in_bytes),
             ("generated code", mem.generated_code_size_in_bytes)]
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    memory = Table(("kind", "bytes", "human"), tuple((k, b, human_bytes(b)) for k, b in kinds + [("peak", peak)]))
    moved = collective_bytes(train_step.as_text())
    expected = expected_collectives(cfg, mesh, setup, platform_of(mesh))
    theory = theory_by_kind(expected)
    coll = Table(("collective", "ops", "bytes per device", "human", "theory bytes", "compiled / theory"),
                 tuple((k, v["ops"], v["bytes"], human_bytes(v["bytes"]), theory[k],
                        round(v["bytes"] / theory[k], 3) if theory[k] else None) for k, v in moved.items()))
    return memory, coll, expected
