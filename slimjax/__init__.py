"""slimjax: train Transformer LMs on a JAX device mesh, then make them smaller.

``slimjax.train(config, workdir, hooks=[slimjax.Hook(...)])`` is the one entry point that the CLI,
``scripts/train.py`` and notebooks share; hooks add periodic work to its loop. Note that the name
``slimjax.train`` is that function; the subpackage of the same name stays importable with
``from slimjax.train import loop`` (not ``import slimjax.train.loop as ...``).
"""

__version__ = "0.1.0"

from slimjax.train.hooks import Hook, HookContext  # noqa: E402  (before the next line's rebinding)
from slimjax.train.loop import train  # noqa: E402  (rebinds the name from the subpackage)

__all__ = ["train", "Hook", "HookContext", "__version__"]
