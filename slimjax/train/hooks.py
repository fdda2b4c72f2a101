"""Periodic work in the training loop: a callable with a cadence.

``slimjax.train(config, workdir, hooks=[Hook(...)])`` runs each user hook after the built-in ones
(log, eval, checkpoint, end-of-training sample), which are hooks too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import jax

from slimjax.errors import SlimjaxError

if TYPE_CHECKING:  # only for annotations: the loop builds the contexts
    from slimjax.train.metrics import MetricsWriter
    from slimjax.train.run import Run


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook sees when it runs.

    ``run`` is the live run: ``run.state`` (read ``run.state.params`` for the parameters), ``run.mesh``,
    ``run.rules``, ``run.tok``, ``run.workdir``, ``run.cfg``. Read the state during the call only:
    the next step donates its buffers.
    """

    step: int
    last: bool  # the last step of the run (``train.steps``)
    run: Run
    name: str  # the hook's name: the prefix of what ``write`` records
    _writer: MetricsWriter = dataclasses.field(repr=False)

    @property
    def is_main(self) -> bool:
        """Process 0, the one that writes files (hooks run on every process: collectives need all of them)."""
        return jax.process_index() == 0

    def write(self, scalars: Mapping[str, float], step: int | None = None) -> None:
        """Records ``{"<name>/<key>": value}`` at ``step`` (default: this step) in TensorBoard and
        ``metrics.jsonl``; only process 0 writes, so every process may call it."""
        self._writer.write(self.step if step is None else step, scalars, self.name)


@dataclasses.dataclass(frozen=True)
class Hook:
    """Calls ``fn(context)`` when ``step % every == 0`` and, if ``at_end``, at the last step.

    ``every=0`` means at the last step only. ``name`` prefixes the scalars the hook writes and
    names it in errors. A hook's wall time is left out of the reported step time unless
    ``in_step_time`` (the built-in log sets it: it closes the timing interval itself).
    """

    every: int
    fn: Callable[[HookContext], None]
    name: str
    at_end: bool = True
    in_step_time: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise SlimjaxError(f"hook name {self.name!r} must be a non-empty string without '/' (it prefixes "
                               "the scalars the hook writes)")
        if not isinstance(self.every, int) or self.every < 0:
            raise SlimjaxError(f"hook '{self.name}': every={self.every!r} must be an integer >= 0 "
                               "(0: at the last step only)")
        if not callable(self.fn):
            raise SlimjaxError(f"hook '{self.name}': fn={self.fn!r} is not callable; give a function of "
                               "one HookContext")
        if self.every == 0 and not self.at_end:
            raise SlimjaxError(f"hook '{self.name}': every=0 with at_end=False would never run")

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_end)


def check_hooks(hooks: Iterable[object], reserved: Iterable[str]) -> tuple[Hook, ...]:
    """The user's hooks as a tuple; anything that is not a ``Hook``, or a name used twice or by a
    built-in hook (its scalars would mix with theirs), is a SlimjaxError."""
    hooks, reserved = tuple(hooks), sorted(reserved)
    seen = set(reserved)
    for i, hook in enumerate(hooks):
        if not isinstance(hook, Hook):
            raise SlimjaxError(f"hooks[{i}] is a {type(hook).__name__}, not a slimjax.Hook; wrap the function: "
                               "Hook(every=N, fn=..., name=...)")
        if hook.name in seen:
            raise SlimjaxError(f"hook name '{hook.name}' is taken (built-in names: {', '.join(reserved)}); "
                               "give each hook its own name")
        seen.add(hook.name)
    return hooks
