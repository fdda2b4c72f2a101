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
import shutil
from typing import Any

import jax
from jax.sharding import Mesh

from slimjax.checkpoint import Checkpointer, reading_config
from slimjax.config import Config, DataConfig, from_saved
from slimjax.data import tokenizer as tokenizers
from slimjax.data.tokenizer import Tokenizer
from slimjax.errors import SlimjaxError
from slimjax.models import compute_dtype
from slimjax.sharding import Rules, make_mesh
from slimjax.slim.spec import Built, ModelSpec, build, export_fn, export_spec
from slimjax.train.metrics import write_json
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


base_checkpoint_config = reading_config


CONFIG_FILE = "config.py"  # a derived run as a --config file (training continues from it)


def write_run(rd: RunDir, out: str, cfg: Config, spec: ModelSpec, params: dict, slim: dict | None, summary: dict, *,
              kind: str, report_file: str, doc: str) -> None:
    """A run derived from ``rd`` (pruned, quantized): checkpoint 0 (params and transform state),
    the tokenizer, a ``config.py`` to continue from and the JSON ``summary``; all or nothing.

    ``kind`` keys the summary in the checkpoint metadata; ``doc`` is the config file's docstring
    (``{what}``: the summary's line, ``{path}``: the file)."""
    out = os.path.abspath(os.path.expanduser(out))
    data = cfg.data
    cached = tokenizers.cached_model_path(rd.workdir)
    if data.tokenizer_kind == "sentencepiece" and not data.tokenizer and cached.is_file():
        # The recovery run lives in another workdir: point it at this run's copy of the tokenizer.
        data = dataclasses.replace(data, tokenizer=str(tokenizers.cached_model_path(out)))
    cfg = dataclasses.replace(cfg, data=data, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=out))
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(out, exist_ok=True)
    try:
        if is_main and cached.is_file():
            os.makedirs(tokenizers.cached_model_path(out).parent, exist_ok=True)
            shutil.copyfile(cached, tokenizers.cached_model_path(out))
        checkpointer = Checkpointer(os.path.join(out, CHECKPOINT_DIR), base_checkpoint_config())
        meta = {"config": cfg.to_dict(), "spec": spec.to_json(), "step": 0,
                kind: {k: v for k, v in summary.items() if k != "layers"}}
        checkpointer.save_params(0, params, meta, slim=slim)
        checkpointer.wait()
        checkpointer.close()
        if is_main:
            write_json(os.path.join(out, report_file), summary)
            path = os.path.join(out, CONFIG_FILE)
            _write_config_file(path, cfg.to_dict(), doc.replace("{what}", summary["line"]).replace("{path}", path))
    except BaseException:
        if is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_config_file(path: str, resolved: dict, doc: str) -> None:
    """A ``get_config()`` file of a run's resolved config (training continues from it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'''"""{doc}"""

from slimjax.config import saved_config_dict

RESOLVED = {resolved!r}


def get_config():
    return saved_config_dict(RESOLVED)
''')
