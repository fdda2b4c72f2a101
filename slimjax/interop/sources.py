"""Where each imported parameter's values come from, and reading them ahead of the model.

A :class:`ParamSource` reads one slimjax parameter's shard from lazy views of the memory-mapped
checkpoint (each layer's tensor in turn when the model stacks its layers), as float32.
``read_ahead`` converts whole parameters on a background thread, in order, while the caller
traces the model and checks the checkpoint: on a single CPU device the host buffers *are* the
device's buffers (adopted without a copy), so reading ahead costs no memory that the parameters
would not take anyway, and the conversion overlaps the tracing.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from slimjax.interop.host_arrays import aligned_empty, fill_float32, fill_many


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """One parameter: ``read(layer)`` gives a layer's tensor (or the only one, ``layer=None``) in
    slimjax's layout as a lazy view; ``layers`` is the layer count when they are stacked."""

    read: Callable[[int | None], np.ndarray]
    layer: int | None = None
    layers: int | None = None

    def shape(self) -> tuple[int, ...]:
        """The parameter's shape, from the checkpoint's views (without reading data)."""
        if self.layers is None:
            return tuple(self.read(self.layer).shape)
        return (self.layers, *self.read(0).shape)

    def shard(self, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """The float32 values at ``index`` of the parameter of ``shape``, in a buffer devices adopt."""
        out = aligned_empty(tuple(len(range(n)[i]) for n, i in zip(shape, index)))
        if self.layers is None:
            fill_float32(out, self.read(self.layer)[index])
        else:  # [layers, ...]: each layer's tensor, only this shard's slice of it
            fill_many([(out[j], self.read(i)[index[1:]]) for j, i in enumerate(range(self.layers)[index[0]])])
        return out

    def whole(self) -> np.ndarray:
        shape = self.shape()
        return self.shard(shape, (slice(None),) * len(shape))


def host_is_the_device(mesh: Mesh) -> bool:
    """True when the mesh is one CPU device, whose arrays are host buffers."""
    return mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"


class ReadAhead:
    """Every source's whole value, converted in order on one background thread (which spreads
    each over the conversion pool). ``get(path)`` waits for one; ``cancel()`` drops the rest."""

    def __init__(self, sources: dict):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="slimjax-read-ahead")
        self._values: dict[object, Future] = {path: self._thread.submit(src.whole) for path, src in sources.items()}
        self._thread.shutdown(wait=False)

    def get(self, path: object) -> np.ndarray:
        return self._values[path].result()

    def cancel(self) -> None:
        for value in self._values.values():
            value.cancel()
