"""``slimjax export``: a run's checkpoint -> a Hugging Face directory that ``transformers`` loads.

The model is built from the checkpoint's own spec. Transforms that bake into plain weights are
baked in first (LoRA adapters merged into their kernels), so a LoRA run exports as the merged
model; ``--adapters`` writes the adapters alone as a PEFT directory instead
(``adapter_model.safetensors`` + ``adapter_config.json``), for ``peft.PeftModel.from_pretrained``
on the base model. ``--sparse[=DIR]`` writes the exported parameters as a sparse store
(``slimjax.slim.sparse_store``; default ``<workdir>/sparse``, which ``slimjax report`` reads).
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

from slimjax.cli.flags import iter_flags, number_flag
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

USAGE = ("slimjax export --workdir=RUN (--out=DIR | --sparse[=DIR]) [--step=N] [--architecture=LlamaForCausalLM|"
         "MistralForCausalLM|GPT2LMHeadModel] [--adapters]   (--adapters: a LoRA run's adapters alone, as a PEFT "
         "directory; --sparse: the parameters as a sparse store, default DIR <workdir>/sparse)")
FLAGS = ("workdir", "out", "step", "architecture", "adapters", "sparse")


def run(argv: Sequence[str]) -> int:
    values = {}
    for name, value in iter_flags(argv, switches=frozenset({"adapters", "sparse"}), example="--out=DIR"):
        if name not in FLAGS:
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, FLAGS)}")
        values[name] = value
    step = None if values.get("step") is None else number_flag("step", values["step"])
    if "sparse" in values:
        if not values.get("workdir"):
            raise SlimjaxError(f"slimjax export needs --workdir; usage: {USAGE}")
        if "out" in values or "adapters" in values:
            raise SlimjaxError("--sparse writes a sparse store alone; run --out / --adapters as another export")
        return export_sparse(values["workdir"], values["sparse"], step)
    for need in ("workdir", "out"):
        if not values.get(need):
            raise SlimjaxError(f"slimjax export needs --{need}; usage: {USAGE}")
    out = os.path.abspath(values["out"])
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SlimjaxError(f"--out '{values['out']}' exists and is not an empty directory; give a new one")

    import jax

    from slimjax.cli.rundir import open_run
    from slimjax.interop import hf, hf_config

    arch = values.get("architecture")
    if arch is not None and arch not in hf_config.ARCHITECTURES:
        raise SlimjaxError(f"--architecture {arch!r} is not one of {', '.join(hf_config.ARCHITECTURES)}")
    rd = open_run(values["workdir"], step)
    if "adapters" in values:
        return export_adapters(rd, out)
    arch = arch or rd.meta.get("hf", {}).get("architecture")
    hf_config.family(rd.spec.model)  # an unexportable model fails before anything is read or written
    data = rd.cfg.data
    tokenizer = data.tokenizer if data.tokenizer_kind == "huggingface" and os.path.isfile(data.tokenizer) else None
    spec, params = rd.exported_params()
    if spec.recipe:
        raise SlimjaxError(f"run '{rd.workdir}' has transforms that a Hugging Face checkpoint cannot hold "
                           f"({', '.join(name for name, _ in spec.recipe)}); nothing was written")
    files = hf.export_hf(spec.model, params, out, architecture=arch, tokenizer=tokenizer)
    if jax.process_index() != 0:  # process 0 wrote the files
        return 0
    spm = os.path.join(rd.workdir, "tokenizer", "spm.model") if not data.tokenizer else data.tokenizer
    if data.tokenizer_kind == "sentencepiece" and os.path.isfile(spm):
        shutil.copyfile(spm, os.path.join(out, "tokenizer.model"))  # what LlamaTokenizer reads
        files.append("tokenizer.model")
    print(f"exported step {rd.step} of {rd.workdir} -> {out}: {', '.join(files)}")
    return 0


def export_adapters(rd, out: str) -> int:
    """Writes a LoRA run's adapters as a PEFT directory (Llama/Mistral)."""
    import jax

    from slimjax.interop import peft
    from slimjax.sharding import tree_partition
    from slimjax.slim.lora import is_adapter

    names = [name for name, _ in rd.spec.recipe]
    if names != ["lora"]:
        raise SlimjaxError(f"--adapters exports a LoRA run's adapters; run '{rd.workdir}' has slim recipe "
                           f"{tuple(names) or '()'}; export the whole model without --adapters")
    lora = dict(dict(rd.spec.recipe)["lora"])
    params = rd.restore_params()
    adapters, _ = tree_partition(params, is_adapter)
    targets = peft.adapted_targets(rd.spec.model, adapters)
    if "embed" in adapters:  # PEFT's embedding LoRA leaves a tied output layer unadapted: not the same model
        raise SlimjaxError(f"run '{rd.workdir}' adapts the embedding table, which the PEFT format cannot hold "
                           "with slimjax's meaning (tied output layer); export the merged model without --adapters")
    options = peft.LoraOptions(lora["rank"], lora["alpha"], lora["rslora"], lora["dropout"], targets)
    base = rd.meta.get("hf", {}).get("source", "")
    files = peft.export_adapter(rd.spec.model, adapters, options, out, base_model=base)
    if jax.process_index() == 0:
        print(f"exported the LoRA adapters of step {rd.step} of {rd.workdir} -> {out}: {', '.join(files)}")
    return 0


def export_sparse(workdir: str, directory: str | None, step: int | None) -> int:
    """Writes the run's exported parameters (adapters merged ...) as a sparse store, with the
    exported model spec and step in its index; 2:4 groups run along each matrix's input dim."""
    import jax
    from flax import nnx

    from slimjax.cli.rundir import open_run
    from slimjax.slim.sparse_store import matrix_axes, save_sparse
    from slimjax.slim.spec import build

    if jax.process_count() > 1:
        raise SlimjaxError("export --sparse gathers the parameters on one host; run it as a single process")
    rd = open_run(workdir, step)
    spec, params = rd.exported_params()
    built = build(spec)
    out = directory or os.path.join(rd.workdir, "sparse")
    summary = save_sparse(jax.device_get(params), out, axes=matrix_axes(nnx.merge(built.graphdef, built.shapes)),
                          meta={"spec": spec.to_json(), "step": rd.step, "source": rd.workdir})
    formats = ", ".join(f"{n} {f}" for f, n in summary["leaves"].items() if n)
    print(f"exported step {rd.step} of {rd.workdir} -> {out}: {summary['total_bytes']:,} bytes "
          f"({summary['dense_bytes']:,} dense; leaves: {formats})")
    return 0


