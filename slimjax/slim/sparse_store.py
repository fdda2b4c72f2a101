"""A compact on-disk copy of a parameter tree whose pruned weights are exact zeros.

Each float leaf is stored in the smallest of the formats it qualifies for:

- ``dense``: the raw array (every leaf qualifies; non-float leaves always use it);
- ``bitmask`` (zeros are at least ``min_sparsity`` of the leaf): the non-zero values in
  row-major order plus one bit per element (``np.packbits``, row-major) saying where they go;
- ``2:4`` (also at least ``min_sparsity`` zeros, and every group of 4 consecutive elements along
  the leaf's input axis holds at most 2 non-zeros): 2 values per group plus their 2-bit
  positions, 4 positions per byte, i.e. ``4 x 2 + 0.5`` bytes per 4 float32 elements (0.53x).

On a tie 2:4 wins (it is the layout sparse hardware reads). Restoring is bit-exact: values are
copied, never recomputed, and when a leaf holds negative zeros (``w * mask`` makes them) the
sign bits of its unstored zeros are kept too (one bit per zero, only for such leaves).

Layout of the directory: ``index.json`` (format version, every leaf's path, shape, dtype,
format, tensors and a CRC-32 of each tensor's bytes) and ``tensors.safetensors`` (written by
``slimjax.interop.safetensors_io``). The directory is written under a temporary name and renamed
into place, so readers see a whole store or none. Saving reads the leaves to host memory: call
it from one process with fully addressable arrays.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from slimjax.errors import SlimjaxError
from slimjax.interop.safetensors_io import DTYPE_NAMES, DTYPES, TensorFile, write_file
from slimjax.sharding import path_str

INDEX_FILE = "index.json"
TENSOR_FILE = "tensors.safetensors"
FORMAT_NAME = "slimjax-sparse"
VERSION = 1
FORMATS = ("dense", "bitmask", "2:4")
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
GROUP = 4  # 2:4: at most 2 non-zeros in every group of 4


def matrix_axes(model: nnx.Module) -> dict[str, int]:
    """``{leaf path: axis}`` for every matrix layer's weight: its last input dim (after any
    stacked-layer dim), so 2:4 groups run along the input like sparse tensor cores read them.

    ``model`` may be abstract (``nnx.merge(built.graphdef, built.shapes)``): only metadata is read.
    """
    from slimjax.models.layers import Dense
    from slimjax.slim.select import MATRIX_LAYERS, weight

    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, MATRIX_LAYERS):
            w = weight(node)
            n_in, n_out = w.get_metadata()["matrix"]
            lead = len(w.shape) - n_in - n_out
            leaf = "kernel" if isinstance(node, Dense) else "embedding"
            out["/".join(map(str, (*path, leaf)))] = lead + n_in - 1
    return out


def _sign_bits(x: np.ndarray) -> np.ndarray:
    """The IEEE sign bit of each element (also for bfloat16, which NumPy's signbit may not know)."""
    bits = x.view(np.dtype(f"u{x.dtype.itemsize}"))
    return (bits >> (8 * x.dtype.itemsize - 1)).astype(bool)


def _pack2(idx: np.ndarray) -> np.ndarray:
    """Values 0..3 packed 4 per byte, the first in the low bits."""
    flat = np.concatenate([idx.reshape(-1).astype(np.uint8), np.zeros(-idx.size % 4, np.uint8)]).reshape(-1, 4)
    return (flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6).astype(np.uint8)


def _unpack2(packed: np.ndarray, n: int) -> np.ndarray:
    return np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:n]


def _groups(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as ``[groups, 4]`` along ``axis`` (moved last, then row-major)."""
    return np.moveaxis(x, axis, -1).reshape(-1, GROUP)


def _is_2_4(x: np.ndarray, axis: int | None) -> bool:
    if axis is None or x.ndim == 0 or not -x.ndim <= axis < x.ndim or x.shape[axis] % GROUP or not x.size:
        return False
    return bool(((_groups(x, axis) != 0).sum(axis=1) <= 2).all())


def _encode(x: np.ndarray, fmt: str, axis: int | None) -> dict[str, np.ndarray]:
    """The tensors that hold ``x`` in ``fmt``; zero-sign bits only when ``x`` has negative zeros."""
    if fmt == "dense":
        return {"dense": x.reshape(-1)}  # flat: safetensors writing turns a 0-d array into 1-d
    if fmt == "bitmask":
        flat = x.reshape(-1)
        stored = flat != 0
        out = {"values": flat[stored], "mask": np.packbits(stored)}
        unstored = flat[~stored]
    else:
        w = _groups(x, axis)
        # Non-zeros first (stable: in index order), then zeros fill the two slots of sparser groups.
        idx = np.argsort(w == 0, axis=1, kind="stable")[:, :2]
        stored = np.zeros(w.shape, bool)
        np.put_along_axis(stored, idx, True, axis=1)
        out = {"values": np.take_along_axis(w, idx, axis=1), "idx": _pack2(idx)}
        unstored = w[~stored]
    signs = _sign_bits(unstored)
    if signs.any():
        out["zero_signs"] = np.packbits(signs)
    return out


def _decode(t: dict[str, np.ndarray], fmt: str, shape: tuple[int, ...], dtype: np.dtype, axis: int | None,
            where: str) -> np.ndarray:
    """Inverse of ``_encode``; ``where`` names the leaf and file for errors about inconsistent tensors."""
    n = math.prod(shape)
    if fmt == "dense":
        if t["dense"].size != n:
            raise SlimjaxError(f"{where}: dense tensor has {t['dense'].size} elements, shape {shape} needs {n}")
        return np.array(t["dense"], dtype).reshape(shape)
    if fmt == "bitmask":
        stored = np.unpackbits(t["mask"], count=n).astype(bool) if n else np.zeros(0, bool)
        if t["mask"].size != -(-n // 8) or int(stored.sum()) != t["values"].size:
            raise SlimjaxError(f"{where}: the bitmask marks {int(stored.sum())} values but {t['values'].size} are "
                               "stored; the store is corrupt")
        out = np.zeros(n, dtype)
        out[stored] = t["values"]
    else:
        axis %= len(shape)
        moved = (*shape[:axis], *shape[axis + 1:], shape[axis])
        groups = n // GROUP
        if t["values"].shape != (groups, 2) or t["idx"].size != -(-2 * groups // 4):
            raise SlimjaxError(f"{where}: 2:4 tensors do not fit shape {shape}; the store is corrupt")
        idx = _unpack2(t["idx"], 2 * groups).reshape(groups, 2).astype(np.int64)
        out = np.zeros((groups, GROUP), dtype)
        stored = np.zeros((groups, GROUP), bool)
        np.put_along_axis(out, idx, t["values"], axis=1)
        np.put_along_axis(stored, idx, True, axis=1)
    if "zero_signs" in t:
        count = int((~stored).sum())
        signs = np.unpackbits(t["zero_signs"], count=count).astype(bool)
        out[~stored] = np.where(signs, -np.zeros((), dtype), np.zeros((), dtype))
    if fmt == "2:4":
        return np.moveaxis(out.reshape(moved), -1, axis)
    return out.reshape(shape)


def _nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in tensors.values())


def _leaves(params: Any) -> list[tuple[list, str, np.ndarray]]:
    """(path keys, path string, host array) per leaf; keys keep their type (int layer keys stay ints)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
        out.append((keys, path_str(path), np.asarray(jax.device_get(leaf))))
    return out


def _dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def save_sparse(params: dict, directory: str, *, min_sparsity: float = 0.3,
                axes: Mapping[str, int] | None = None, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``params`` (a nested dict of arrays) to ``directory`` in the smallest format per leaf.

    ``axes`` maps a leaf path (``blocks/attn/wq/kernel``) to the axis along which 2:4 groups run
    (:func:`matrix_axes` gives every matrix weight's input axis); a leaf without one uses axis
    ``ndim - 2`` (the input dim of a plain ``[..., d_in, d_out]`` matrix). An existing store at
    ``directory`` is replaced; any other non-empty directory is refused. ``meta`` (JSON-ready, e.g.
    the model spec and step) is kept in the index for :func:`read_meta`.

    Returns ``{"bytes": {format: payload bytes}, "leaves": {format: count}, "total_bytes"
    (every file of the store), "dense_bytes" (the tree as raw arrays), "per_leaf": {path:
    {"format", "sparsity", "bytes"}}}``.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise SlimjaxError(f"min_sparsity={min_sparsity} must be in [0, 1]")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or (
            os.listdir(directory) and not os.path.isfile(os.path.join(directory, INDEX_FILE)))):
        raise SlimjaxError(f"'{directory}' exists and is not a sparse store; give a new or empty directory")
    axes = dict(axes or {})
    entries, tensors, per_leaf = [], {}, {}
    by_format = {f: 0 for f in FORMATS}
    counts = {f: 0 for f in FORMATS}
    dense_bytes = 0
    for keys, name, x in _leaves(params):
        if x.dtype not in DTYPE_NAMES:
            raise SlimjaxError(f"leaf '{name}' has dtype {x.dtype}, which the sparse store cannot hold")
        dense_bytes += x.nbytes
        zeros = float((x == 0).mean()) if x.size and DTYPE_NAMES[x.dtype] in FLOAT_CODES else 0.0
        axis = axes.get(name, x.ndim - 2 if x.ndim >= 2 else None)
        candidates = {"dense": _encode(x, "dense", None)}
        if x.size and DTYPE_NAMES[x.dtype] in FLOAT_CODES and zeros >= min_sparsity:
            candidates["bitmask"] = _encode(x, "bitmask", None)
            if _is_2_4(x, axis):
                candidates["2:4"] = _encode(x, "2:4", axis)
        # Smallest wins; on a tie the later (more structured) format.
        fmt = min(reversed(list(candidates)), key=lambda f: _nbytes(candidates[f]))
        stored = {f"{name}::{part}": a for part, a in candidates[fmt].items()}
        tensors.update(stored)
        entries.append({"path": keys, "name": name, "shape": list(x.shape), "dtype": DTYPE_NAMES[x.dtype],
                        "format": fmt, "axis": axis if fmt == "2:4" else None,
                        "tensors": {k.rpartition("::")[2]: k for k in stored},
                        "crc32": {k: zlib.crc32(np.ascontiguousarray(a).tobytes()) for k, a in stored.items()}})
        size = _nbytes(stored)
        by_format[fmt] += size
        counts[fmt] += 1
        per_leaf[name] = {"format": fmt, "sparsity": zeros, "bytes": size}

    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        specs = [(k, tuple(a.shape), a.dtype) for k, a in tensors.items()]
        write_file(os.path.join(tmp, TENSOR_FILE), specs, tensors.__getitem__)
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT_NAME, "version": VERSION, "min_sparsity": min_sparsity,
                       "meta": dict(meta or {}), "leaves": entries}, f)
        total = _dir_bytes(tmp)
        if os.path.exists(directory):  # move the old store aside only once the new one is complete
            old = f"{directory}.old-{os.getpid()}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bytes": by_format, "leaves": counts, "total_bytes": total, "dense_bytes": dense_bytes,
            "per_leaf": per_leaf}


def _read_index(directory: str) -> dict[str, Any]:
    index_path = os.path.join(directory, INDEX_FILE)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT_NAME or not isinstance(index["leaves"], list):
            raise ValueError(f"format {index.get('format')!r} is not {FORMAT_NAME!r}")
    except FileNotFoundError:
        raise SlimjaxError(f"'{index_path}' is missing: '{directory}' is not a sparse store "
                           "(write one with save_sparse)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SlimjaxError(f"'{index_path}' is not a readable sparse-store index: {e}") from None
    return index


def read_meta(directory: str) -> dict[str, Any]:
    """The ``meta`` a store was saved with (``{}`` when none)."""
    return _read_index(directory).get("meta", {})


def load_sparse(directory: str) -> dict:
    """The tree :func:`save_sparse` wrote (NumPy arrays, bit-exact). A missing, truncated or
    damaged file is a SlimjaxError naming it."""
    index = _read_index(directory)
    leaves = index["leaves"]
    tensor_path = os.path.join(directory, TENSOR_FILE)
    if not os.path.isfile(tensor_path):
        raise SlimjaxError(f"'{tensor_path}' is missing; the sparse store '{directory}' is incomplete")
    tf = TensorFile(tensor_path)
    tree: dict = {}
    for entry in leaves:
        where = f"leaf '{entry['name']}' in '{tensor_path}'"
        parts = {}
        for part, key in entry["tensors"].items():
            if key not in tf.header:
                raise SlimjaxError(f"{where}: tensor '{key}' is missing; the file is corrupt")
            try:
                array = np.array(tf.array(key))
            except (ValueError, TypeError):  # a truncated file maps fewer bytes than the header says
                raise SlimjaxError(f"{where}: tensor '{key}' is cut short; the file is truncated") from None
            if zlib.crc32(array.tobytes()) != entry["crc32"][key]:
                raise SlimjaxError(f"{where}: tensor '{key}' fails its CRC-32 check; the file is corrupt")
            parts[part] = array
        value = _decode(parts, entry["format"], tuple(entry["shape"]), DTYPES[entry["dtype"]], entry["axis"], where)
        node = tree
        for k in entry["path"][:-1]:
            node = node.setdefault(k, {})
        node[entry["path"][-1]] = value
    return tree


def store_bytes(directory: str) -> int:
    """Bytes on disk of every file under ``directory`` (0 when it does not exist)."""
    return _dir_bytes(directory) if os.path.isdir(directory) else 0
