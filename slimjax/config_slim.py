"""The ``slim`` section of the config: the recipe of model transforms and each transform's options.

Split from ``slimjax.config`` (which validates the whole ConfigDict and re-exports these names):
one frozen dataclass per transform section and the checks of their values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Literal

from slimjax.errors import SlimjaxError


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (``slim.lora``): which layers, rank, scaling and dropout."""

    rank: int
    alpha: float
    rslora: bool
    dropout: float
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Sparsity masks (``slim.prune``): which kernels, and how the masks change during training."""

    targets: tuple[str, ...]
    schedule: Literal["fixed", "gradual", "rigl", "set"]
    sparsity: float
    initial_sparsity: float
    begin_step: int
    end_step: int
    every: int
    drop_fraction: float
    distribution: Literal["uniform", "erk"]
    l1: float
    seed: int


# Integer widths a quantized weight may have (slim.qat, slim.quant); 16 in an allocation means
# "left in floating point".
QUANT_BITS = (2, 3, 4, 8)
FLOAT_BITS = 16


@dataclasses.dataclass(frozen=True)
class QatConfig:
    """Quantization-aware training (``slim.qat``): kernels fake-quantized in the forward pass."""

    targets: tuple[str, ...]
    bits: int
    group_size: int
    symmetric: bool


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Quantized storage (``slim.quant``): kernels held as integer codes plus scales."""

    targets: tuple[str, ...]
    bits: int
    group_size: int
    symmetric: bool
    layer_bits: tuple[str, ...]  # "blocks/3/attn/wq=4" overrides of ``bits`` per layer
    pack: bool


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Low-rank factorisation (``slim.lowrank``): targeted kernels stored as two factors ``u @ v``."""

    targets: tuple[str, ...]
    rank: int  # the rank of every targeted layer ``ranks`` does not name; 0: those stay dense
    ranks: tuple[str, ...]  # "blocks/3/attn/wq=16" per-layer ranks (what ``factorize`` decides)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (``slim.distill``): the teacher run and the weights of the distillation terms."""

    teacher: str
    teacher_spec: str  # JSON of the teacher's model spec; "" = read from the teacher's checkpoint
    temperature: float
    alpha: float
    mse_probs: float
    mse_logits: float
    hidden: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """Sequence classification (``slim.classify``): a head on the model's pooled features."""

    classes: tuple[str, ...]  # label names; a label's index in this list is its class id


@dataclasses.dataclass(frozen=True)
class SlimConfig:
    """The ordered recipe of model transforms and each transform's options."""

    recipe: tuple[str, ...]
    lora: LoraConfig
    prune: PruneConfig
    qat: QatConfig
    quant: QuantConfig
    lowrank: LowRankConfig
    distill: DistillConfig
    classify: ClassifyConfig


# Transforms a recipe may name (each has a section of the same name under ``slim``).
TRANSFORMS = ("lora", "prune", "qat", "quant", "lowrank", "distill", "classify")


def check_slim(slim: SlimConfig) -> None:
    """Every slim option checked, with one error naming the key."""
    from slimjax.config import suggest  # config imports this module

    for i, name in enumerate(slim.recipe):
        if name not in TRANSFORMS:
            raise SlimjaxError(f"config key 'slim.recipe[{i}]' names unknown transform '{name}'"
                               f"{suggest(name, TRANSFORMS)}; transforms: {', '.join(TRANSFORMS)}")
    if len(set(slim.recipe)) != len(slim.recipe):
        raise SlimjaxError(f"config key 'slim.recipe' {slim.recipe} names a transform twice; keep one of each")
    _check_lora(slim.lora)
    _check_prune(slim.prune)
    _check_quant("slim.qat", slim.qat)
    _check_quant("slim.quant", slim.quant)
    _check_lowrank(slim.lowrank, "lowrank" in slim.recipe)
    if "distill" in slim.recipe:
        _check_distill(slim.distill)
    if "classify" in slim.recipe:
        _check_classify(slim.classify)
    if "qat" in slim.recipe and "quant" in slim.recipe:
        raise SlimjaxError("slim.recipe names both 'qat' and 'quant': the stored codes are fixed, so there is "
                           "nothing to fake-quantize; train with 'qat', then store with 'quant'")


def _check_classify(c: ClassifyConfig) -> None:
    if len(c.classes) < 2 or len(set(c.classes)) != len(c.classes) or not all(c.classes):
        raise SlimjaxError(f"config key 'slim.classify.classes' must name at least two distinct, non-empty classes, "
                           f"got {c.classes}")


def _check_distill(d: DistillConfig) -> None:
    if not d.teacher and not d.teacher_spec:
        raise SlimjaxError("slim.recipe names 'distill' but config key 'slim.distill.teacher' is empty; give the "
                           "teacher's run directory")
    if not d.temperature > 0:
        raise SlimjaxError(f"config key 'slim.distill.temperature' must be > 0, got {d.temperature}")
    if not 0.0 <= d.alpha <= 1.0:
        raise SlimjaxError(f"config key 'slim.distill.alpha' must lie in [0, 1] (the KL term's share; the "
                           f"hard-label loss gets 1 - alpha), got {d.alpha}")
    for key in ("mse_probs", "mse_logits", "hidden"):
        if getattr(d, key) < 0:
            raise SlimjaxError(f"config key 'slim.distill.{key}' is a loss-term weight and must be >= 0, "
                               f"got {getattr(d, key)}")
    if d.top_k < 0:
        raise SlimjaxError(f"config key 'slim.distill.top_k' must be >= 0 (0: the whole vocabulary), got {d.top_k}")


def _check_patterns(key: str, patterns: tuple[str, ...]) -> None:
    if not patterns:
        raise SlimjaxError(f"config key '{key}' is empty; give path patterns such as 'attn/w[qkvo]'")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise SlimjaxError(f"config key '{key}' pattern {pattern!r} is not a regular expression: {e}") from None


def _check_lora(lora: LoraConfig) -> None:
    if lora.rank <= 0:
        raise SlimjaxError(f"config key 'slim.lora.rank' must be > 0, got {lora.rank}")
    if not lora.alpha > 0:
        raise SlimjaxError(f"config key 'slim.lora.alpha' must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise SlimjaxError(f"config key 'slim.lora.dropout' must lie in [0, 1), got {lora.dropout}")
    _check_patterns("slim.lora.targets", lora.targets)


def _check_prune(p: PruneConfig) -> None:
    _check_patterns("slim.prune.targets", p.targets)
    for key in ("sparsity", "initial_sparsity", "drop_fraction"):
        if not 0.0 <= getattr(p, key) < 1.0:
            raise SlimjaxError(f"config key 'slim.prune.{key}' must lie in [0, 1), got {getattr(p, key)}")
    if p.every <= 0:
        raise SlimjaxError(f"config key 'slim.prune.every' must be > 0 (steps between mask updates), got {p.every}")
    if p.l1 < 0:
        raise SlimjaxError(f"config key 'slim.prune.l1' is a loss-term weight and must be >= 0, got {p.l1}")
    if p.schedule in ("gradual", "rigl", "set") and not 0 <= p.begin_step < p.end_step:
        raise SlimjaxError(f"slim.prune.schedule={p.schedule!r} needs 0 <= slim.prune.begin_step < "
                           f"slim.prune.end_step, got {p.begin_step} and {p.end_step}")
    if p.schedule == "gradual" and p.initial_sparsity > p.sparsity:
        raise SlimjaxError(f"config key 'slim.prune.initial_sparsity'={p.initial_sparsity} exceeds "
                           f"slim.prune.sparsity={p.sparsity}: gradual pruning only removes weights")


def _check_quant(key: str, q: QatConfig | QuantConfig) -> None:
    _check_patterns(f"{key}.targets", q.targets)
    if q.bits not in QUANT_BITS:
        raise SlimjaxError(f"config key '{key}.bits' is {q.bits}; use one of {', '.join(map(str, QUANT_BITS))}")
    if q.group_size < -1:
        raise SlimjaxError(f"config key '{key}.group_size' is {q.group_size}; use a positive divisor of every "
                           "targeted layer's input dim, or 0 for one scale per output channel")
    for entry in getattr(q, "layer_bits", ()):
        parse_layer_bits(f"{key}.layer_bits", (entry,))


def _check_lowrank(lowrank: LowRankConfig, in_recipe: bool) -> None:
    _check_patterns("slim.lowrank.targets", lowrank.targets)
    if lowrank.rank < 0:
        raise SlimjaxError(f"config key 'slim.lowrank.rank' must be >= 0 (0: only the layers slim.lowrank.ranks "
                           f"names are factored), got {lowrank.rank}")
    ranks = parse_layer_ranks("slim.lowrank.ranks", lowrank.ranks)
    if in_recipe and not lowrank.rank and not ranks:
        raise SlimjaxError("slim.recipe names 'lowrank' but slim.lowrank.rank is 0 and slim.lowrank.ranks is empty: "
                           "nothing would be factored; set slim.lowrank.rank (e.g. 16) or per-layer ranks")


def parse_layer_bits(key: str, entries: tuple[str, ...]) -> dict[str, int]:
    """``("blocks/3/attn/wq=4", ...)`` as ``{layer name: bits}``; bits are a quantized width or 16 (float)."""
    widths = ", ".join(map(str, (*QUANT_BITS, FLOAT_BITS)))
    return _parse_layer_values(key, entries, lambda b: b in (*QUANT_BITS, FLOAT_BITS),
                               f"'LAYER=BITS' with BITS one of {widths} (e.g. 'blocks/3/attn/wq=4')")


def parse_layer_ranks(key: str, entries: tuple[str, ...]) -> dict[str, int]:
    """``("blocks/3/attn/wq=16", ...)`` as ``{layer name: rank}``; every rank at least 1."""
    return _parse_layer_values(key, entries, lambda r: r >= 1, "'LAYER=RANK' with RANK >= 1 (e.g. 'blocks/3/attn/wq=16')")


def _parse_layer_values(key: str, entries: tuple[str, ...], valid: Callable[[int], bool], form: str) -> dict[str, int]:
    """``("LAYER=N", ...)`` as ``{layer: N}``, each N checked by ``valid``; errors name ``key`` and ``form``."""
    out = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition("=")
        if not sep or not name or not value.isdigit() or not valid(int(value)):
            raise SlimjaxError(f"config key '{key}' entry {entry!r} is not {form}")
        if name in out:
            raise SlimjaxError(f"config key '{key}' names layer '{name}' twice; keep one entry")
        out[name] = int(value)
    return out
