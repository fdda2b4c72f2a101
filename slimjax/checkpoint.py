"""Orbax checkpoints: the train state (a plain dict of arrays), the data iterator's state and
JSON metadata (step, resolved config).

Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint is either whole or invisible. Restores take an abstract target whose leaves carry
``NamedSharding``s: each process reads only the shards its devices hold.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from slimjax.config import CheckpointConfig


class Checkpointer:
    """A thin, typed face over ``ocp.CheckpointManager`` for slimjax's state layout."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Starts writing ``state`` (arrays), ``data_state`` and ``meta`` (JSON) for ``step``.

        Device arrays are copied to host before this returns, so the caller may donate them.
        ``data_state`` is this process's data-iterator state (each process saves its own).
        """
        data_items = {k: ocp.args.JsonSave(v) for k, v in _all_data_states(data_state).items()}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), **data_items)
        return self._manager.save(step, args=args, force=True)

    def save_params(self, step: int, params: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Writes only ``params`` and ``meta`` for ``step`` (an imported model has no optimizer
        state); such a checkpoint serves ``restore_params`` (eval, export, ``checkpoint.init_from``)."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step`` ("step", the resolved "config", ...)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state: dict[str, Any]
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(state, data_state, meta) of ``step``, the state in the shapes and shardings of ``abstract_state``."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
                                  **{_data_item(): ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored.state, restored[_data_item()], restored.meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of ``step``, in the shapes and shardings of ``abstract_params``: the
        ``params`` item of a params-only checkpoint, or the params subtree of a train state."""
        if os.path.isdir(os.path.join(self.directory, str(step), "params")):
            args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            return self._manager.restore(step, args=args).params
        item = {"params": abstract_params}
        state = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                       partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(state=state)).state["params"]

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _data_item() -> str:
    """Each process keeps its own iterator state (its position in its own shard of the data)."""
    import jax

    return f"data_{jax.process_index()}"


def _all_data_states(data_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``data_<i>`` -> process i's iterator state, for every process.

    Orbax writes JSON items from the primary process only, so each process's state is gathered to
    all processes (every one must pass the same items to ``save``) and process 0 writes them all.
    """
    import jax

    if jax.process_count() == 1:
        return {_data_item(): data_state}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return {f"data_{i}": json.loads(gathered[i, :sizes[i]].tobytes()) for i in range(len(sizes))}
