"""The sparse store: bit-exact round trips, the format each leaf gets, exact byte counts, errors."""

import os

import ml_dtypes
import numpy as np
import pytest

from slimjax.errors import SlimjaxError
from slimjax.slim.sparse_store import (
    INDEX_FILE,
    TENSOR_FILE,
    load_sparse,
    matrix_axes,
    save_sparse,
)


def unstructured(rng, shape, sparsity):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < sparsity] = 0.0
    return x


def two_four(rng, shape, axis):
    """Exactly 2 non-zeros in every group of 4 along ``axis`` (random positions per group)."""
    x = np.moveaxis(rng.standard_normal(shape).astype(np.float32), axis, -1).copy()
    groups = x.reshape(-1, 4)
    keep = np.argsort(rng.random(groups.shape), axis=1)[:, :2]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=1)
    groups[~mask] = 0.0
    return np.moveaxis(groups.reshape(x.shape), -1, axis)


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_bit_exact(got, want):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], dict):
            assert_bit_exact(got[k], want[k])
        else:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_array_equal(bits(got[k]), bits(want[k]), err_msg=k)


def test_round_trip_is_bit_exact_and_picks_the_smallest_format(tmp_path):
    rng = np.random.default_rng(0)
    signed = unstructured(rng, (24, 40), 0.6)
    signed *= (rng.random(signed.shape) > 0.5)  # w * mask: negative weights become -0.0
    assert (bits(signed) == 0x80000000).any()
    tree = {
        "dense": {"kernel": rng.standard_normal((16, 12)).astype(np.float32)},
        "half": {"kernel": unstructured(rng, (32, 48), 0.5)},
        "ninety": {"kernel": unstructured(rng, (3, 40, 24), 0.9)},
        "blocks": {"mlp": {"up": {"kernel": two_four(rng, (3, 32, 20), axis=1)}},  # stacked [L, d_in, d_out]
                   "attn": {"wq": {"kernel": two_four(rng, (2, 16, 4, 8), axis=1)}},  # axis given by the caller
                   "norm": {"scale": np.ones((3, 20), np.float32)}},
        "plain24": two_four(rng, (8, 6), axis=0),  # [d_in, d_out]: default axis ndim - 2
        "signed_zeros": signed,
        "bf16": unstructured(rng, (8, 64), 0.7).astype(ml_dtypes.bfloat16),
        "nan": np.array([np.nan, 0.0, -0.0, 1.0, 0.0, 0.0, np.inf, 0.0], np.float32),
        "ints": np.arange(12, dtype=np.int32).reshape(3, 4) * 0,
        "scalar": np.float32(2.5).reshape(()),
        "layers": {0: np.zeros((4, 4), np.float32), 1: unstructured(rng, (4, 4), 0.5)},  # int keys stay ints
    }
    summary = save_sparse(tree, str(tmp_path / "s"), axes={"blocks/attn/wq/kernel": 1})
    assert_bit_exact(load_sparse(str(tmp_path / "s")), tree)
    fmt = {k: v["format"] for k, v in summary["per_leaf"].items()}
    assert fmt["dense/kernel"] == "dense" and fmt["ints"] == "dense" and fmt["scalar"] == "dense"
    assert fmt["blocks/norm/scale"] == "dense"
    assert fmt["half/kernel"] == "bitmask" and fmt["ninety/kernel"] == "bitmask" and fmt["bf16"] == "bitmask"
    assert fmt["signed_zeros"] == "bitmask" and fmt["layers/0"] == "bitmask"
    assert fmt["blocks/mlp/up/kernel"] == "2:4" and fmt["blocks/attn/wq/kernel"] == "2:4" and fmt["plain24"] == "2:4"
    assert summary["per_leaf"]["half/kernel"]["sparsity"] == float((tree["half"]["kernel"] == 0).mean())
    assert summary["dense_bytes"] == sum(a.nbytes for a in [
        tree["dense"]["kernel"], tree["half"]["kernel"], tree["ninety"]["kernel"], tree["blocks"]["mlp"]["up"]["kernel"],
        tree["blocks"]["attn"]["wq"]["kernel"], tree["blocks"]["norm"]["scale"], tree["plain24"], signed,
        tree["bf16"], tree["nan"], tree["ints"], tree["scalar"], *tree["layers"].values()])
    assert sum(summary["bytes"].values()) == sum(v["bytes"] for v in summary["per_leaf"].values())
    disk = sum(os.path.getsize(tmp_path / "s" / f) for f in os.listdir(tmp_path / "s"))
    assert summary["total_bytes"] == disk


def test_two_four_only_along_its_axis_and_min_sparsity(tmp_path):
    rng = np.random.default_rng(1)
    x = two_four(rng, (3, 16, 8), axis=2)  # 2:4 along the output dim, not the default input axis
    summary = save_sparse({"w": x}, str(tmp_path / "a"))
    assert summary["per_leaf"]["w"]["format"] == "bitmask"
    summary = save_sparse({"w": x}, str(tmp_path / "b"), axes={"w": 2})
    assert summary["per_leaf"]["w"]["format"] == "2:4"
    assert_bit_exact(load_sparse(str(tmp_path / "b")), {"w": x})
    # 50% zeros stay dense when the threshold is above them.
    summary = save_sparse({"w": x}, str(tmp_path / "c"), min_sparsity=0.6)
    assert summary["per_leaf"]["w"]["format"] == "dense" and summary["leaves"]["dense"] == 1


def test_bytes_on_disk(tmp_path):
    rng = np.random.default_rng(2)
    n_in, n_out = 256, 128
    n = n_in * n_out
    dense = n * 4
    half = save_sparse({"w": unstructured(rng, (n_in, n_out), 0.5)}, str(tmp_path / "u"))
    nnz = n - round(half["per_leaf"]["w"]["sparsity"] * n)
    assert half["bytes"]["bitmask"] == nnz * 4 + n // 8  # values + one bit per element
    overhead = 2048  # index.json + safetensors header
    assert half["total_bytes"] < 0.6 * dense + overhead
    st = save_sparse({"w": two_four(rng, (n_in, n_out), 0)}, str(tmp_path / "t"))
    assert st["bytes"]["2:4"] == n // 2 * 4 + n // 8  # 2 f32 values + 2 x 2-bit positions per group of 4
    assert st["bytes"]["2:4"] / dense == 0.53125  # <= 0.5625: within f32 values + 2 bits per element
    assert st["total_bytes"] < 0.5625 * dense + overhead
    # A tree with nothing to compress costs its raw bytes.
    plain = save_sparse({"w": rng.standard_normal((n_in, n_out)).astype(np.float32)}, str(tmp_path / "d"))
    assert plain["bytes"]["dense"] == dense == plain["dense_bytes"]


def test_store_is_replaced_atomically_and_never_over_foreign_dirs(tmp_path):
    rng = np.random.default_rng(3)
    first = {"w": unstructured(rng, (8, 8), 0.5)}
    second = {"v": unstructured(rng, (4, 4), 0.9)}
    path = str(tmp_path / "store")
    save_sparse(first, path)
    save_sparse(second, path)
    assert_bit_exact(load_sparse(path), second)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no temporary or old copy left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SlimjaxError, match="is not a sparse store"):
        save_sparse(first, str(foreign))
    with pytest.raises(SlimjaxError, match="min_sparsity"):
        save_sparse(first, path, min_sparsity=1.5)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, raw):
    with open(path, "wb") as f:
        f.write(raw)


def test_damaged_or_missing_files_name_the_file(tmp_path):
    rng = np.random.default_rng(4)
    tree = {"a": unstructured(rng, (16, 16), 0.5), "b": two_four(rng, (16, 8), 0), "c": np.ones((5,), np.float32)}

    def fresh(name):
        path = str(tmp_path / name)
        save_sparse(tree, path)
        return path, os.path.join(path, TENSOR_FILE), os.path.join(path, INDEX_FILE)

    path, tensors, index = fresh("flip")
    raw = bytearray(read(tensors))
    raw[-3] ^= 0x10  # a flipped bit in the last tensor's data
    write(tensors, bytes(raw))
    with pytest.raises(SlimjaxError, match=f"{TENSOR_FILE}.*CRC-32"):
        load_sparse(path)

    path, tensors, index = fresh("cut")
    write(tensors, read(tensors)[:-40])
    with pytest.raises(SlimjaxError, match=f"{TENSOR_FILE}.*(truncated|CRC)"):
        load_sparse(path)

    path, tensors, index = fresh("gone")
    os.remove(tensors)
    with pytest.raises(SlimjaxError, match=f"'{tensors}' is missing"):
        load_sparse(path)

    path, tensors, index = fresh("noindex")
    os.remove(index)
    with pytest.raises(SlimjaxError, match=f"'{index}' is missing"):
        load_sparse(path)

    path, tensors, index = fresh("badindex")
    write(index, b"{not json")
    with pytest.raises(SlimjaxError, match=f"'{index}' is not a readable"):
        load_sparse(path)


def test_matrix_axes_are_the_last_input_dim():
    from flax import nnx
    from helpers import small_config

    from slimjax.slim.spec import build, spec_from_config

    built = build(spec_from_config(small_config()))
    axes = matrix_axes(nnx.merge(built.graphdef, built.shapes))
    # stacked [L, d_model, heads, head_dim]: input is dim 1; wo [L, heads, head_dim, d_model]: last input dim 2
    assert axes["blocks/attn/wq/kernel"] == 1 and axes["blocks/attn/wo/kernel"] == 2
    assert axes["blocks/mlp/down/kernel"] == 1 and axes["lm_head/kernel"] == 0 and axes["embed/embedding"] == 0
