"""``slimjax generate``: continue prompts with a trained run's latest checkpoint and tokenizer."""

from __future__ import annotations

import os
from typing import Any, Sequence

from slimjax.cli.flags import iter_flags
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

USAGE = ("slimjax generate --workdir=RUN (--prompt=TEXT ... | --prompts_file=FILE) [--max_new_tokens=64] "
         "[--temperature=0 (greedy)] [--top_k=0] [--top_p=1] [--repetition_penalty=1] [--seed=0] [--step=N] "
         "[--tokenizer=FILE]   (FILE: one prompt per line; default: the latest checkpoint and the run's tokenizer)")

# flag -> (type, default)
OPTIONS: dict[str, tuple[type, Any]] = {
    "max_new_tokens": (int, 64), "temperature": (float, 0.0), "top_k": (int, 0), "top_p": (float, 1.0),
    "repetition_penalty": (float, 1.0), "seed": (int, 0), "step": (int, None), "tokenizer": (str, None),
}


def parse(argv: Sequence[str]) -> tuple[str, list[str], dict[str, Any]]:
    """Flags -> (workdir, prompts, options); every problem is a SlimjaxError naming the flag."""
    workdir, prompts, files = None, [], []
    opts = {k: default for k, (_, default) in OPTIONS.items()}
    for name, value in iter_flags(argv, example="--prompt='Once upon a time'"):
        if name == "workdir":
            workdir = value
        elif name == "prompt":
            prompts.append(value)
        elif name == "prompts_file":
            files.append(value)
        elif name in OPTIONS:
            try:
                opts[name] = OPTIONS[name][0](value)
            except ValueError:
                raise SlimjaxError(f"--{name}={value!r} is not a valid {OPTIONS[name][0].__name__}") from None
        else:
            raise SlimjaxError(f"unknown flag --{name}"
                               f"{suggest(name, ['workdir', 'prompt', 'prompts_file', *OPTIONS])}")
    if not workdir:
        raise SlimjaxError(f"slimjax generate needs --workdir=RUN; usage: {USAGE}")
    for path in files:
        if not os.path.isfile(path):
            raise SlimjaxError(f"--prompts_file '{path}' does not exist; give a text file with one prompt per line")
        with open(path, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        raise SlimjaxError("slimjax generate needs --prompt=TEXT (repeatable) or a non-empty --prompts_file")
    return workdir, prompts, opts


def run(argv: Sequence[str]) -> int:
    workdir, prompts, opts = parse(argv)
    import dataclasses

    import jax

    from slimjax.cli.rundir import open_run, run_tokenizer
    from slimjax.infer.generate import Generator, complete
    from slimjax.infer.sampling import Sampling
    from slimjax.slim.spec import abstract_fn

    sampling = Sampling(opts["temperature"], opts["top_k"], opts["top_p"], opts["repetition_penalty"])
    rd = open_run(workdir, opts["step"])
    data = rd.cfg.data
    if opts["tokenizer"]:
        data = dataclasses.replace(data, tokenizer=opts["tokenizer"])
    tok = run_tokenizer(data, rd.workdir, rd.cfg.model.vocab_size, "generate")
    generator = Generator(rd.spec.model, rd.restore_params(), rd.mesh, rd.rules, abstract=abstract_fn(rd.spec))
    texts = complete(generator, tok, prompts, opts["max_new_tokens"], sampling, opts["seed"])
    if jax.process_index() == 0:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"--- {i + 1}/{len(prompts)} (step {rd.step})")
            print(prompt + text)
    return 0
