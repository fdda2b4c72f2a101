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

import argparse
import dataclasses
import os
from collections.abc import Sequence

from slimjax.cli.command import Command, Flag, boolean, choice, integer, number
from slimjax.cli.flags import check_new_dir
from slimjax.errors import SlimjaxError
from slimjax.slim.ptq import PtqOptions

REPORT_FILE = "quantize.json"
DEFAULT = PtqOptions()


def _widths(name: str, text: str) -> tuple[int, ...]:
    """``2,3,4`` -> (2, 3, 4); which widths are allowed is checked with the other options."""
    return tuple(integer()(name, c) for c in text.split(",") if c.strip())


COMMAND = Command("quantize", "post-training weight quantization of a run's checkpoint into a new run directory", (
    Flag("workdir", "the run to quantize (plain, QAT-trained or already quantized)", metavar="RUN", required=True),
    Flag("out", "the new run directory", metavar="NEW_RUN", required=True),
    Flag("bits", "code width: 2, 3, 4 or 8", integer(), DEFAULT.bits, metavar="B"),
    Flag("group_size", "input rows sharing a scale (0: one scale per output channel)", integer(), DEFAULT.group_size,
         metavar="N"),
    Flag("asymmetric", "a zero point per group and output column", boolean, not DEFAULT.symmetric,
         metavar="true|false", switch=True),
    Flag("method", "'rtn' (round to nearest) or 'gptq' (calibrated)", choice("rtn", "gptq"), DEFAULT.method,
         metavar="METHOD"),
    Flag("budget_bits", "choose each layer's width from --candidates under this many bits per weight",
         number(), metavar="BITS"),
    Flag("budget_bytes", "... or under this many bytes of targeted kernels", integer(), metavar="N"),
    Flag("candidates", "widths the budget chooses from", _widths, DEFAULT.candidates, metavar="B,B,..."),
    Flag("target", "regex on per-layer kernel paths (default: every block projection)", metavar="REGEX",
         repeated=True),
    Flag("sensitivity", "budget: a layer's cost is the calibration 'loss' increase or its 'output' error",
         choice("loss", "output"), DEFAULT.sensitivity, metavar="KIND"),
    Flag("calibration_samples", "calibration rows from the run's training data", integer(), 128, metavar="N"),
    Flag("sequential", "GPTQ: calibrate each block with the earlier blocks already quantized", boolean,
         DEFAULT.sequential, metavar="true|false"),
    Flag("step", "checkpoint step (default: the latest)", integer(), metavar="N"),
), details="""
    The new run stores the targeted kernels as integer codes plus scales; eval, generate and report
    run from them and export writes the dequantized model. A stored-integer model does not train:
    recover with slimjax train --config.slim.recipe="('qat',)" on the float run, then quantize that.
    Nothing is written unless everything succeeds.""")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Flags -> options; a used --out is refused before anything is read."""
    v = COMMAND.parse(argv)
    check_new_dir(v.out)
    return v


def options(v: argparse.Namespace):
    targets = tuple(v.target) or DEFAULT.targets
    return PtqOptions(v.bits, v.group_size, not v.asymmetric, v.method, targets, v.budget_bytes, v.budget_bits,
                      v.candidates, v.sensitivity, v.sequential)


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
    rd = open_run(v.workdir, v.step)
    spec, params = float_source(rd, opts)
    matrices = ptq.quant_matrices(spec, opts)
    ptq.check_options(opts, matrices, spec.model.scan_layers)
    log = lambda msg: print(f"slimjax quantize: {msg}", flush=True) if jax.process_index() == 0 else None  # noqa: E731
    batches = calibrate.calibration_batches(rd.cfg, rd.workdir, v.calibration_samples) if opts.calibrated else []
    new_spec, qparams, summary = ptq.quantize_params(spec, params, opts, rd.mesh, rd.rules, batches, progress=log)
    qopts = dict(new_spec.recipe[-1][1])
    quant_cfg = QuantConfig(**{**qopts, "targets": tuple(qopts["targets"]), "layer_bits": tuple(qopts["layer_bits"])})
    cfg = dataclasses.replace(rd.cfg, slim=dataclasses.replace(rd.cfg.slim, recipe=("quant",), quant=quant_cfg))
    kind = "adaptive" if opts.adaptive else f"int{opts.bits}"
    line = (f"quantized {len(matrices)} layer matrices ({kind}, {opts.method}, group_size={opts.group_size}, "
            f"{'symmetric' if opts.symmetric else 'asymmetric'}): {summary['bytes']:,} bytes, "
            f"{summary['bits_per_weight']:.3f} bits/weight")
    summary = {"source": rd.workdir, "source_step": rd.step,
               "calibration_samples": v.calibration_samples if batches else 0,
               "options": dataclasses.asdict(opts), **summary, "line": line}
    out = os.path.abspath(os.path.expanduser(v.out))
    doc = (f"A quantized run ({line}).\n\nIts kernels are stored integer codes, which do not train. Recover quality "
           "with quantization-aware training of the float run instead:\n  slimjax train --config.slim.recipe=\"('qat',)\" "
           f"--config.checkpoint.init_from={rd.workdir} --workdir=QAT_RUN ...\nthen slimjax quantize --workdir=QAT_RUN.\n")
    write_run(rd, out, cfg, new_spec, qparams, None, summary, kind="quantize", report_file=REPORT_FILE, doc=doc)
    if jax.process_index() == 0:
        print(ptq.allocation_table(summary))
        print(f"{line} -> {out}")
    return 0
