"""Orbax checkpoints of the train state, with retention, fingerprints and typed restore errors.

Layout of ``checkpoints/<step>/``: ``params`` (trainable parameters), ``frozen`` (frozen ones, e.g.
a LoRA run's base weights), ``slim`` (transform state such as masks), ``opt_state`` (separate
items, so a params-only restore reads only the parameters; an item with no arrays is not
written), ``train`` (step, RNG key data, skipped-update counter), ``data_<process>`` (each
process's data-iterator state, JSON) and ``meta`` (JSON: step, resolved config, the model spec
and a fingerprint of every array leaf).

Atomicity: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when every
item is complete, so a checkpoint is either whole or invisible; a leftover temporary directory
from a killed write is never listed as a step. Saves are asynchronous by default: in one process,
``save`` dispatches an on-device copy of the state (a snapshot, so the next step may donate or
overwrite the originals) and its fingerprints, and returns; a background thread then hands the
snapshot to Orbax, which copies it to host and writes it with its own threads. Memory cost: one
extra copy of the saved state on the devices from ``save`` until Orbax has copied it to host, on
top of Orbax's host copy. With several processes, Orbax's save (its barriers are device
collectives, which must be issued in the same order as the training step's on every process)
stays on the calling thread and returns once the arrays are copied off the devices. An error in
a background save is raised by the next ``save``, ``wait``, ``close`` or read of the checkpointer.

Orbax does not checksum array bytes, so a flipped byte inside a data file can restore silently.
Each save therefore records per-leaf fingerprints (two wrapping uint32 sums over the raw bits, the
second of a mixed copy of each word, computed on device, layout independent) and every restore
recomputes and compares them. They detect damaged bytes, not reordered elements.
"""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from slimjax.config import CheckpointConfig
from slimjax.errors import SlimjaxError
from slimjax.sharding import path_str, tree_merge, tree_partition

ARRAY_ITEMS = ("params", "frozen", "slim", "opt_state", "train")  # "step", "rng", "skipped" go in "train"
PARAM_ITEMS = ("params", "frozen")  # together: every parameter of the model
TRAIN_KEYS = ("step", "rng", "skipped")
LOWER_IS_BETTER = frozenset({"loss"})  # eval metrics (checkpoint.best_metric) where less wins; the others: more


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of eval ``metric`` beats ``best`` (None: nothing yet)."""
    return best is None or (value < best if metric in LOWER_IS_BETTER else value > best)


class Checkpointer:
    """A typed face over ``ocp.CheckpointManager`` for slimjax's state layout."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
        policies = [pp.LatestN(cfg.keep)]
        if cfg.keep_every:
            policies.append(pp.EveryNSteps(cfg.keep_every))
        if cfg.keep_best:
            metric = cfg.best_metric
            policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=metric in LOWER_IS_BETTER, n=cfg.keep_best,
                                     keep_checkpoints_without_metrics=False))
        # read_only only stops us creating the directory: Orbax's own read_only mode logs warnings
        # that would break the CLI's one-line errors, and restoring never writes anyway.
        options = ocp.CheckpointManagerOptions(
            create=not read_only, enable_async_checkpointing=cfg.async_save,
            preservation_policy=pp.AnyPreservationPolicy(policies))
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update(meta=ocp.JsonCheckpointHandler(),
                        **{f"data_{i}": ocp.JsonCheckpointHandler() for i in range(jax.process_count())})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # One worker: saves reach Orbax in order, and Orbax is only ever called by one thread at a time
        # (every other method first waits for the worker, see _settle).
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="slimjax-checkpoint")
                        if cfg.async_save and jax.process_count() == 1 else None)
        self._pending: Future | None = None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        self._settle()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint on disk, ascending."""
        self._settle()
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory of ``step``'s checkpoint (for messages and tests)."""
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any],
             eval_metrics: dict[str, float] | None = None) -> bool:
        """Starts writing ``state`` (arrays), ``data_state`` and ``meta`` (JSON) for ``step``.

        ``state`` has keys params, opt_state, step, rng, skipped. When this returns the caller may
        donate or overwrite the device arrays: the bytes saved are those of the call (a device
        snapshot, or Orbax's host copy; see the module docstring for the memory this costs).
        ``data_state`` is this process's data-iterator state (gathered from every process into
        ``data_<i>`` items). ``eval_metrics`` (this step's evaluation, if any) rank the checkpoint
        for ``keep_best`` by ``best_metric``. Returns True (Orbax's answer for a synchronous save).
        """
        items = {k: v for k, v in _split(state).items() if jax.tree.leaves(v)}
        metrics = {k: float(v) for k, v in eval_metrics.items()} if eval_metrics else None
        return self._submit(step, items, meta, _data_items(data_state), metrics)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step``: "step", "config" (resolved) and "fingerprints"."""
        restored = self._restore(step, meta=ocp.args.JsonRestore())
        return restored.meta

    def save_params(self, step: int, params: dict[str, Any], meta: dict[str, Any],
                    slim: dict[str, Any] | None = None) -> bool:
        """Writes only ``params`` (and the transforms' ``slim`` state, e.g. pruning masks) and
        ``meta`` for ``step`` (an imported or pruned model has no optimizer state); such a
        checkpoint serves ``restore_params`` (eval, export, ``checkpoint.init_from``)."""
        items = {"params": params, **({"slim": slim} if slim and jax.tree.leaves(slim) else {})}
        return self._submit(step, items, meta, {}, None)

    def _submit(self, step: int, items: dict[str, Any], meta: dict[str, Any], json_args: dict[str, Any],
                metrics: dict[str, float] | None) -> bool:
        """Saves the array ``items``, ``meta`` plus their fingerprints, and ``json_args`` for ``step``:
        on the worker thread from a device snapshot, or (no worker) through Orbax on this thread."""
        self._settle()
        # The fingerprints are dispatched on this thread, from the bytes handed to Orbax: they
        # describe exactly what is saved, and in several processes their collective keeps program order.
        if self._worker is None:
            pending = {k: _fingerprint_start(v) for k, v in items.items()}
        else:
            snapshots = {k: _snapshot(v) for k, v in items.items()}
            items, pending = {k: c for k, (c, _) in snapshots.items()}, {k: f for k, (_, f) in snapshots.items()}

        def write() -> bool:
            full = dict(meta, fingerprints={k: _fingerprint_finish(*p) for k, p in pending.items()})
            args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()},
                                      meta=ocp.args.JsonSave(full), **json_args)
            try:
                return self._manager.save(step, args=args, force=True, metrics=metrics)
            except OSError as e:
                raise SlimjaxError(f"cannot write checkpoint {self.step_dir(step)}: {e.strerror or e}; "
                                   "free space or choose a writable --workdir") from None

        if self._worker is None:
            return write()
        self._pending = self._worker.submit(write)
        return True

    def _settle(self) -> None:
        """Waits until the worker has handed its save to Orbax; raises that save's error, once."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def restore_slim(self, step: int, abstract_slim: dict[str, Any]) -> dict[str, Any] | None:
        """The transforms' state saved at ``step`` in the shapes and shardings of ``abstract_slim``,
        or None when the step holds none."""
        if not jax.tree.leaves(abstract_slim) or not self._saved_shapes(step, "slim"):
            return None
        meta = self.read_meta(step)
        self.check_shapes(step, "slim", abstract_slim)
        restored = self._restore(step, slim=ocp.args.StandardRestore(abstract_slim))
        self._verify(step, "slim", restored["slim"], meta)
        return restored["slim"]

    def restore(self, step: int, abstract_state: dict[str, Any]
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(state, data_state, meta) of ``step``, the state in the shapes and shardings of ``abstract_state``.

        Raises SlimjaxError naming the leaf for a shape mismatch and the item for corrupted bytes.
        """
        meta = self.read_meta(step)
        abstract_items = _split(abstract_state)
        for name in PARAM_ITEMS:
            self.check_shapes(step, name, abstract_items[name])
        wanted = {k: v for k, v in abstract_items.items() if jax.tree.leaves(v)}
        restored = self._restore(step, **{k: ocp.args.StandardRestore(v) for k, v in wanted.items()},
                                 **{_data_item(): ocp.args.JsonRestore()})
        items = {k: restored[k] if k in wanted else abstract_items[k] for k in ARRAY_ITEMS}
        for name in wanted:
            self._verify(step, name, items[name], meta)
        state = {k: items[k] for k in ARRAY_ITEMS if k != "train"} | items["train"]
        return state, restored[_data_item()], meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Every parameter of ``step`` (trainable and frozen, as one tree), into the shapes and
        shardings of ``abstract_params``."""
        meta = self.read_meta(step)
        self.check_shapes(step, PARAM_ITEMS, abstract_params)
        saved = {name: set(self._saved_shapes(step, name)) for name in PARAM_ITEMS}
        parts = {}
        for name in PARAM_ITEMS:  # each saved item holds a part of the tree: split the target alike
            part, _ = tree_partition(abstract_params, lambda p, name=name: p in saved[name])
            if jax.tree.leaves(part):
                parts[name] = part
        restored = self._restore(step, **{k: ocp.args.StandardRestore(v) for k, v in parts.items()})
        out: dict = {}
        for name in parts:
            self._verify(step, name, restored[name], meta)
            out = tree_merge(out, restored[name])
        return out

    def _saved_shapes(self, step: int, item: str) -> dict[str, tuple[int, ...]]:
        """{leaf path: shape} of a saved item ({} when the step did not write it)."""
        self._settle()
        try:
            saved = self._manager.item_metadata(step)[item]
        except KeyError:
            return {}
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
            raise SlimjaxError(f"cannot read {self.step_dir(step)}/{item}: {_first_line(e)}") from None
        return {} if saved is None else _shapes(saved)

    def check_shapes(self, step: int, item: str | tuple[str, ...], abstract: Any) -> None:
        """Every leaf of ``abstract`` exists in the saved ``item`` (or, for a tuple, in one of
        those items) with the same shape, and nothing else is there; else SlimjaxError."""
        names = (item,) if isinstance(item, str) else item
        saved, present = {}, []
        for name in names:
            shapes = self._saved_shapes(step, name)
            saved.update(shapes)
            present += [name] if shapes else []
        item = "+".join(present or names)  # for messages: the items this step wrote
        want = _shapes(abstract)
        where = f"{self.step_dir(step)}/{item}"
        for path, shape in want.items():
            if path not in saved:
                raise SlimjaxError(f"checkpoint {where} has no parameter '{path}' (it belongs to a different "
                                   "model); use a new --workdir or a matching checkpoint")
            if saved[path] != shape:
                raise SlimjaxError(f"checkpoint {where}: parameter '{path}' has shape {saved[path]} there and "
                                   f"{shape} in this model; use a new --workdir or a matching checkpoint")
        extra = sorted(set(saved) - set(want))
        if extra:
            raise SlimjaxError(f"checkpoint {where} has parameter '{extra[0]}' that this model lacks (it belongs "
                               "to a different model); use a new --workdir or a matching checkpoint")

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are on disk; raises the error of one that failed."""
        self._settle()
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and releases Orbax's threads; raises the error of a failed save."""
        try:
            self._settle()
        finally:
            if self._worker is not None:
                self._worker.shutdown()
            self._manager.close()

    def _restore(self, step: int, **items: Any) -> Any:
        self._settle()
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except SlimjaxError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for unreadable bytes
            raise SlimjaxError(f"cannot read checkpoint {self.step_dir(step)} ({', '.join(items)}): {_first_line(e)}; "
                               "the files are damaged or from another program: delete that step directory to "
                               "resume from an earlier one") from None

    def _verify(self, step: int, item: str, tree: Any, meta: dict[str, Any]) -> None:
        expected = meta.get("fingerprints", {}).get(item)
        if expected is None:
            return
        actual = fingerprints(tree)
        for path, value in actual.items():
            if expected.get(path) != value:
                raise SlimjaxError(
                    f"checkpoint {self.step_dir(step)}/{item} is corrupted: leaf '{path}' does not match the "
                    "fingerprint recorded when it was saved; delete that step directory to resume from an earlier "
                    "one")


def fingerprints(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum of bits, sum of mixed bits]} (uint32, wrapping), computed on device.

    Integer sums are exact and order independent, so the value does not depend on the sharding.
    """
    return _fingerprint_finish(*_fingerprint_start(tree))


def _fingerprint_start(tree: Any) -> tuple[list[str], jax.Array | None]:
    """(leaf paths, their fingerprints still on device): dispatched, not waited for."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return [], None
    leaves = [x for _, x in flat]
    return [path_str(p) for p, _ in flat], _fingerprint_fn(_mesh_of(leaves))(leaves)


def _snapshot(tree: Any) -> tuple[Any, tuple[list[str], jax.Array | None]]:
    """(a copy of ``tree`` that later writes to ``tree`` cannot reach, ``_fingerprint_start`` of it).

    Device leaves are copied on device by one program that also computes the fingerprints: it is
    dispatched, not waited for (XLA:CPU runs a program inline when it counts under 1000 flops, as
    a bare copy does; the fingerprints' arithmetic makes this one asynchronous there too), and
    later programs that donate or overwrite the originals wait for it to have read them (the
    runtime orders the uses of a buffer). Host leaves are copied here.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        return tree, ([], None)
    leaves = [x for _, x in flat]
    on_device = tuple(i for i, x in enumerate(leaves) if isinstance(x, jax.Array))
    copies, sums = _snapshot_fn(_mesh_of(leaves), tuple(leaves[i].sharding for i in on_device), on_device)(leaves)
    out = [x.copy() if isinstance(x, np.ndarray) else x for x in leaves]  # other host leaves: immutable scalars
    for i, c in zip(on_device, copies):
        out[i] = c
    return jax.tree.unflatten(treedef, out), ([path_str(p) for p, _ in flat], sums)


@functools.lru_cache(maxsize=16)
def _snapshot_fn(mesh: Mesh | None, shardings: tuple[jax.sharding.Sharding, ...], on_device: tuple[int, ...]):
    """The jitted snapshot program: copies of the ``on_device`` leaves in their own shardings, and
    the fingerprints of all leaves (replicated, as in ``_fingerprint_fn``)."""
    def impl(leaves: list[Any]) -> tuple[list[jax.Array], jax.Array]:
        return [jnp.copy(leaves[i]) for i in on_device], _fingerprint_impl(leaves)

    if mesh is None:
        return jax.jit(impl)
    return jax.jit(impl, out_shardings=(list(shardings), NamedSharding(mesh, PartitionSpec())))


def _mesh_of(leaves: list[Any]) -> Mesh | None:
    """The mesh of the first leaf laid out on one (None: every leaf on one device or on host)."""
    return next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)


def _fingerprint_finish(paths: list[str], sums: jax.Array | None) -> dict[str, list[int]]:
    """The fingerprints of ``_fingerprint_start`` fetched to host (waits for them)."""
    if sums is None:
        return {}
    host = np.asarray(jax.device_get(sums))
    return {p: [int(a), int(b)] for p, (a, b) in zip(paths, host)}


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(mesh: Mesh | None):
    """The jitted fingerprint program; its (tiny) output is replicated so every process can read it."""
    if mesh is None:
        return jax.jit(_fingerprint_impl)
    return jax.jit(_fingerprint_impl, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _fingerprint_impl(leaves: list[jax.Array]) -> jax.Array:
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:  # masks: bitcasts take numbers only
            x = x.astype(jnp.uint8)
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
        mixed = (bits ^ (bits >> 15)) * jnp.uint32(2654435761)
        # One variadic reduction for both sums: XLA fuses it with the elementwise terms, so no
        # temporary as large as the leaf is allocated (two separate sums would materialise both).
        sums = jax.lax.reduce((bits, mixed), (jnp.uint32(0), jnp.uint32(0)),
                              lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
        out.append(jnp.stack(sums))
    return jnp.stack(out)


def reading_config() -> CheckpointConfig:
    """Checkpoint options for reading another run: the defaults (reading never deletes old steps)."""
    from slimjax.config import validate
    from slimjax.configs import base

    return validate(base.get_config()).checkpoint


def resolve_source(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for the latest) from a run dir, a checkpoints dir or checkpoints/STEP."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    return path, None


def _split(state: dict[str, Any]) -> dict[str, Any]:
    items = {k: state.get(k, {}) for k in ARRAY_ITEMS if k != "train"}
    return items | {"train": {k: state[k] for k in TRAIN_KEYS}}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(p): tuple(x.shape) for p, x in flat}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _data_item() -> str:
    """Each process keeps its own iterator state (its position in its own shard of the data)."""
    return f"data_{jax.process_index()}"


def _data_items(data_state: dict[str, Any]) -> dict[str, Any]:
    """``data_<i>`` -> process i's iterator state (JSON save args), for every process.

    Orbax writes JSON items from the primary process only, so each process's state is gathered to
    all processes (every one must pass the same items to ``save``) and process 0 writes them all.
    """
    if jax.process_count() == 1:
        return {_data_item(): ocp.args.JsonSave(data_state)}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return {f"data_{i}": ocp.args.JsonSave(json.loads(gathered[i, :sizes[i]].tobytes())) for i in range(len(sizes))}
