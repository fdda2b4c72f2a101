"""``slimjax quantize``: post-training weight quantization of a run's checkpoint into a new run directory.

The new run's spec adds ``('quant', options)`` to the source's: the targeted kernels are stored as
integer codes (packed at 2-4 bits) plus float32 scales (and zero points), sharded by the kernel's
logical axes; eval, generate and report run from them (dequantize, then multiply) and export
writes the dequantized model. ``--method=gptq`` calibrates (sequentially, block by block) and
replaces round-to-nearest codes by GPTQ's. ``--budget_bits`` / ``--budget_bytes`` choose each
layer's width from ``--candidates`` by its measured sensitivity (``--sensitivity=loss``: the
calibration loss increase with only that layer quantized; ``output``: the layer's output error),
exactly under the budget; the
allocation is printed and saved in ``OUT/quantize.json``.

A stored-integer model does not train. Quantization-aware recovery runs on the float model:
``slimjax train --config.slim.recipe="('qat',)" --config.checkpoint.init_from=FLOAT_RUN ...``,
then ``slimjax quantize --workdir=THAT_RUN`` (its ``qat`` settings are dropped; give the same
``--bits``/``--group_size`` it trained with).

Everything is checked and computed before OUT is created; a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from slimjax.cli.flags import iter_flags, number_flag
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

USAGE = ("slimjax quantize --workdir=RUN --out=NEW_RUN [--bits=8|4|3|2] [--group_size=128] [--asymmetric=true] "
         "[--method=rtn|gptq] [--budget_bits=3.0 | --budget_bytes=N] [--candidates=2,3,4,8] [--target=REGEX ...] "
         "[--sensitivity=loss|output] [--calibration_samples=128] [--sequential=true|false] [--step=N]")
FLAGS = ("workdir", "out", "bits", "group_size", "asymmetric", "method", "budget_bits", "budget_bytes", "candidates",
         "target", "calibration_samples", "sensitivity", "sequential", "step")
REPORT_FILE = "quantize.json"


def _bool(name: str, text: str) -> bool:
    if text.lower() not in ("true", "false", ""):
        raise SlimjaxError(f"--{name}={text!r} must be true or false")
    return text.lower() != "false"


def parse(argv: Sequence[str]) -> dict:
    v: dict = {"bits": 8, "group_size": 0, "symmetric": True, "method": "rtn", "budget_bits": None,
               "budget_bytes": None, "candidates": (2, 3, 4, 8), "targets": [], "samples": 128, "sequential": True,
               "sensitivity": "loss",
               "step": None, "workdir": None, "out": None}
    for name, value in iter_flags(argv, example="--workdir=RUN"):
        if name not in FLAGS:
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, FLAGS)}")
        if name == "target":
            v["targets"].append(value)
        elif name in ("bits", "group_size", "budget_bytes", "step"):
            v[name] = number_flag(name, value, int)
        elif name == "calibration_samples":
            v["samples"] = number_flag(name, value, int)
        elif name == "budget_bits":
            v[name] = number_flag(name, value, float)
        elif name == "candidates":
            v[name] = tuple(number_flag(name, c, int) for c in value.split(",") if c.strip())
        elif name == "asymmetric":
            v["symmetric"] = not _bool(name, value)
        elif name == "sequential":
            v[name] = _bool(name, value)
        else:
            v[name] = value
    for name in ("workdir", "out"):
        if not v[name]:
            raise SlimjaxError(f"slimjax quantize needs --{name}; usage: {USAGE}")
    out = os.path.abspath(os.path.expanduser(v["out"]))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SlimjaxError(f"--out '{v['out']}' already exists and is not an empty directory; give a new directory")
    return v


def options(v: dict):
    from slimjax.slim.ptq import PtqOptions

    targets = tuple(v["targets"]) or PtqOptions().targets
    return PtqOptions(v["bits"], v["group_size"], v["symmetric"], v["method"], targets, v["budget_bytes"],
                      v["budget_bits"], v["candidates"], v["sensitivity"], v["sequential"])


def float_source(rd, opts) -> tuple:
    """(float spec, float params) of the source run: a plain run as it is, a QAT run without its
    view, a quantized run dequantized when the new scheme is compatible with its own."""
    names = [name for name, _ in rd.spec.recipe]
    if names in ([], ["qat"]):
        return dataclasses.replace(rd.spec, recipe=()), rd.restore_params()
    if names != ["quant"]:
        from slimjax.slim.spec import export_spec

        if not export_spec(rd.spec).recipe:  # pruned, distilled: their transforms bake into plain weights
            return rd.exported_params()
        raise SlimjaxError(f"run '{rd.workdir}' has slim recipe {names}; quantize a plain, QAT-trained or quantized "
                           "model (export LoRA runs first)")
    opts_old = dict(rd.spec.recipe[0][1])
    scheme = (opts_old["group_size"], opts_old["symmetric"])
    widest = opts.bits if not opts.adaptive else max(b for b in opts.candidates)
    if (opts.group_size, opts.symmetric) != scheme or widest > opts_old["bits"] or opts_old["layer_bits"]:
        raise SlimjaxError(f"run '{rd.workdir}' is already quantized (bits={opts_old['bits']}, group_size="
                           f"{scheme[0]}, {'symmetric' if scheme[1] else 'asymmetric'}"
                           f"{', per-layer widths' if opts_old['layer_bits'] else ''}); it can only be re-quantized "
                           "uniformly with the same --group_size and symmetry to at most as many bits; quantize the "
                           "float run instead")
    return rd.exported_params()


def run(argv: Sequence[str]) -> int:
    v = parse(argv)
    import jax

    from slimjax.cli.rundir import write_run
    from slimjax.cli.rundir import open_run
    from slimjax.config import QuantConfig
    from slimjax.slim import calibrate, ptq
    from slimjax.slim.quantize import check_bits

    opts = options(v)
    check_bits(opts.bits, "--bits")  # before reading anything heavy
    rd = open_run(v["workdir"], v["step"])
    spec, params = float_source(rd, opts)
    matrices = ptq.quant_matrices(spec, opts)
    ptq.check_options(opts, matrices, spec.model.scan_layers)
    log = lambda msg: print(f"slimjax quantize: {msg}", flush=True) if jax.process_index() == 0 else None  # noqa: E731
    batches = calibrate.calibration_batches(rd.cfg, rd.workdir, v["samples"]) if opts.calibrated else []
    new_spec, qparams, summary = ptq.quantize_params(spec, params, opts, rd.mesh, rd.rules, batches, progress=log)
    qopts = dict(new_spec.recipe[-1][1])
    quant_cfg = QuantConfig(**{**qopts, "targets": tuple(qopts["targets"]), "layer_bits": tuple(qopts["layer_bits"])})
    cfg = dataclasses.replace(rd.cfg, slim=dataclasses.replace(rd.cfg.slim, recipe=("quant",), quant=quant_cfg))
    kind = "adaptive" if opts.adaptive else f"int{opts.bits}"
    line = (f"quantized {len(matrices)} layer matrices ({kind}, {opts.method}, group_size={opts.group_size}, "
            f"{'symmetric' if opts.symmetric else 'asymmetric'}): {summary['bytes']:,} bytes, "
            f"{summary['bits_per_weight']:.3f} bits/weight")
    summary = {"source": rd.workdir, "source_step": rd.step, "calibration_samples": v["samples"] if batches else 0,
               "options": dataclasses.asdict(opts), **summary, "line": line}
    out = os.path.abspath(os.path.expanduser(v["out"]))
    doc = (f"A quantized run ({line}).\n\nIts kernels are stored integer codes, which do not train. Recover quality "
           "with quantization-aware training of the float run instead:\n  slimjax train --config.slim.recipe=\"('qat',)\" "
           f"--config.checkpoint.init_from={rd.workdir} --workdir=QAT_RUN ...\nthen slimjax quantize --workdir=QAT_RUN.\n")
    write_run(rd, out, cfg, new_spec, qparams, None, summary, kind="quantize", report_file=REPORT_FILE, doc=doc)
    if jax.process_index() == 0:
        print(ptq.allocation_table(summary))
        print(f"{line} -> {out}")
    return 0
