"""Host-side conversion for import: bit-exact float32 from every layout the mappings produce,
in blocks and on the thread pool, into buffers the CPU backend adopts without a copy."""

import jax
import ml_dtypes
import numpy as np
import pytest

from slimjax.interop import host_arrays
from slimjax.interop.host_arrays import DEVICE_ALIGNMENT, aligned_empty, fill_float32, fill_many

RNG = np.random.default_rng(0)


def views(a):
    """A [rows, cols] tensor as the mappings view it: as is, transposed, and transposed with the
    output split into heads (Llama's q_proj -> wq) or the input split (o_proj -> wo)."""
    r, c = a.shape
    return {"same": a, "transpose": a.T, "split_out": a.T.reshape(c, 4, r // 4),
            "split_in": a.T.reshape(4, c // 4, r), "sliced": a.T[3:, 1:-1]}


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(48, 24), (1024, 640)])  # the larger crosses PARALLEL_BYTES
def test_every_layout_converts_bit_exactly(dtype, shape):
    src = RNG.standard_normal(shape).astype(dtype)
    for name, view in views(src).items():
        out = aligned_empty(view.shape)
        fill_float32(out, view)
        np.testing.assert_array_equal(out.view(np.uint32), view.astype(np.float32).view(np.uint32), err_msg=name)


def test_many_pairs_share_the_pool_and_each_gets_its_own_values(monkeypatch):
    monkeypatch.setattr(host_arrays, "WORKERS", 3)
    monkeypatch.setattr(host_arrays, "BLOCK_BYTES", 1 << 12)  # many blocks per tensor, runs across tensors
    layers = [RNG.standard_normal((512, 384)).astype(ml_dtypes.bfloat16) for _ in range(5)]
    out = aligned_empty((5, 384, 4, 128))
    fill_many([(out[j], w.T.reshape(384, 4, 128)) for j, w in enumerate(layers)])
    want = np.stack([w.T.reshape(384, 4, 128).astype(np.float32) for w in layers])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (7, 1, 33)])
def test_aligned_buffers_are_aligned_and_adopted_by_the_cpu_device(shape):
    buf = aligned_empty(shape)
    assert buf.shape == shape and buf.dtype == np.float32 and buf.flags.c_contiguous
    assert buf.ctypes.data % DEVICE_ALIGNMENT == 0
    buf[...] = RNG.standard_normal(shape)
    on_device = jax.device_put(buf, jax.devices("cpu")[0])
    np.testing.assert_array_equal(np.asarray(on_device), buf)
    if buf.size:  # no copy: the device array is the host buffer itself
        assert on_device.unsafe_buffer_pointer() == buf.ctypes.data
