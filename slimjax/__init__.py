"""slimjax: train Transformer LMs on a JAX device mesh, then make them smaller.

``slimjax.train(config, workdir)`` is the one entry point that the CLI, ``scripts/train.py`` and
notebooks share. Note that the name ``slimjax.train`` is that function; the subpackage of the
same name stays importable with ``from slimjax.train import loop`` (not ``import slimjax.train.loop
as ...``).
"""

__version__ = "0.1.0"

from slimjax.train.loop import train  # noqa: E402  (rebinds the name from the subpackage)

__all__ = ["train", "__version__"]
