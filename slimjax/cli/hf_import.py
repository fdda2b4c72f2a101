"""``slimjax import``: a Hugging Face model directory -> a run workdir (checkpoint, config, tokenizer).

The workdir serves ``slimjax eval``, ``slimjax export`` and fine-tuning by pointing a new run's
``checkpoint.init_from`` at it. With ``--adapter`` a PEFT LoRA directory is imported on top of
the base model: the checkpoint's model spec then carries the LoRA transform (its rank, alpha,
rsLoRA flag and targets), so eval, generate, export (merged or ``--adapters``) and fine-tuning
use the adapted model. Parameters stream from the safetensors straight into their
shardings on the mesh (``slimjax.interop.hf.import_hf``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

from slimjax.cli.command import Command, Flag, choice
from slimjax.errors import SlimjaxError

COMMAND = Command("import", "turn a Hugging Face model directory (and a PEFT LoRA adapter) into a run directory", (
    Flag("hf_dir", "config.json + *.safetensors [+ tokenizer.json] of a Llama, Mistral, GPT-2 or BERT model", metavar="DIR",
         required=True),
    Flag("workdir", "the new run directory", metavar="RUN", required=True),
    Flag("adapter", "a LoRA adapter made with peft for that model, imported on top of it", metavar="PEFT_DIR"),
    Flag("dtype", "the run's compute dtype (model.dtype): auto is bfloat16 on GPU/TPU, float32 on CPU; float32 "
                  "to compare with a float32 reference", choice("auto", "float32", "bfloat16", "float16"), "auto"),
), details="The run serves eval, generate, export and fine-tuning (--config=RUN/config.py "
   "--config.checkpoint.init_from=RUN).")
CONFIG_FILE = "config.py"  # the imported model as a --config file (for fine-tuning with checkpoint.init_from)


def run(argv: Sequence[str]) -> int:
    args = COMMAND.parse(argv)
    hf_dir, workdir = os.path.abspath(args.hf_dir), os.path.abspath(args.workdir)
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise SlimjaxError(f"--workdir '{args.workdir}' exists and is not empty; give a new directory")

    import jax
    from jax.experimental import multihost_utils

    from slimjax.checkpoint import Checkpointer
    from slimjax.cli.rundir import base_checkpoint_config
    from slimjax.config import validate
    from slimjax.data.hf_tokenizer import HFTokenizer
    from slimjax.interop import hf, hf_config
    from slimjax.sharding import Rules, make_mesh
    from slimjax.slim.spec import ModelSpec, spec_from_config
    from slimjax.train.run import CHECKPOINT_DIR

    raw = hf_config.read_config(hf_dir)
    arch = hf_config.architecture(raw)
    c = hf.base_config(raw)
    c.model.dtype = args.dtype
    tok_src = os.path.join(hf_dir, hf.TOKENIZER_FILE)
    tok_dst = os.path.join(workdir, "tokenizer", hf.TOKENIZER_FILE)
    c.data.tokenizer_kind = "huggingface"
    c.data.tokenizer = tok_dst if os.path.isfile(tok_src) else ""
    cfg = validate(c)
    if os.path.isfile(tok_src):  # fail now, before writing anything, if slimjax cannot use it
        n_ids = HFTokenizer(tok_src).vocab_size
        if n_ids > cfg.model.vocab_size:
            raise SlimjaxError(f"'{tok_src}' has {n_ids} ids but config.json's vocab_size is "
                               f"{cfg.model.vocab_size}; the tokenizer does not belong to this model")
    if jax.process_count() > 1:  # every process has checked --workdir before process 0 creates it
        multihost_utils.sync_global_devices("slimjax import: workdir checked")
    mesh, rules = make_mesh(cfg.mesh), Rules.from_config(cfg.mesh)
    model_cfg, params = hf.import_hf(hf_dir, mesh, rules)
    model_cfg = dataclasses.replace(model_cfg, dtype=cfg.model.dtype)  # the weights' dtype is the file's; compute is ours
    spec = ModelSpec(model_cfg.family, model_cfg, spec_from_config(cfg).recipe)  # a classifier: ("classify",)
    if args.adapter:  # read and checked against the model before anything is written
        cfg, spec, params = with_adapter(args.adapter, c, model_cfg, params, mesh, rules)

    is_main = jax.process_index() == 0  # the checkpoint is written by all processes, files by process 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    try:
        if is_main and os.path.isfile(tok_src):
            os.makedirs(os.path.dirname(tok_dst), exist_ok=True)
            shutil.copyfile(tok_src, tok_dst)
        checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), base_checkpoint_config())
        checkpointer.save_params(0, params, {"config": cfg.to_dict(), "spec": spec.to_json(), "step": 0,
                                             "hf": {"architecture": arch, "source": hf_dir}})
        checkpointer.wait()
        checkpointer.close()
        if is_main:
            write_config_file(os.path.join(workdir, CONFIG_FILE), cfg, arch, hf_dir)
    except BaseException:
        if is_main:
            shutil.rmtree(workdir, ignore_errors=True)  # the directory was new: leave nothing half-written
        raise
    if not is_main:
        return 0
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    note = "" if os.path.isfile(tok_src) else " (no tokenizer.json: give eval --tokenizer=FILE)"
    print(f"imported {arch} ({n_params:,} parameters, {model_cfg.n_layers} layers) from {hf_dir} -> "
          f"{workdir}{note}")
    return 0


def with_adapter(adapter_dir: str, c, model_cfg, base: dict, mesh, rules):
    """(config, LoRA model spec, base + adapter parameters on the mesh) for a PEFT LoRA directory."""
    import jax

    from slimjax.config import validate
    from slimjax.interop import peft
    from slimjax.sharding import tree_merge, tree_partition
    from slimjax.slim.lora import is_adapter
    from slimjax.slim.spec import build, spec_from_config

    options, adapters = peft.import_adapter(os.path.abspath(adapter_dir), model_cfg)
    c.slim.recipe = ("lora",)
    c.slim.lora.update(rank=options.rank, alpha=options.alpha, rslora=options.rslora, dropout=options.dropout,
                       targets=peft.slim_patterns(options.targets, model_cfg))
    cfg = validate(c)
    spec = spec_from_config(cfg)
    built = build(spec)
    shardings, _ = tree_partition(rules.tree_shardings(built.axes, built.shapes, mesh), is_adapter)
    if jax.tree.structure(shardings) != jax.tree.structure(adapters):
        raise SlimjaxError(f"the adapter in '{adapter_dir}' does not cover the layers its own target_modules "
                           "name in this model; re-save it with peft")
    placed = jax.tree.map(lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]),
                          adapters, shardings)
    return cfg, spec, tree_merge(base, placed)


def write_config_file(path: str, cfg, arch: str, hf_dir: str) -> None:
    """A ``get_config()`` file: configs/base.py with the imported model and tokenizer keys."""
    keys = cfg.to_dict()
    data = {k: keys["data"][k] for k in ("tokenizer_kind", "tokenizer", "seq_len")}
    extra = ""
    if cfg.model.family == "encoder":  # its own terms (configs/base.py weighs next-token prediction)
        extra += f"\n    c.objective.update({keys['objective']!r})"
    if "classify" in cfg.slim.recipe:  # a sequence classifier (fine-tuning it needs labelled data.sources too)
        extra += f"\n    c.slim.recipe, c.slim.classify.classes = {cfg.slim.recipe!r}, {cfg.slim.classify.classes!r}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'''"""The {arch} imported from {hf_dir}, as a slimjax config.

Fine-tune: slimjax train --config={path} --config.checkpoint.init_from={os.path.dirname(path)} --workdir=NEW_RUN
"""

from slimjax.configs import base

MODEL = {keys["model"]!r}
DATA = {data!r}


def get_config():
    c = base.get_config()
    c.model.update(MODEL)
    c.data.update(DATA){extra}
    return c
''')
