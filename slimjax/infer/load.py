"""Opens a trained run's workdir for inference: its config, tokenizer and latest parameters.

Only the parameters are read (not the optimizer state), straight into the shardings the rules
give them on the run's mesh. Nothing in the workdir is written.
"""

from __future__ import annotations

import dataclasses
import os

from slimjax.checkpoint import CHECKPOINT_DIR, Checkpointer
from slimjax.config import CheckpointConfig, Config, validate
from slimjax.data.tokenizer import Tokenizer, get_tokenizer
from slimjax.errors import SlimjaxError
from slimjax.infer.generate import Generator, abstract_params
from slimjax.models import compute_dtype
from slimjax.sharding import Rules, make_mesh


@dataclasses.dataclass
class Trained:
    """A run ready to generate from."""

    cfg: Config
    step: int
    tokenizer: Tokenizer
    generator: Generator


def load_trained(workdir: str) -> Trained:
    """The latest checkpoint of ``workdir`` with the run's own config and tokenizer."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(path):
        raise SlimjaxError(f"--workdir '{workdir}' is not a directory; give the workdir of a `slimjax train` run")
    ckdir = os.path.join(path, CHECKPOINT_DIR)
    if not os.path.isdir(ckdir):
        raise SlimjaxError(f"--workdir '{workdir}' has no checkpoint ({ckdir} is missing); "
                           "train first with `slimjax train --workdir ...`")
    # keep only matters when saving, which this reader never does.
    checkpointer = Checkpointer(ckdir, CheckpointConfig(every_steps=1, keep=1 << 30))
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise SlimjaxError(f"--workdir '{workdir}' has no complete checkpoint in {ckdir}; "
                               "train (or let the run finish a checkpoint) first")
        meta = checkpointer.read_meta(step)
        cfg = validate(meta.get("config", {}))
        mesh, rules = make_mesh(cfg.mesh), Rules.from_config(cfg.mesh)
        dtype = compute_dtype(cfg.model.dtype)
        params = checkpointer.restore_params(step, abstract_params(cfg.model, dtype, mesh, rules))
    finally:
        checkpointer.close()
    tok = run_tokenizer(cfg, path)
    return Trained(cfg=cfg, step=step, tokenizer=tok, generator=Generator(cfg.model, params, mesh, rules, dtype))


def run_tokenizer(cfg: Config, workdir: str) -> Tokenizer:
    """The tokenizer the run trained with: its configured file, or the one cached in the workdir."""
    d = cfg.data

    def no_training_documents():
        raise SlimjaxError(f"workdir '{workdir}' has no cached tokenizer (tokenizer/) and the run's config "
                           "names none (data.tokenizer); it cannot be rebuilt for generation")

    return get_tokenizer(d.tokenizer_kind, d.tokenizer, workdir, cfg.model.vocab_size, d.tokenizer_type,
                         no_training_documents)
