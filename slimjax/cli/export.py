"""``slimjax export``: a run's checkpoint -> a Hugging Face directory that ``transformers`` loads."""

from __future__ import annotations

import os
import shutil
from typing import Sequence

from slimjax.cli.flags import iter_flags
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

USAGE = "slimjax export --workdir=RUN --out=DIR [--step=N] [--architecture=LlamaForCausalLM|MistralForCausalLM|GPT2LMHeadModel]"
FLAGS = ("workdir", "out", "step", "architecture")


def run(argv: Sequence[str]) -> int:
    values = {}
    for name, value in iter_flags(argv, example="--out=DIR"):
        if name not in FLAGS:
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, FLAGS)}")
        values[name] = value
    for need in ("workdir", "out"):
        if not values.get(need):
            raise SlimjaxError(f"slimjax export needs --{need}; usage: {USAGE}")
    step = _int_flag("step", values.get("step"))
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
    arch = arch or rd.meta.get("hf", {}).get("architecture")
    hf_config.family(rd.cfg.model)  # an unexportable model fails before anything is read or written
    data = rd.cfg.data
    tokenizer = data.tokenizer if data.tokenizer_kind == "huggingface" and os.path.isfile(data.tokenizer) else None
    files = hf.export_hf(rd.cfg.model, rd.restore_params(), out, architecture=arch, tokenizer=tokenizer)
    if jax.process_index() != 0:  # process 0 wrote the files
        return 0
    spm = os.path.join(rd.workdir, "tokenizer", "spm.model") if not data.tokenizer else data.tokenizer
    if data.tokenizer_kind == "sentencepiece" and os.path.isfile(spm):
        shutil.copyfile(spm, os.path.join(out, "tokenizer.model"))  # what LlamaTokenizer reads
        files.append("tokenizer.model")
    print(f"exported step {rd.step} of {rd.workdir} -> {out}: {', '.join(files)}")
    return 0


def _int_flag(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise SlimjaxError(f"--{name}={text!r} must be an integer") from None
