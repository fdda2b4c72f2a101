"""Preemption: SIGTERM (how Cloud TPU VMs and most schedulers announce it) asks the loop to save
and stop at the next step boundary.

The handler only sets a flag; the loop polls it between steps, so a step is never interrupted
and the checkpoint holds a consistent state. On TPU, JAX's preemption sync point is also polled
so every host saves at the same step; elsewhere several processes agree on the step by combining
their flags at log steps.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np


class PreemptionWatch:
    """A context manager installing a SIGTERM handler for its duration (the previous one is restored)."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None
        self._installed = False
        self._tpu_sync = jax.default_backend() == "tpu"

    def __enter__(self) -> "PreemptionWatch":
        # signal.signal only works on the main thread; elsewhere (a notebook worker thread) the
        # caller's own handling stays in place.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def requested(self, step: int, agree: bool = True) -> bool:
        """True when the run should checkpoint ``step`` and stop.

        With several processes they must all stop at the same step (a checkpoint is written by
        all of them together), so the local flags are combined, but only at steps where ``agree``
        is set (the loop passes its log steps, which already wait for the device): a collective
        every step would stall the step pipeline.
        """
        from jax.experimental import multihost_utils

        if self._tpu_sync:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption service (single host without jax.distributed)
                self._tpu_sync = False
        if jax.process_count() == 1:
            return self.signalled
        if not agree:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.signalled))))
