"""``slimjax generate``: continue prompts with a trained run's latest checkpoint and tokenizer."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, integer, number
from slimjax.errors import SlimjaxError

COMMAND = Command("generate", "continue prompts with a run's checkpoint and tokenizer", (
    Flag("workdir", "the run directory", metavar="RUN", required=True),
    Flag("prompt", "a prompt to continue", metavar="TEXT", repeated=True),
    Flag("prompts_file", "a text file with one prompt per line", metavar="FILE", repeated=True),
    Flag("max_new_tokens", "tokens generated per prompt", integer(1), 64, metavar="N"),
    Flag("temperature", "sampling temperature (0: greedy)", number(), 0.0, metavar="T"),
    Flag("top_k", "sample among the k likeliest tokens (0: all)", integer(), 0, metavar="K"),
    Flag("top_p", "sample from the smallest set of tokens with this much probability", number(), 1.0, metavar="P"),
    Flag("repetition_penalty", "divides the logits of tokens already in the sequence (1: off)", number(), 1.0,
         metavar="R"),
    Flag("seed", "sampling seed", integer(), 0, metavar="N"),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
    Flag("tokenizer", "tokenizer file (default: the run's)", metavar="FILE"),
))


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags -> (options, prompts); every problem is a SlimjaxError naming the flag."""
    args = COMMAND.parse(argv)
    prompts = list(args.prompt)
    for path in args.prompts_file:
        if not os.path.isfile(path):
            raise SlimjaxError(f"--prompts_file '{path}' does not exist; give a text file with one prompt per line")
        with open(path, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        raise SlimjaxError("slimjax generate needs --prompt=TEXT (repeatable) or a non-empty --prompts_file")
    return args, prompts


def run(argv: Sequence[str]) -> int:
    opts, prompts = parse(argv)
    import jax

    from slimjax.api import generate, load_run
    from slimjax.train.loop import display_text

    run = load_run(opts.workdir, opts.step, tokenizer=opts.tokenizer)
    texts = generate(run, prompts, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                     top_p=opts.top_p, repetition_penalty=opts.repetition_penalty, seed=opts.seed)
    rd = run.rundir
    if jax.process_index() == 0:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"--- {i + 1}/{len(prompts)} (step {rd.step})")
            print(display_text(prompt + text))
    return 0
