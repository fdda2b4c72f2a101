"""Preemption: SIGTERM (how Cloud TPU VMs and most schedulers announce it) asks the loop to save
and stop at the next step boundary.

The handler only sets a flag; the loop polls it between steps, so a step is never interrupted
and the checkpoint holds a consistent state. On TPU, JAX's preemption sync point is also polled
so every host saves at the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax


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

    def requested(self, step: int) -> bool:
        """True when the run should checkpoint ``step`` and stop."""
        if self._tpu_sync:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption service (single host without jax.distributed)
                self._tpu_sync = False
        return self.signalled
