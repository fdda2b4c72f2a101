"""Asynchronous saves in one process: the checkpoint holds the bytes of the ``save`` call even when the
next step donates or overwrites the state at once, and a failed background save is raised, once."""

import dataclasses

import jax
import numpy as np
import pytest
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

from helpers import build_state, small_config, with_mesh
from slimjax.checkpoint import Checkpointer
from slimjax.sharding import path_str


def async_state():
    """(config, train state as a dict) on the 2x2x2 mesh, every moment leaf distinct from init."""
    cfg = with_mesh(small_config(), 2, 2, 2)
    _, _, _, state = build_state(cfg)
    state = dataclasses.replace(state, opt_state=jax.tree.map(lambda x: x + 0.25 if x.ndim else x, state.opt_state))
    return cfg, dataclasses.replace(cfg.checkpoint, async_save=True), state.as_dict()


@jax.jit
def _bump(tree):
    return jax.tree.map(lambda x: x + 1 if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, tree)


def test_save_keeps_the_bytes_of_the_call_when_the_next_step_donates_them(tmp_path):
    cfg, ck_cfg, state = async_state()
    want = jax.device_get(state)
    ck = Checkpointer(tmp_path, ck_cfg)
    ck.save(1, state, {"position": 1}, {"step": 1})
    # The "next train step", dispatched right after save() returns: it donates every array leaf,
    # so its outputs may reuse (overwrite) the very buffers that were passed to save().
    donate = jax.jit(_bump.__wrapped__, donate_argnums=0)
    state = donate(state)
    state = donate(state)
    jax.block_until_ready(state)
    ck.wait()
    _, _, setup, _ = build_state(cfg)
    got, data_state, meta = ck.restore(1, setup.abstract.as_dict())  # fingerprints verified here
    ck.close()
    assert data_state == {"position": 1} and meta["step"] == 1
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
        np.testing.assert_array_equal(np.asarray(leaf), flat_want[path], err_msg=path_str(path))
        assert np.asarray(leaf).dtype == flat_want[path].dtype


def test_save_keeps_host_leaves_of_the_call_when_they_are_overwritten(tmp_path):
    ck_cfg = dataclasses.replace(small_config().checkpoint, async_save=True)
    w = np.arange(6, dtype=np.float32)
    state = {"params": {"w": w}, "opt_state": {"m": -w}, "step": np.int32(1), "rng": np.zeros(2, np.uint32),
             "skipped": np.int32(0)}
    ck = Checkpointer(tmp_path, ck_cfg)
    ck.save(1, state, {}, {"step": 1})
    w[:] = 99  # in place, right after save() returned
    ck.wait()
    params = ck.restore_params(1, {"w": jax.ShapeDtypeStruct((6,), np.float32)})
    ck.close()
    np.testing.assert_array_equal(np.asarray(params["w"]), np.arange(6, dtype=np.float32))


def test_a_failed_background_save_is_raised_by_the_next_call_once(tmp_path):
    ck_cfg = dataclasses.replace(small_config().checkpoint, async_save=True)
    x = np.ones(4, np.float32)
    state = {"params": {"w": x}, "step": np.int32(1), "rng": np.zeros(2, np.uint32), "skipped": np.int32(0)}
    ck = Checkpointer(tmp_path, ck_cfg)
    ck.save(1, state, {}, {"step": 1})
    ck.save(1, state, {}, {"step": 1})  # returns; Orbax refuses the existing step on the worker thread
    with pytest.raises(StepAlreadyExistsError):
        ck.wait()
    ck.wait()  # raised once, not again
    ck.save(2, state, {}, {"step": 2})  # the checkpointer stays usable
    ck.save(2, state, {}, {"step": 2})
    with pytest.raises(StepAlreadyExistsError):
        ck.close()  # close raises it too, and still releases the threads
    assert Checkpointer(tmp_path, ck_cfg, read_only=True).all_steps() == [1, 2]
