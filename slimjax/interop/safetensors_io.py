"""Reading and writing ``.safetensors`` files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw little-endian tensor bytes. Reading memory-maps each file and hands out
lazy NumPy views, so slicing a tensor reads only the bytes of that slice; writing takes the
header from shapes alone and then streams each tensor's bytes, so neither side ever needs the
whole model in host memory. A directory may hold one ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (Hugging Face's layout).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from slimjax.errors import SlimjaxError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
    """(header without ``__metadata__``, byte offset where tensor data starts), every tensor's
    entry checked against the file (see ``_check_entries``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if 8 + n > size:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        _check_entries(header, size - 8 - n)
    except (OSError, ValueError) as e:
        raise SlimjaxError(f"'{path}' is not a readable safetensors file: {e}; re-download or re-export "
                           "it") from None
    return header, 8 + n


def _check_entries(header: dict, data_bytes: int) -> None:
    """Every tensor has a known dtype, a shape of non-negative ints and a byte range inside the
    ``data_bytes`` after the header whose length is prod(shape) x itemsize; no two ranges
    overlap. A truncated or partly written file fails here, naming the first tensor it cuts."""
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise ValueError(f"tensor '{name}' has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {dtype!r}, which slimjax cannot read "
                             f"(known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor '{name}' has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor '{name}' has data_offsets {offsets!r}; expected [begin, end] with "
                             "0 <= begin <= end")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise ValueError(f"tensor '{name}' has {end - begin} bytes for shape {tuple(shape)} {dtype} "
                             f"({math.prod(shape) * DTYPES[dtype].itemsize} expected)")
        if end > data_bytes:
            raise ValueError(f"tensor '{name}' ends at data byte {end}, but the file holds only {data_bytes} "
                             "bytes of tensor data (truncated?)")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ValueError(f"tensors '{first}' and '{second}' overlap in the file")


class TensorFile:
    """One memory-mapped safetensors file: ``array(name)`` is a lazy view of one tensor."""

    def __init__(self, path: str):
        self.path = path
        self.header, self._data_start = _read_header(path)
        size = os.path.getsize(path)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        entry = self.header[name]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]  # checked against the file when it was opened
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        start = self._data_start + begin
        return self._map[start:start + end - begin].view(dtype).reshape(shape)


class TensorIndex:
    """Every tensor of a Hugging Face model directory, by name, whichever file holds it."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise SlimjaxError(f"'{index_path}' is not a safetensors index (needs a weight_map): {e}") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise SlimjaxError(f"'{directory}' has neither {SINGLE_FILE} nor {INDEX_FILE}; export the model "
                               "with safetensors (save_pretrained(..., safe_serialization=True))")
        self._files = {}
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                raise SlimjaxError(f"'{index_path}' lists '{file}', which is not in '{directory}'")
            self._files[file] = TensorFile(path)
        self._where: dict[str, TensorFile] = {}
        for file, tf in self._files.items():
            for name in tf.header:
                self._where[name] = tf
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self._files[file].header:
                    raise SlimjaxError(f"'{index_path}' places tensor '{name}' in '{file}', which does not hold it")

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype code ("BF16", "F32", ...)."""
        return self._where[name].header[name]["dtype"]

    def array(self, name: str) -> np.ndarray:
        """A lazy (memory-mapped) view of tensor ``name``; slicing it reads only that slice."""
        return self._where[name].array(name)


def _header_bytes(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> tuple[bytes, list[int]]:
    header, offset, sizes = {"__metadata__": {"format": "pt"}}, 0, []
    for name, shape, dtype in specs:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, sizes


def write_file(path: str, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[str], np.ndarray]) -> None:
    """Writes one safetensors file; ``fetch(name)`` is called once per tensor, in order.

    The file appears under its name only when complete (written to a temporary name first).
    """
    head, sizes = _header_bytes(specs)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        for (name, shape, dtype), size in zip(specs, sizes):
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor '{name}' has shape {array.shape}, header says {tuple(shape)}")
            array.tofile(f)  # the raw bytes, without another copy
    os.replace(tmp, path)


def write_model(directory: str, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                fetch: Callable[[str], np.ndarray], max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Hugging Face layout: ``model.safetensors``, or shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``. Returns the file names written."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    used = 0
    for spec in specs:
        size = math.prod(spec[1]) * np.dtype(spec[2]).itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    if len(shards) == 1:
        write_file(os.path.join(directory, SINGLE_FILE), shards[0], fetch)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        write_file(os.path.join(directory, file), shard, fetch)
        weight_map.update({name: file for name, _, _ in shard})
    total = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in specs)
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*names, INDEX_FILE]

