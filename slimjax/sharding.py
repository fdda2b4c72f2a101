"""Device mesh from config and the logical-axis rules that map model names onto it.

The model only ever names axes logically (``embed``, ``heads``, ``batch`` ...). This module owns
the one translation from those names to mesh axes (``data``, ``fsdp``, ``tensor``): partition
specs for parameters, and sharding constraints for activations while a rules context is active;
and the few collectives over the ``stage`` axis a pipeline's layer runner needs (shift, regroup),
so that the models themselves never see a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import MeshConfig, suggest
from slimjax.errors import SlimjaxError
from slimjax.tables import Table, human_bytes

# Outermost to innermost: mesh_utils puts the last axes on the fastest links (tensor, then
# sequence, whose collectives run inside every layer), the first across slices/hosts.
MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")
# Mesh axes that split the batch: a global batch must divide by their product.
BATCH_AXES = ("data", "fsdp")

# Every logical axis name slimjax defines -> the mesh axes it is split over (() replicates).
# ``mesh.rules`` in a config overrides entries of this table; it never needs to restate it.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # activation and cache batch rows (data loader, every layer's input)
    "length": (),  # sequence positions of batch arrays (token ids, targets, masks) and the KV cache
    "act_length": ("sequence",),  # sequence positions of activations (sequence/context parallelism)
    "act_embed": (),  # residual stream between blocks (decoder)
    "act_heads": ("tensor",),  # attention query heads and the attention output (attention)
    "act_kv_heads": ("tensor",),  # attention keys/values and the KV cache (attention, cache)
    "act_mlp": ("tensor",),  # MLP hidden units (decoder MLP)
    "act_vocab": ("tensor",),  # output logits (decoder head)
    "vocab": ("tensor",),  # vocabulary dimension of the token embedding and lm_head
    "embed": ("fsdp",),  # model-width dimension of every weight matrix (FSDP shards here)
    "heads": ("tensor",),  # query-head dimension of wq and wo
    "kv_heads": ("tensor",),  # key/value-head dimension of wk and wv
    "head_dim": (),  # per-head width of wq, wk, wv, wo and the KV cache
    "mlp": ("tensor",),  # hidden dimension of the MLP's up, gate and down weights
    "layers": ("stage",),  # leading dimension of stacked (scanned) layer parameters: pipeline stages
    "norm": (),  # normalisation scales and biases
    "positions": (),  # rows of the learned position table (GPT-2, BERT)
    "types": (),  # rows of the encoder's token-type (segment A/B) table
    "embed_out": (),  # output side of the encoder's width-preserving pooler and MLM transform (small)
    "classes": (),  # output classes of classification heads (sequence classifiers, the encoder pair head)
    "lora_rank": (),  # rank dimension of LoRA adapters: small, so replicated
    "lowrank_rank": (),  # rank dimension of low-rank factors: contracted between two products, so replicated
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolves the config's axis sizes (one may be -1) against the device count."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise SlimjaxError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % known:
            raise SlimjaxError(
                f"mesh {_fmt(sizes)} does not divide the {n_devices} available devices; "
                f"the fixed axes multiply to {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise SlimjaxError(
            f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices but {n_devices} are "
            "available; set the sizes so they multiply to the device count (or use -1 on one axis)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh, ordering devices by the platform's topology."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        # mesh_utils knows TPU torus and GPU NVLink layouts; it puts `tensor` on the fastest links.
        grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES)


def build_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
               *, stage: int = 1, sequence: int = 1) -> Mesh:
    """A mesh of these axis sizes (one may be -1) over ``devices`` (default: all), for notebooks and
    scripts: ``slimjax.load_run(run_dir, mesh=build_mesh(fsdp=2, tensor=4))``."""
    return make_mesh(MeshConfig(data, fsdp, tensor, (), stage=stage, sequence=sequence), devices)


@dataclasses.dataclass(frozen=True)
class Rules:
    """The logical-name -> mesh-axes table, with the checks that make it safe to use."""

    table: Mapping[str, tuple[str, ...]]
    # How attention runs when "act_length" is split (mesh.sequence_attention, mesh.sequence_balance):
    # the rules context is what a model reads, so these travel with the table.
    sequence_attention: str = "allgather"
    sequence_balance: bool = True

    @classmethod
    def from_config(cls, cfg: MeshConfig) -> "Rules":
        """:data:`DEFAULT_RULES` with the config's ``mesh.rules`` entries replacing theirs.

        An override may only name a known logical name and known mesh axes: a typo would
        otherwise be silently ignored (its default would apply) instead of reported.
        """
        for name, axes in cfg.rules:
            if name not in DEFAULT_RULES:
                raise SlimjaxError(
                    f"mesh.rules overrides unknown logical axis name '{name}'{suggest(name, DEFAULT_RULES)}; "
                    "mesh.rules overrides entries of DEFAULT_RULES in slimjax/sharding.py, whose names are "
                    f"{', '.join(DEFAULT_RULES)}")
            for axis in axes:
                if axis not in MESH_AXES:
                    raise SlimjaxError(
                        f"mesh.rules maps '{name}' to unknown mesh axis '{axis}'; mesh axes are "
                        f"{', '.join(MESH_AXES)}")
        return cls({**DEFAULT_RULES, **dict(cfg.rules)}, cfg.sequence_attention, cfg.sequence_balance)

    def replicating(self, *names: str) -> "Rules":
        """These rules with the logical ``names`` replicated (e.g. lengths a decode step cannot split)."""
        return dataclasses.replace(self, table={**self.table, **{n: () for n in names}})

    def describe(self) -> str:
        """The effective table, one ``name -> mesh axes`` line per logical name."""
        width = max(map(len, self.table))
        return "\n".join(f"{n.ljust(width)}  {', '.join(a) if a else 'replicated'}" for n, a in self.table.items())

    def require(self, names: Sequence[str]) -> None:
        """Fails with the missing names unless every logical name has a rule."""
        missing = sorted({n for n in names if n is not None and n not in self.table})
        if missing:
            raise SlimjaxError(
                f"logical axis name(s) {', '.join(repr(m) for m in missing)} used by the model have no "
                "rule; register each in DEFAULT_RULES in slimjax/sharding.py")

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None, what: str = "array") -> PartitionSpec:
        """The PartitionSpec for an array whose dimensions carry these logical names.

        With ``shape`` and ``mesh`` it also checks that each sharded dimension divides evenly,
        so a bad combination fails here, by name, rather than deep inside XLA.
        """
        self.require([a for a in axes if a is not None])
        parts, used = [], {}
        for dim, name in enumerate(axes):
            mesh_axes = () if name is None else self.table[name]
            for axis in mesh_axes:
                if axis in used:
                    raise SlimjaxError(
                        f"mesh.rules maps both '{used[axis]}' and '{name}' of {what} onto mesh axis "
                        f"'{axis}'; one array cannot use a mesh axis twice")
                used[axis] = name
            if mesh is not None and shape is not None and mesh_axes:
                ways = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[dim] % ways:
                    raise SlimjaxError(
                        f"{what} dimension {dim} ('{name}', size {shape[dim]}) cannot be split "
                        f"{ways} ways over mesh axes {mesh_axes}; change the model size or the mesh")
            parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        while parts and parts[-1] is None:  # canonical form: no trailing Nones
            parts.pop()
        return PartitionSpec(*parts)

    def tree_shardings(self, axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
        """NamedShardings for a tree of logical-axes tuples and the matching shapes."""
        paths_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
        shapes = jax.tree_util.tree_leaves(shapes_tree)
        treedef = jax.tree_util.tree_structure(axes_tree, is_leaf=_is_axes)
        out = []
        for (path, axes), leaf in zip(paths_axes, shapes, strict=True):
            what = f"parameter '{path_str(path)}'"
            out.append(NamedSharding(mesh, self.spec(axes, leaf.shape, mesh, what)))
        return jax.tree_util.tree_unflatten(treedef, out)


def path_str(path: Sequence[Any]) -> str:
    """'blocks/attn/wq/kernel' for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


# --- parameter trees by path (shared by state, checkpoints and transforms) ---------------------

def tree_paths(tree: Any) -> list[str]:
    """Every leaf's path string (``blocks/attn/wq/kernel``), in leaf order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def tree_partition(tree: dict, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose path satisfies ``keep``, the rest), each as a nested dict of only its leaves."""
    yes: dict = {}
    no: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = yes if keep(path_str(path)) else no
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return yes, no


def tree_merge(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of :func:`tree_partition`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = tree_merge(out[key], value)
        elif key in out:
            raise ValueError(f"leaf '{key}' is in both trees")
        else:
            out[key] = value
    return out


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def explain(axes_tree: Any, shapes_tree: Any, rules: Rules, mesh: Mesh) -> Table:
    """Where every parameter lives: shape, logical axes, partition spec, and the shape and bytes
    each device holds, with per-device and total bytes as notes. ``str()`` of it is a text table;
    in a notebook it shows as HTML, ``.to_pandas()`` makes it a DataFrame."""
    shardings = rules.tree_shardings(axes_tree, shapes_tree, mesh)
    flat_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    rows, total, per_device = [], 0, 0
    for (path, axes), leaf, sh in zip(flat_axes, jax.tree_util.tree_leaves(shapes_tree),
                                      jax.tree_util.tree_leaves(shardings)):
        itemsize = np.dtype(leaf.dtype).itemsize
        local = sh.shard_shape(tuple(leaf.shape))
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(local) * itemsize
        rows.append((path_str(path), tuple(leaf.shape), axes, str(sh.spec), local, math.prod(local) * itemsize))
    notes = (f"{len(rows)} parameters on mesh {_fmt(dict(mesh.shape))}: {human_bytes(total)} in all, "
             f"{human_bytes(per_device)} on each device",)
    return Table(("parameter", "shape", "logical axes", "partition spec", "per-device shape", "per-device bytes"),
                 tuple(rows), notes)


def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds of a tree of ``jax.Array`` (what the shardings really placed)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return dict(sorted(out.items(), key=lambda kv: kv[0].id))


# --- activation constraints -------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "slimjax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While active (around tracing), :func:`constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing :func:`activation_rules`, or None outside one."""
    return _ACTIVE.get()


def split_of(name: str) -> tuple[tuple[str, ...], int]:
    """(mesh axes, ways) the active rules split logical ``name`` over; ((), 1) outside a context."""
    current = _ACTIVE.get()
    if current is None:
        return (), 1
    mesh, rules = current
    axes = tuple(rules.table.get(name, ()))
    return axes, math.prod(mesh.shape[a] for a in axes)


def per_device(fn: Callable[..., Any], in_names: Sequence[Any], out_names: Any) -> Callable[..., Any]:
    """``fn`` run on each device's blocks (``shard_map`` over the active mesh), its arguments and
    results split as the active rules split these logical names (one names tuple per array).

    Models use it for code that must see its own block and talk to other devices by axis name
    (ring attention); they still name dimensions logically and never see the mesh.
    """
    current = _ACTIVE.get()
    if current is None:
        raise SlimjaxError("per_device needs an activation_rules context (a mesh and rules to split by)")
    mesh, rules = current
    specs = lambda names: jax.tree.map(rules.spec, names, is_leaf=_is_axes)  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, in_specs=specs(tuple(in_names)), out_specs=specs(out_names), check_vma=False)


@contextlib.contextmanager
def replicated(*names: str) -> Iterator[None]:
    """Inside, the active rules replicate the logical ``names`` (no-op outside a rules context):
    the KV-cache path uses it for ``act_length``, whose one-token steps cannot be split."""
    current = _ACTIVE.get()
    if current is None:
        yield
        return
    with activation_rules(current[0], current[1].replicating(*names)):
        yield


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside :func:`activation_rules`.

    Models call this with names only; which mesh (if any) applies is decided by the caller.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = rules.spec(axes, x.shape, mesh, what=f"activation {tuple(axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _fmt(sizes: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{a}={s}" for a, s in sizes.items()) + ")"


# --- pipeline stages: the collectives a layer runner needs over the stage axis ----------------

STAGE_AXIS = "stage"


def constrain_staged(x: jax.Array, lead: Sequence[str | None], axes: Sequence[str]) -> jax.Array:
    """Like :func:`constrain` for an array whose leading dims are ``lead`` (a mesh axis such as
    :data:`STAGE_AXIS`, or None) followed by dims with the logical names ``axes`` (as many as
    are left); a no-op outside :func:`activation_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    rest = tuple(axes[: x.ndim - len(lead)])
    spec = rules.spec(rest, x.shape[len(lead):], mesh, what=f"activation {rest}")
    lead_spec = tuple(a if a is None or mesh.shape[a] > 1 else None for a in lead)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*lead_spec, *spec)))


def shift_stages(h: jax.Array, stages: int) -> jax.Array:
    """``h[s]`` (stage s's part of a ``[stages, ...]`` array) to stage s+1, the last to stage 0: a
    ``ppermute`` over :data:`STAGE_AXIS` inside ``shard_map`` (a roll without a mesh)."""
    active = _ACTIVE.get()
    if active is None or active[0].shape[STAGE_AXIS] == 1:
        return jax.numpy.roll(h, 1, axis=0)
    ring = [(i, (i + 1) % stages) for i in range(stages)]
    return jax.shard_map(lambda a: jax.lax.ppermute(a, STAGE_AXIS, ring), mesh=active[0],
                         in_specs=PartitionSpec(STAGE_AXIS), out_specs=PartitionSpec(STAGE_AXIS),
                         axis_names={STAGE_AXIS})(h)


def regroup_stages(a: jax.Array, stages: int, repeats: int, per_group: int) -> jax.Array:
    """A stacked weight ``[L, ...]`` (natural layer order, contiguous blocks on :data:`STAGE_AXIS`)
    as ``[S, R, K, ...]``: stage s, repeat r holds group ``r*S + s`` (layers ``(r*S + s)*K + k``).

    ``R = 1`` (GPipe) is a reshape. With ``S | R`` it is one ``all_to_all`` over the stage axis:
    stage s' holds groups ``s'*R + j1*S + j2`` (``j1 < R/S``, ``j2 < S``) and sends group j2 of each
    ``j1`` to stage ``j2``, which files it as repeat ``s'*R/S + j1``. Otherwise the compiler
    regroups (it gathers the stacked weight over the stage axis)."""
    rest = a.shape[1:]
    if repeats == 1:
        return _on_stages(a.reshape(stages, 1, per_group, *rest))
    active = _ACTIVE.get()
    if active is None or active[0].shape[STAGE_AXIS] == 1 or repeats % stages:
        return _on_stages(a.reshape(repeats, stages, per_group, *rest).swapaxes(0, 1))

    def local(block):  # this stage's R*K contiguous layers
        block = block.reshape(repeats // stages, stages, per_group, *rest)
        block = jax.lax.all_to_all(block, STAGE_AXIS, split_axis=1, concat_axis=0, tiled=True)
        return block.reshape(1, repeats, per_group, *rest)

    return jax.shard_map(local, mesh=active[0], in_specs=PartitionSpec(STAGE_AXIS),
                         out_specs=PartitionSpec(STAGE_AXIS), axis_names={STAGE_AXIS})(a)


def _on_stages(a: jax.Array) -> jax.Array:
    """Pins a stacked weight's leading (stage) dimension to the stage axis, leaving the rest to
    propagation (fsdp and tensor shard the weights' own dimensions)."""
    active = _ACTIVE.get()
    if active is None:
        return a
    rest = (PartitionSpec.UNCONSTRAINED,) * (a.ndim - 1)
    return jax.lax.with_sharding_constraint(a, NamedSharding(active[0], PartitionSpec(STAGE_AXIS, *rest)))
