"""slimjax: train Transformer LMs on a JAX device mesh, then make them smaller.

``slimjax.train(config, workdir, hooks=[slimjax.Hook(...)])`` is the one entry point that the CLI,
``scripts/train.py`` and notebooks share; hooks add periodic work to its loop. A trained run is
used through ``slimjax.load_run(workdir)`` (config, spec, sharded parameters, tokenizer, logits),
``slimjax.generate``, ``slimjax.evaluate`` and ``slimjax.evaluate_classifier``; bundled configs are ``slimjax.configs.<name>``.
``slimjax.explain(config)`` shows where a config's parameters would live on its mesh,
``slimjax.run_command(name, *flags)`` runs any ``slimjax`` command in-process (notebooks), and
``slimjax.live_loss_plot()`` is a hook that redraws the loss curve in a notebook while training. Note that the name
``slimjax.train`` is that function; the subpackage of the same name stays importable with
``from slimjax.train import loop`` (not ``import slimjax.train.loop as ...``).
"""

__version__ = "0.1.0"

from slimjax.logs import quiet_logging  # noqa: E402

quiet_logging()  # before JAX and Orbax are imported: their INFO lines are noise for a user

from slimjax.train.hooks import Hook, HookContext  # noqa: E402  (before the next line's rebinding)
from slimjax.train.loop import train  # noqa: E402  (rebinds the name from the subpackage)
from slimjax import configs, sharding  # noqa: E402  (attributes: slimjax.configs.tiny, slimjax.sharding.explain)
from slimjax.api import LoadedRun, evaluate, evaluate_classifier, explain, generate, load_run, run_command  # noqa: E402
from slimjax.train.liveplot import live_loss_plot  # noqa: E402

__all__ = ["train", "Hook", "HookContext", "live_loss_plot", "load_run", "LoadedRun", "generate", "evaluate",
           "evaluate_classifier", "explain", "run_command", "configs", "sharding", "__version__"]
