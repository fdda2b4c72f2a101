"""Host buffers for import: float32 conversion in cache-sized blocks, on all host cores, into
memory the device takes as it is.

Three costs dominate reading a checkpoint into float32 parameters: converting a transposed view
of the memory map (reading it column by column misses the cache on every element), doing that
on one core, and handing the result to the device (a copy, unless the buffer is aligned as XLA
wants it, when the CPU backend adopts it without one). ``fill_float32`` converts block by block
along the source's outermost axis in memory, so each block of the file is read while it is in
cache, and spreads the blocks over a thread pool (NumPy releases the GIL while it converts);
``aligned_empty`` allocates buffers the CPU backend adopts.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np

# XLA's CPU backend adopts host buffers aligned to 64 bytes instead of copying them.
DEVICE_ALIGNMENT = 64
# Bytes of source per block: a few blocks of source and destination stay within L2.
BLOCK_BYTES = 1 << 17
# Below this many bytes of source, the thread pool costs more than it saves.
PARALLEL_BYTES = 1 << 20
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
WORKERS = min(8, os.cpu_count() or 1)

_pool: ThreadPoolExecutor | None = None


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a ``DEVICE_ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start:start + n].view(dtype).reshape(shape)


def _convert(dst: np.ndarray, src: np.ndarray) -> None:
    if src.dtype == BFLOAT16:  # bfloat16 is the top half of a float32: a 16-bit shift is exact
        np.left_shift(src.view(np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(dst, src, casting="same_kind")


def _blocks(dst: np.ndarray, src: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(dst, src) slices of about ``BLOCK_BYTES`` of source along ``src``'s outermost axis in memory."""
    sizes = [(abs(s), a) for a, (s, n) in enumerate(zip(src.strides, src.shape)) if n > 1]
    if not sizes:
        yield dst, src
        return
    axis = max(sizes)[1]
    step = max(1, BLOCK_BYTES // abs(src.strides[axis]))
    for start in range(0, src.shape[axis], step):
        block = (slice(None),) * axis + (slice(start, start + step),)
        yield dst[block], src[block]


def _convert_all(blocks: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in blocks:
        _convert(dst, src)


def fill_float32(dst: np.ndarray, src: np.ndarray) -> None:
    """Writes ``src`` (any layout, any float dtype) into the float32 array ``dst`` (same shape)."""
    fill_many([(dst, src)])


def fill_many(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """``fill_float32`` for every (dst, src) pair, the blocks of all of them shared among
    ``WORKERS`` threads in contiguous runs of about equal size."""
    global _pool
    blocks = [b for dst, src in pairs for b in _blocks(dst, src)]
    total = sum(src.nbytes for _, src in blocks)
    if WORKERS == 1 or total < PARALLEL_BYTES or len(blocks) == 1:
        _convert_all(blocks)
        return
    runs, run, size = [], [], 0
    for block in blocks:
        run.append(block)
        size += block[1].nbytes
        if size * WORKERS >= total * (len(runs) + 1):
            runs.append(run)
            run = []
    runs.append(run)
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="slimjax-fill")
    for done in [_pool.submit(_convert_all, r) for r in runs if r]:
        done.result()
