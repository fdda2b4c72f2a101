"""``slimjax export``: a run's checkpoint -> a Hugging Face directory that ``transformers`` loads.

The model is built from the checkpoint's own spec. Transforms that bake into plain weights are
baked in first (LoRA adapters merged into their kernels), so a LoRA run exports as the merged
model, and an encoder classifier (``classify``) as ``BertForSequenceClassification``;
``--adapters`` writes the adapters alone as a PEFT directory instead
(``adapter_model.safetensors`` + ``adapter_config.json``), for ``peft.PeftModel.from_pretrained``
on the base model. ``--sparse[=DIR]`` writes the exported parameters as a sparse store
(``slimjax.slim.sparse_store``; default ``<workdir>/sparse``, which ``slimjax report`` reads).
"""

from __future__ import annotations

import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, boolean, choice, integer
from slimjax.errors import SlimjaxError
from slimjax.interop import bert, hf_config

COMMAND = Command("export", "write a run's checkpoint as a Hugging Face directory, PEFT adapters or a sparse store", (
    Flag("workdir", "the run directory", metavar="RUN", required=True),
    Flag("out", "the new (or empty) Hugging Face directory", metavar="DIR"),
    Flag("sparse", "write the parameters as a sparse store instead (default DIR: <workdir>/sparse)", metavar="DIR",
         switch=True, const=""),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
    Flag("architecture", "Hugging Face class within the run's model family (default: the imported one, else "
         "LlamaForCausalLM, GPT2LMHeadModel or BertForPreTraining; an encoder classifier: "
         "BertForSequenceClassification)",
         choice(*hf_config.ARCHITECTURES, *bert.HEADS), metavar="CLASS"),
    Flag("adapters", "a LoRA run's adapters alone, as a PEFT directory", boolean, False, "true|false",
         switch=True),
), details="The model is built from the checkpoint's own spec; LoRA adapters are merged into their kernels first "
   "(--adapters: exported alone instead). --sparse writes the store that slimjax report reads.")


def run(argv: Sequence[str]) -> int:
    args = COMMAND.parse(argv)
    if args.sparse is not None:
        if args.out or args.adapters:
            raise SlimjaxError("--sparse writes a sparse store alone; run --out / --adapters as another export")
        return export_sparse(args.workdir, args.sparse, args.step)
    if not args.out:
        raise SlimjaxError("slimjax export needs --out=DIR (or --sparse); see slimjax export --help")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SlimjaxError(f"--out '{args.out}' exists and is not an empty directory; give a new one")

    import jax

    from slimjax.cli.rundir import open_run, run_tokenizer
    from slimjax.data import tokenizer as tokenizers
    from slimjax.interop import hf
    from slimjax.interop.tokenizer_files import export_tokenizer

    rd = open_run(args.workdir, args.step)
    if args.architecture:
        check_family(args.architecture, rd)
    if args.adapters:
        return export_adapters(rd, out)
    hf_config.family(rd.spec.model)  # an unexportable model fails before anything is read or written
    arch = args.architecture or rd.meta.get("hf", {}).get("architecture")
    data = rd.cfg.data
    tok_file = data.tokenizer or (str(tokenizers.cached_model_path(rd.workdir)) if data.tokenizer_kind == "sentencepiece" else "")
    # A run without a tokenizer file (an imported model that shipped none) exports the model alone.
    tok = run_tokenizer(data, rd.workdir, rd.cfg.model.vocab_size, "export") if (
        data.tokenizer_kind == "byte" or os.path.isfile(tok_file)) else None
    spec, params = rd.exported_params()
    classes = sequence_classes(spec)
    if spec.recipe and not classes:
        raise SlimjaxError(f"run '{rd.workdir}' has transforms that a Hugging Face checkpoint cannot hold "
                           f"({', '.join(name for name, _ in spec.recipe)}); nothing was written")
    files = hf.export_hf(spec.model, params, out, architecture=arch, classes=classes)
    if jax.process_index() != 0:  # process 0 wrote the files
        return 0
    if tok is not None:
        files += export_tokenizer(out, data.tokenizer_kind, tok.path, tok.bos_id, tok.eos_id)
    print(f"exported step {rd.step} of {rd.workdir} -> {out}: {', '.join(files)}")
    return 0


def sequence_classes(spec) -> tuple[str, ...]:
    """The class names of an encoder whose only transform left is ``classify`` (it exports as
    ``BertForSequenceClassification``); () for any other spec."""
    if spec.family == "encoder" and [name for name, _ in spec.recipe] == ["classify"]:
        return tuple(dict(dict(spec.recipe)["classify"])["classes"])
    return ()


def check_family(architecture: str, rd) -> None:
    """Refuses an ``--architecture`` of another model family than the run's (it would be replaced)."""
    family = hf_config.family(rd.spec.model)
    if hf_config.layout(architecture) != family:
        fits = [name for name in (*hf_config.ARCHITECTURES, *bert.HEADS) if hf_config.layout(name) == family]
        raise SlimjaxError(f"--architecture={architecture} is a {hf_config.layout(architecture)} model but run "
                           f"'{rd.workdir}' is a {family} model; give --architecture={' or '.join(fits)} or leave "
                           "the flag out; nothing was written")


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


