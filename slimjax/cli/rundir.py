"""A run workdir as the inference commands (import, export, eval) read and write it.

A run keeps its checkpoints in ``<workdir>/checkpoints`` and the resolved config and model spec
in each checkpoint's metadata; the model is always built from that spec (so LoRA adapters and
other transforms come back as they were trained). Reading a config back overlays it on configs/base.py, so a run written
before a key existed still loads (the new key takes its default).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
from jax.sharding import Mesh

from slimjax.checkpoint import Checkpointer
from slimjax.config import Config, DataConfig, from_saved, validate
from slimjax.configs import base
from slimjax.data import tokenizer as tokenizers
from slimjax.data.tokenizer import Tokenizer
from slimjax.errors import SlimjaxError
from slimjax.models import compute_dtype
from slimjax.sharding import Rules, make_mesh
from slimjax.slim.spec import Built, ModelSpec, build, export_fn, export_spec
from slimjax.train.run import CHECKPOINT_DIR, spec_of


@dataclasses.dataclass
class RunDir:
    """A run's checkpoint at one step: its config, model spec, metadata and the mesh to restore it onto."""

    workdir: str
    cfg: Config
    spec: ModelSpec
    step: int
    meta: dict[str, Any]
    checkpointer: Checkpointer
    mesh: Mesh
    rules: Rules

    @functools.cached_property
    def built(self) -> Built:
        """The saved spec's model (graphdef, logical axes, shapes), in the run's compute dtype."""
        return build(self.spec, compute_dtype(self.spec.model.dtype))

    def shardings(self) -> dict:
        """Every parameter's sharding by the rules on the mesh."""
        return self.rules.tree_shardings(self.built.axes, self.built.shapes, self.mesh)

    def restore_params(self) -> dict:
        """The step's parameters (trainable and frozen, one tree), each sharded by the rules on the mesh."""
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                self.built.shapes, self.shardings())
        return self.checkpointer.restore_params(self.step, abstract)

    def exported_params(self) -> tuple[ModelSpec, dict]:
        """(spec, parameters) with every transform that can be baked into plain weights baked in
        (LoRA adapters merged into their kernels), computed on the mesh by one jitted program."""
        target = export_spec(self.spec)
        target_built = build(target)
        out = self.rules.tree_shardings(target_built.axes, target_built.shapes, self.mesh)
        return target, jax.jit(export_fn(self.built), out_shardings=out)(self.restore_params())


def open_run(workdir: str, step: int | None = None) -> RunDir:
    """The latest (or given) checkpoint of ``workdir``; SlimjaxError naming what is missing."""
    path = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise SlimjaxError(f"--workdir '{workdir}' has no {CHECKPOINT_DIR}/ directory; give a run directory "
                           "written by `slimjax train` or `slimjax import`")
    checkpointer = Checkpointer(ckpt_dir, base_checkpoint_config())
    steps = checkpointer.all_steps()
    if not steps:
        raise SlimjaxError(f"--workdir '{workdir}' has no complete checkpoint in {ckpt_dir}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise SlimjaxError(f"--step {step} is not a checkpoint of '{workdir}'; it has steps "
                           f"{', '.join(map(str, sorted(steps)))}")
    meta = checkpointer.read_meta(step)
    cfg = from_saved(meta.get("config", {}))
    return RunDir(path, cfg, spec_of(meta), step, meta, checkpointer, make_mesh(cfg.mesh), Rules.from_config(cfg.mesh))


def run_tokenizer(data: DataConfig, workdir: str, vocab_size: int, command: str) -> Tokenizer:
    """The run's tokenizer (its ``data.tokenizer`` or the one cached in the workdir); never trains
    a new one: a model is only used with its own."""
    path = data.tokenizer
    if data.tokenizer_kind == "sentencepiece" and not path:
        path = os.path.join(workdir, "tokenizer", tokenizers.MODEL_NAME)
        if not os.path.isfile(path):
            raise SlimjaxError(f"run '{workdir}' has no cached tokenizer {path}; give --tokenizer=FILE")
    if data.tokenizer_kind == "huggingface" and not path:
        raise SlimjaxError(f"run '{workdir}' has no tokenizer.json; give --tokenizer=FILE")

    def no_training():
        raise SlimjaxError(f"slimjax {command} does not train tokenizers")

    return tokenizers.get_tokenizer(data.tokenizer_kind, path, workdir, vocab_size, data.tokenizer_type, no_training)


def base_checkpoint_config():
    """Checkpoint options for reading: the defaults (reading never deletes old steps)."""
    return validate(base.get_config()).checkpoint

