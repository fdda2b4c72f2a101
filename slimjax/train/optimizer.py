"""optax optimizer from config: AdamW / Adafactor / Lion, warm-up + cosine, clipping, decay mask."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from slimjax.config import OptimizerConfig
from slimjax.sharding import path_str


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to ``peak * min_lr_ratio``."""
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """True for parameters that get weight decay: those whose path matches no ``exclude`` regex.

    Paths look like ``blocks/attn/wq/kernel``; the default excludes norms, biases and embeddings.
    """
    patterns = [re.compile(p) for p in exclude]

    def decays(path, _):
        name = path_str(path)
        return not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The full gradient transformation (clipping first, then the optimizer with its schedule)."""
    lr = schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.decay_exclude)  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    else:  # adafactor: factored second moments; weight decay is decoupled and scaled by the lr
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*parts, opt)
