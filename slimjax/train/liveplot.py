"""A training hook that redraws the loss curve in a notebook while the run trains.

``slimjax.train(config, workdir, hooks=[slimjax.live_loss_plot()])`` replaces one figure in the
cell's output at every call (Jupyter, Colab); outside a notebook it does nothing visible, so the
same script runs anywhere. It reads the run's own ``metrics.jsonl``: what it draws is exactly what
TensorBoard and the final ``loss_curve.png`` show.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable

from slimjax.train.hooks import Hook, HookContext
from slimjax.train.metrics import METRICS_FILE, loss_figure, read_metrics


def live_loss_plot(every: int = 10, name: str = "live_plot",
                   show: Callable[[Any], None] | None = None) -> Hook:
    """A hook drawing train and eval loss so far every ``every`` steps and at the end.

    ``show(figure)`` displays each new figure; the default replaces the previous one in a
    notebook's cell output (IPython's ``clear_output(wait=True)`` then ``display``) and does
    nothing when no IPython kernel is running. The hook must come after the built-in log hook's
    records, which it does: user hooks run after the built-ins at each step.
    """
    show = show or _notebook_show

    def draw(ctx: HookContext) -> None:
        if not ctx.is_main:  # only process 0 writes the metrics it reads
            return
        records = read_metrics(os.path.join(ctx.run.workdir, METRICS_FILE))
        show(loss_figure(records, f"{os.path.basename(ctx.run.workdir.rstrip(os.sep))} (step {ctx.step})"))

    return Hook(every=every, fn=draw, name=name)


def _notebook_show(figure: Any) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Image, clear_output, display
    except ImportError:
        return
    if get_ipython() is None or not hasattr(get_ipython(), "kernel"):  # a terminal or plain Python
        return
    # As PNG bytes: a pyplot-free Figure has no image formatter unless the notebook set one up.
    png = io.BytesIO()
    figure.savefig(png, format="png")
    clear_output(wait=True)
    display(Image(data=png.getvalue(), format="png"))
