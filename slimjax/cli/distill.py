"""``slimjax distill``: train a student against a teacher run.

The student is made from the teacher (``--layers=N``: N evenly spaced teacher layers, every
other weight copied) or is any run sharing the teacher's tokenizer (``--student=RUN``: a
structurally pruned, unstructured-pruned, quantized or factorised copy, whose own transforms
stay in force: distillation as their recovery step). The student trains in ``--out`` with
``slim.distill`` appended to its recipe; ``--out/config.py`` records everything (the teacher's
spec included), so re-running the same command, or ``slimjax train --config=OUT/config.py
--workdir=OUT``, resumes where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, integer, number, split_overrides
from slimjax.cli.flags import apply_override
from slimjax.config import Config, saved_config_dict, validate
from slimjax.errors import SlimjaxError

COMMAND = Command("distill", "train a student against a teacher run (re-run to resume)", (
    Flag("teacher", "the teacher run (trained or imported)", metavar="RUN", required=True),
    Flag("out", "the student's run directory (re-running the same command resumes it)", metavar="NEW_RUN",
         required=True),
    Flag("layers", "a student of N evenly spaced teacher layers, every other weight copied", integer(1), 0,
         metavar="N"),
    Flag("student", "an existing run as the student (pruned, quantized, factorised; same tokenizer)", metavar="RUN"),
    Flag("steps", "training steps of the student", integer(1), 300, metavar="N"),
    Flag("temperature", "softmax temperature T of the soft targets (the KL term is scaled by T^2)", number(), 2.0,
         metavar="T"),
    Flag("alpha", "weight of the KL term; the hard-label loss gets 1 - alpha", number(0.0), 0.5, metavar="A"),
    Flag("mse_probs", "beta: weight of MSE(softmax(z_s/T), softmax(z_t/T))", number(0.0), 0.0, metavar="B"),
    Flag("mse_logits", "gamma: weight of MSE(z_s, z_t)", number(0.0), 0.0, metavar="G"),
    Flag("hidden", "weight of last-hidden-state matching (a learned projection when widths differ)", number(0.0),
         0.0, metavar="W"),
    Flag("top_k", "KL over the teacher's k most likely tokens only (0: the whole vocabulary)", integer(0), 0,
         metavar="K"),
), details="Give exactly one of --layers and --student. --config.KEY=VALUE overrides set keys of the student's "
           "training config (e.g. --config.optimizer.learning_rate=1e-3). The student's run directory holds "
           "config.py with the teacher's spec recorded, so it resumes without the teacher's directory.")
OPTIONS = ("temperature", "alpha", "mse_probs", "mse_logits", "hidden", "top_k")
INIT_DIR = "student_init"  # inside --out: the student before distillation (a --layers student)


def parse(argv: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Flags -> (options, config overrides); SlimjaxError naming the flag."""
    rest, overrides = split_overrides(argv)
    args = COMMAND.parse(rest)
    if bool(args.layers) == bool(args.student):
        raise SlimjaxError("slimjax distill needs exactly one of --layers=N (a student from the teacher's layers) "
                           "and --student=RUN (an existing run as the student)")
    v = {"teacher": args.teacher, "out": args.out, "layers": args.layers, "student": args.student,
         "steps": args.steps, "options": {k: getattr(args, k) for k in OPTIONS}}
    return v, overrides


def run(argv: Sequence[str]) -> int:
    v, overrides = parse(argv)
    import jax

    import slimjax
    from slimjax.cli.flags import load_config_file

    out = os.path.abspath(os.path.expanduser(v["out"]))
    config_file = os.path.join(out, "config.py")
    if os.path.isfile(config_file):  # a distillation started earlier: resume it
        cfg = load_config_file(config_file)
        for dotted, value in overrides:
            apply_override(cfg, dotted, value)
        cfg = validate(cfg)
    else:
        if os.path.exists(out) and (not os.path.isdir(out) or set(os.listdir(out)) - {INIT_DIR}):
            raise SlimjaxError(f"--out '{v['out']}' exists and is not a distillation run (no config.py); give a new "
                               "directory")
        cfg = student_config(v, overrides, out)
    summary = slimjax.train(cfg, out)
    if jax.process_index() == 0:
        print(f"distilled: step {summary['final_step']}, train loss {summary['final_train_loss']:.4f}, "
              f"eval loss {summary['final_eval_loss']:.4f} -> {out}")
    return 0


def student_config(v: dict, overrides: list[tuple[str, str]], out: str) -> Config:
    """The student's training config (teacher attached, ``init_from`` its starting point), checked
    in full before the --layers student and ``out/config.py`` are written."""
    import shutil

    import jax

    from slimjax.cli.rundir import CONFIG_FILE, _write_config_file, open_run, write_run
    from slimjax.data import tokenizer as tokenizers
    from slimjax.slim import distill
    from slimjax.slim.spec import build, spec_from_config

    teacher = open_run(v["teacher"])
    teacher_spec = distill.teacher_spec_of(teacher.workdir)
    if v["student"]:
        base = open_run(v["student"])
        if _digest(base) != _digest(teacher):
            raise SlimjaxError(f"--student '{v['student']}' and --teacher '{v['teacher']}' use different tokenizers; "
                               "a student must share its teacher's tokenizer")
        plain, start, tokenizer = base.cfg, base.workdir, _tokenizer_file(base)
    else:
        exported_spec, params = teacher.exported_params()
        spec, params = distill.fewer_layers(exported_spec, params, v["layers"], teacher.mesh, teacher.rules)
        plain = dataclasses.replace(teacher.cfg, model=spec.model)
        start = os.path.join(out, INIT_DIR)
        copied = tokenizers.cached_model_path(start)  # write_run copies the teacher's cached tokenizer here
        tokenizer = str(copied) if _tokenizer_file(teacher) == str(tokenizers.cached_model_path(teacher.workdir)) \
            else _tokenizer_file(teacher)
    raw = saved_config_dict(plain.to_dict())
    raw.slim.recipe = tuple(n for n in plain.slim.recipe if n != "distill") + ("distill",)
    raw.slim.distill.teacher = teacher.workdir
    raw.slim.distill.teacher_spec = json.dumps(teacher_spec.to_json(), sort_keys=True)
    for key, value in v["options"].items():
        raw.slim.distill[key] = value
    raw.train.steps = v["steps"]
    raw.checkpoint.init_from = start
    raw.data.tokenizer = tokenizer
    for dotted, value in overrides:
        apply_override(raw, dotted, value)
    cfg = validate(raw)
    build(spec_from_config(cfg))  # the vocabulary and every option checked before anything is written
    if not v["student"]:
        shutil.rmtree(start, ignore_errors=True)  # a student_init left by a run killed before config.py
        layers = distill.evenly_spaced(teacher.spec.model.n_layers, v["layers"])
        write_run(teacher, start, plain, spec, params, None,
                  {"line": f"a {v['layers']}-layer student of {teacher.workdir} (its layers {layers})",
                   "layers": layers}, kind="student", report_file="student.json", doc="{what}.")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, CONFIG_FILE)
        _write_config_file(path, cfg.to_dict(), f"Distillation of {teacher.workdir} into {out}.\n\nResume: "
                           f"slimjax train --config={path} --workdir={out}\n")
    return cfg


def _tokenizer_file(rd) -> str:
    """The tokenizer file a run reads ("" for the byte tokenizer)."""
    from slimjax.data import tokenizer as tokenizers

    data = rd.cfg.data
    if data.tokenizer or data.tokenizer_kind != "sentencepiece":
        return data.tokenizer
    return str(tokenizers.cached_model_path(rd.workdir))


def _digest(rd) -> tuple[str, str | None]:
    """(tokenizer kind, sha256 of its file): runs with equal digests tokenize alike."""
    path = _tokenizer_file(rd)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if path and os.path.isfile(path) else None
    return rd.cfg.data.tokenizer_kind, digest
