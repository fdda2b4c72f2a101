"""Parameter sources of import_hf: shards of stacked layers, reading ahead on one CPU device,
and identical parameters whichever way they are read."""

import jax
import ml_dtypes
import numpy as np
import pytest

from hf_models import save
from slimjax import config as C
from slimjax.configs import base
from slimjax.interop import hf
from slimjax.interop.host_arrays import DEVICE_ALIGNMENT
from slimjax.interop.sources import ParamSource, ReadAhead, host_is_the_device
from slimjax.sharding import Rules, make_mesh

RNG = np.random.default_rng(0)
LAYERS = [RNG.standard_normal((24, 16)).astype(ml_dtypes.bfloat16) for _ in range(4)]


def mesh_and_rules(data):
    c = base.get_config()
    c.mesh.data = data
    m = C.validate(c).mesh
    return make_mesh(m, jax.devices()[:data]), Rules.from_config(m)


@pytest.mark.parametrize("index", [(slice(None),) * 3, (slice(1, 3), slice(None), slice(8, 24)),
                                   (slice(3, 4), slice(0, 8), slice(None))])
def test_a_stacked_shard_reads_its_layers_slice(index):
    source = ParamSource(lambda i: LAYERS[i].T, layers=4)  # [out, in] -> [in, out], as a view
    assert source.shape() == (4, 16, 24)
    want = np.stack([w.T for w in LAYERS]).astype(np.float32)[index]
    np.testing.assert_array_equal(source.shard((4, 16, 24), index), want)
    np.testing.assert_array_equal(ParamSource(lambda _: LAYERS[1].T).whole(), LAYERS[1].T.astype(np.float32))


def test_read_ahead_gives_every_value_and_keeps_a_failure_for_its_own_parameter():
    def broken(_):
        raise ValueError("cannot read")

    ahead = ReadAhead({"a": ParamSource(lambda i: LAYERS[i], layers=4), "bad": ParamSource(broken),
                       "b": ParamSource(lambda _: LAYERS[2].T)})
    np.testing.assert_array_equal(ahead.get("a"), np.stack(LAYERS).astype(np.float32))
    np.testing.assert_array_equal(ahead.get("b"), LAYERS[2].T.astype(np.float32))
    with pytest.raises(ValueError, match="cannot read"):
        ahead.get("bad")
    ahead.cancel()  # nothing left pending: a no-op


def test_only_a_single_cpu_device_reads_ahead():
    assert host_is_the_device(mesh_and_rules(1)[0])
    assert not host_is_the_device(mesh_and_rules(2)[0])


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2"])
def test_read_ahead_and_per_shard_reads_give_identical_parameters(variant, tmp_path, monkeypatch):
    path = save(variant, str(tmp_path / variant), tokenizer=False)
    mesh, rules = mesh_and_rules(1)
    _, ahead = hf.import_hf(path, mesh, rules, dtype="float32")
    monkeypatch.setattr(hf, "host_is_the_device", lambda mesh: False)
    _, per_shard = hf.import_hf(path, mesh, rules, dtype="float32")
    leaves, want = jax.tree.leaves_with_path(ahead), jax.tree.leaves(per_shard)
    assert len(leaves) == len(want)
    for (key, got), ref in zip(leaves, want):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=jax.tree_util.keystr(key))
        assert got.unsafe_buffer_pointer() % DEVICE_ALIGNMENT == 0  # an adopted host buffer
