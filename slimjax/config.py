"""Validates an ``ml_collections.ConfigDict`` once into frozen dataclasses.

This is the only module that reads raw config keys. Every other module receives the frozen
section it needs (``ModelConfig`` for models, ``MeshConfig`` for sharding, ...), never the whole
ConfigDict. Each problem raises :class:`SlimjaxError` naming the key, with the nearest valid key
suggested for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping

import ml_collections

from slimjax.config_mesh import check_mesh_options, check_pipeline, check_sequence  # noqa: F401  (re-exported)
from slimjax.config_slim import (  # noqa: F401  (re-exported: the slim sections are part of the config)
    FLOAT_BITS, QUANT_BITS, TRANSFORMS, ClassifyConfig, DistillConfig, LoraConfig, LowRankConfig, PruneConfig, QatConfig, QuantConfig,
    SlimConfig, check_slim, parse_layer_bits, parse_layer_ranks)
from slimjax.errors import SlimjaxError

# A rule maps one logical axis name to a tuple of mesh axes; () replicates that dimension.
Rule = tuple[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model shape and numerics; one class covers the decoder (GPT-2, Llama) and the encoder (BERT)."""

    family: Literal["decoder", "encoder"]
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    positions: Literal["learned", "rope"]
    rope_theta: float
    rope_scaling: Literal["none", "linear", "llama3"]
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_len: int
    norm: Literal["layernorm", "rmsnorm"]
    norm_position: Literal["pre", "post"]
    norm_eps: float
    mlp: Literal["gelu", "gelu_exact", "swiglu"]
    use_bias: bool
    tie_embeddings: bool
    init_std: float
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    scan_layers: bool
    scan_unroll: int
    remat: Literal["none", "dots", "full"]
    attention: Literal["auto", "xla", "cudnn"]
    type_vocab_size: int


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 fills the remaining devices) and overrides of the logical-axis rules
    (``slimjax.sharding.DEFAULT_RULES`` holds the defaults; ``Rules.from_config`` merges them)."""

    data: int
    fsdp: int
    tensor: int
    rules: tuple[Rule, ...]
    stage: int = 1  # pipeline stages: the stacked layers are split over this axis
    sequence: int = 1  # sequence/context parallelism: activations split along their length
    # Pipeline schedule (mesh.stage > 1): "gpipe", or "circular" (each stage holds
    # ``pipeline_repeats`` non-adjacent groups of layers, shrinking the bubble).
    pipeline_schedule: Literal["gpipe", "circular"] = "gpipe"
    pipeline_microbatches: int = 0  # microbatches flowing through the stages (0: one per stage)
    pipeline_repeats: int = 1  # circular schedule: layer groups per stage
    # Attention with a sharded sequence (mesh.sequence > 1): "allgather" keys and values, or "ring"
    # (key/value blocks passed around the sequence axis; memory-lean).
    sequence_attention: Literal["allgather", "ring"] = "allgather"
    sequence_balance: bool = True  # reorder positions so every shard gets equal causal work


SourceKind = Literal["shakespeare", "stdlib", "text", "jsonl", "slimpajama", "tfds", "genre", "labels", "pairs",
                     "prepared"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One corpus of the training mixture: a ``data.sources`` entry (see configs/base.py)."""

    kind: SourceKind
    path: str = ""  # glob (text, jsonl, slimpajama), TFDS dataset name ("name" or "name:version") or a
    # prepared directory (`slimjax tokenize --out`)
    weight: float = 1.0  # share of training rows drawn from this source (normalised over sources)
    eval_path: str = ""  # glob (or TFDS split) of held-out documents; "" holds out data.eval_fraction
    set_name: str = ""  # jsonl: keep only documents whose meta.redpajama_set_name is this
    text_key: str = "text"  # jsonl / TFDS field holding the document text
    data_dir: str = ""  # TFDS data_dir ("" = TFDS's default)

    @property
    def name(self) -> str:
        """A short label for reports: the kind plus the set or path."""
        return self.set_name or (f"{self.kind}:{self.path}" if self.path else self.kind)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read, how to tokenize it and how to cut it into rows."""

    sources: tuple[SourceConfig, ...]
    eval_plays: tuple[str, ...]
    eval_fraction: float
    seq_len: int
    tokenizer_kind: Literal["sentencepiece", "huggingface", "byte"]
    tokenizer: str
    tokenizer_type: Literal["unigram", "bpe"]
    packing: Literal["concat_split", "first_fit"]
    shards: int
    nfc: bool
    min_doc_chars: int
    strict: bool
    prefetch: int


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule, clipping and weight-decay mask."""

    name: Literal["adamw", "adafactor", "lion"]
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decay_exclude: tuple[str, ...]
    clip_norm: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Step count, batch geometry, loss options and the cadence of periodic work."""

    steps: int
    global_batch_size: int
    microbatches: int
    seed: int
    log_every: int
    eval_every: int
    eval_batches: int
    early_stop_patience: int
    progress: bool
    nonfinite: Literal["stop", "skip"]
    sample_tokens: int
    sample_prompt: str


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to write Orbax checkpoints, which to keep, and where a fine-tuning run starts from."""

    every_steps: int
    keep: int
    keep_every: int
    keep_best: int
    best_metric: Literal["loss", "accuracy", "macro_f1"]
    async_save: bool
    init_from: str




@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Weights of the named loss terms; the train step minimises their weighted sum."""

    next_token: float
    z_loss: float
    mlm: float
    nsp: float


# The built-in loss terms each model family computes (objective.* keys); the others must be 0.
FAMILY_TERMS = {"decoder": ("next_token", "z_loss"), "encoder": ("mlm", "nsp")}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Encoder pre-training examples: sentence pairs with a pair task, and masked tokens."""

    mask_rate: float
    whole_word: bool
    pair_task: Literal["nsp", "sop"]
    mask_id: int


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (see ``slimjax.train.distributed``)."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...]
    auto: bool
    coordinator_port: int
    timeout_s: int
    cpu_devices: int


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated whole; callers hand each module only its own section."""

    model: ModelConfig
    mesh: MeshConfig
    data: DataConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    distributed: DistributedConfig
    slim: SlimConfig
    objective: ObjectiveConfig
    pretrain: PretrainConfig

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (tuples become lists) for run summaries and checkpoints."""
        return _jsonable(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
    "slim": SlimConfig,
    "objective": ObjectiveConfig,
    "pretrain": PretrainConfig,
}


def validate(raw: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
    """Turns a ConfigDict (or plain mapping) into a frozen :class:`Config`, checking every key."""
    raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    _reject_unknown(raw.keys(), SECTIONS.keys(), prefix="")
    sections = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            raise SlimjaxError(f"config has no section '{name}'; start from configs/base.py")
        sections[name] = _build(name, cls, raw[name])
    cfg = Config(**sections)
    _check_cross_fields(cfg)
    return cfg


def from_saved(saved: Mapping[str, Any]) -> Config:
    """The validated config a checkpoint recorded, over today's defaults: a run written before a
    key existed still loads (the new key takes its default; a key since removed is ignored)."""
    return validate(saved_config_dict(saved))


def saved_config_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A resolved config (``Config.to_dict()``, e.g. from a checkpoint) as a ConfigDict over
    today's defaults, ready for flag overrides (the ``get_config()`` of a written config file)."""
    from slimjax.configs import base  # the defaults file; it imports nothing of slimjax's

    c = base.get_config()
    _overlay(c, saved)
    return c


def _overlay(c: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        if key not in c:
            continue
        if isinstance(c[key], ml_collections.ConfigDict):
            if isinstance(value, Mapping):
                _overlay(c[key], value)
        else:
            c[key] = tuple(value) if isinstance(value, list) else value


def model_config_from(saved: Mapping[str, Any]) -> ModelConfig:
    """A validated ModelConfig from a saved ``model`` section (over today's defaults)."""
    from slimjax.configs import base

    c = base.get_config()
    _overlay(c.model, saved)
    fit_to_model(c)  # only the model section is being read
    return validate(c).model


def fit_to_model(c: ml_collections.ConfigDict) -> None:
    """Makes the other sections of ``c`` (defaults, when only a model is given: a checkpoint's or a
    Hugging Face config's) fit its model: rows no longer than it accepts, the objective of its
    family (its first term)."""
    c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
    own = FAMILY_TERMS.get(c.model.family, ())
    for name in FAMILY_TERMS["decoder"] + FAMILY_TERMS["encoder"]:
        c.objective[name] = 1.0 if own and name == own[0] else 0.0


def suggest(key: str, known: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest known key, or '' when nothing is close.

    A key that only one known key starts with is taken as an abbreviation of it (``--temp`` ->
    ``--temperature``, not the closer-spelled ``--step``)."""
    known = list(known)
    extended = [k for k in known if k.startswith(key)]
    close = extended if len(extended) == 1 else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _reject_unknown(keys: typing.Iterable[str], known: typing.Iterable[str], prefix: str) -> None:
    known = list(known)
    for key in keys:
        if key not in known:
            full = [prefix + k for k in known]
            raise SlimjaxError(f"unknown config key '{prefix}{key}'{suggest(prefix + key, full)}")


def _build(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise SlimjaxError(f"config key '{section}' must be a section (ConfigDict), got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    _reject_unknown(values.keys(), fields, prefix=f"{section}.")
    kwargs = {}
    for name in fields:
        key = f"{section}.{name}"
        if name not in values:
            raise SlimjaxError(f"config is missing '{key}'; start from configs/base.py")
        if dataclasses.is_dataclass(hints[name]):  # a nested section, e.g. slim.lora
            kwargs[name] = _build(key, hints[name], values[name])
        else:
            kwargs[name] = _coerce(key, values[name], hints[name])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks one value against its annotated type; returns it normalised (lists -> tuples)."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise SlimjaxError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(repr, choices))}")
    elif hint == tuple[str, ...]:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif hint == tuple[int, ...]:
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif hint == tuple[Rule, ...]:
        return _coerce_rules(key, value)
    elif hint == tuple[SourceConfig, ...]:
        return _coerce_sources(key, value)
    else:  # pragma: no cover - a new annotation without a coercion is a programming error
        raise TypeError(f"no coercion for {key}: {hint}")
    want = getattr(hint, "__name__", str(hint))
    raise SlimjaxError(f"config key '{key}' must be {want}, got {value!r} ({type(value).__name__})")


def _coerce_rules(key: str, value: Any) -> tuple[Rule, ...]:
    """Rules are (logical_name, mesh_axes) pairs; mesh_axes is None, one axis name or a tuple."""
    if not isinstance(value, (list, tuple)):
        raise SlimjaxError(f"config key '{key}' must be a tuple of (logical_name, mesh_axes) pairs")
    rules, seen = [], set()
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise SlimjaxError(f"config key '{key}[{i}]' must be (logical_name, mesh_axes), got {pair!r}")
        name, axes = pair
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        elif not (isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes)):
            raise SlimjaxError(f"config key '{key}' rule for '{name}' must map to None, a mesh axis or a tuple of them")
        if name in seen:
            raise SlimjaxError(f"config key '{key}' has two rules for '{name}'; keep one")
        seen.add(name)
        rules.append((name, tuple(axes)))
    return tuple(rules)


def parse_source(key: str, entry: Any) -> SourceConfig:
    """A ``data.sources`` entry: ``"kind"``, ``"kind:path"`` or a mapping of SourceConfig fields."""
    if isinstance(entry, str):
        kind, _, path = entry.partition(":")
        entry = {"kind": kind, "path": path}
    if not isinstance(entry, Mapping):
        raise SlimjaxError(f"config key '{key}' must be 'kind', 'kind:path' or a dict of source fields, "
                           f"got {entry!r}")
    hints = typing.get_type_hints(SourceConfig)
    _reject_unknown(entry.keys(), hints, prefix=f"{key}.")
    if "kind" not in entry:
        raise SlimjaxError(f"config key '{key}' needs a 'kind' ({', '.join(typing.get_args(SourceKind))})")
    source = SourceConfig(**{f: _coerce(f"{key}.{f}", v, hints[f]) for f, v in entry.items()})
    if not source.weight > 0:
        raise SlimjaxError(f"config key '{key}.weight' must be > 0, got {source.weight}")
    if source.kind in ("text", "jsonl", "slimpajama", "tfds", "labels", "pairs", "prepared") and not source.path:
        raise SlimjaxError(f"config key '{key}' (kind '{source.kind}') needs a path")
    return source


def _coerce_sources(key: str, value: Any) -> tuple[SourceConfig, ...]:
    if isinstance(value, (str, Mapping)):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise SlimjaxError(f"config key '{key}' must be a non-empty tuple of sources")
    parsed = tuple(parse_source(f"{key}[{i}]", entry) for i, entry in enumerate(value))
    if len(parsed) > 1 and any(s.kind == "prepared" for s in parsed):
        # A prepared directory holds its own mixture (the sources it was tokenized from, with their weights).
        raise SlimjaxError(f"config key '{key}': a 'prepared' source must be the only source (its directory holds "
                           "the mixture it was tokenized from); tokenize all the sources into one directory")
    return parsed


def _check_cross_fields(cfg: Config) -> None:
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optimizer
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.head_dim": m.head_dim,
        "model.d_ff": m.d_ff, "model.max_seq_len": m.max_seq_len, "model.scan_unroll": m.scan_unroll, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
        "train.microbatches": t.microbatches, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.keep": cfg.checkpoint.keep, "optimizer.learning_rate": o.learning_rate,
    }
    for key, value in positive.items():
        if value <= 0:
            raise SlimjaxError(f"config key '{key}' must be > 0, got {value}")
    for key in ("data", "stage", "fsdp", "sequence", "tensor"):
        size = getattr(cfg.mesh, key)
        if size == 0 or size < -1:
            raise SlimjaxError(f"config key 'mesh.{key}' must be a positive size or -1 (fill), got {size}")
    if m.n_heads % m.n_kv_heads:
        raise SlimjaxError(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}")
    check_sequence(cfg)
    if m.rope_scaling != "none" and not m.rope_factor > 0:
        raise SlimjaxError(f"model.rope_factor must be > 0 with model.rope_scaling={m.rope_scaling!r}, "
                           f"got {m.rope_factor}")
    if m.rope_scaling == "llama3" and not (m.rope_high_freq_factor > m.rope_low_freq_factor > 0
                                           and m.rope_original_max_len > 0):
        raise SlimjaxError("model.rope_scaling='llama3' needs model.rope_high_freq_factor > "
                           "model.rope_low_freq_factor > 0 and model.rope_original_max_len > 0; got "
                           f"{m.rope_high_freq_factor}, {m.rope_low_freq_factor}, {m.rope_original_max_len}")
    if m.positions == "rope" and m.head_dim % 2:
        raise SlimjaxError(f"model.head_dim={m.head_dim} must be even for rotary positions")
    if d.seq_len > m.max_seq_len:
        raise SlimjaxError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            "shorten data.seq_len or raise model.max_seq_len")
    if d.shards < 0 or d.min_doc_chars < 0 or d.prefetch < 0 or not 0.0 <= d.eval_fraction < 1.0:
        raise SlimjaxError("data.shards, data.min_doc_chars and data.prefetch must be >= 0 and "
                           f"data.eval_fraction in [0, 1); got {d.shards}, {d.min_doc_chars}, {d.prefetch}, "
                           f"{d.eval_fraction}")
    if d.shards and t.global_batch_size % d.shards:
        raise SlimjaxError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                           f"data.shards={d.shards}; each step takes the same number of rows from every shard")
    if t.global_batch_size % t.microbatches:
        raise SlimjaxError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.microbatches={t.microbatches}")
    if cfg.checkpoint.keep_every < 0 or cfg.checkpoint.keep_best < 0:
        raise SlimjaxError(f"checkpoint.keep_every and checkpoint.keep_best must be >= 0 (0 disables), got "
                           f"{cfg.checkpoint.keep_every}, {cfg.checkpoint.keep_best}")
    if t.sample_tokens < 0:
        raise SlimjaxError(f"config key 'train.sample_tokens' must be >= 0 (0 disables the sample), "
                           f"got {t.sample_tokens}")
    if t.early_stop_patience < 0:
        raise SlimjaxError(f"config key 'train.early_stop_patience' must be >= 0 (0: never stop early), "
                           f"got {t.early_stop_patience}")
    if t.eval_batches < 0 or o.weight_decay < 0 or o.clip_norm < 0 or o.warmup_steps < 0:
        raise SlimjaxError("train.eval_batches, optimizer.weight_decay, optimizer.clip_norm "
                           "and optimizer.warmup_steps must be >= 0")
    check_mesh_options(cfg)
    _check_objective(cfg.objective, m.family)
    _check_encoder(cfg)
    check_slim(cfg.slim)
    dist = cfg.distributed
    if dist.num_processes == 0 or dist.num_processes < -1:
        raise SlimjaxError(f"config key 'distributed.num_processes' must be >= 1 or -1 (environment/auto), "
                           f"got {dist.num_processes}")
    if dist.process_id < -1 or (dist.num_processes > 0 and dist.process_id >= dist.num_processes):
        raise SlimjaxError(f"config key 'distributed.process_id' is {dist.process_id}; it must lie in "
                           f"[0, distributed.num_processes={dist.num_processes}) or be -1 (environment/auto)")
    if dist.timeout_s <= 0 or dist.cpu_devices < 0 or not 0 <= dist.coordinator_port < 65536:
        raise SlimjaxError("distributed.timeout_s must be > 0, distributed.cpu_devices >= 0 and "
                           f"distributed.coordinator_port in [0, 65535]; got {dist.timeout_s}, "
                           f"{dist.cpu_devices}, {dist.coordinator_port}")
    if any(i < 0 for i in dist.local_device_ids):
        raise SlimjaxError(f"config key 'distributed.local_device_ids' must hold device indices >= 0, "
                           f"got {dist.local_device_ids}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise SlimjaxError(f"optimizer.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}")


def _check_objective(obj: ObjectiveConfig, family: str) -> None:
    weights = dataclasses.asdict(obj)
    for name, weight in weights.items():
        if weight < 0:
            raise SlimjaxError(f"config key 'objective.{name}' is a loss-term weight and must be >= 0, got {weight}")
    own = FAMILY_TERMS[family]
    for name, weight in weights.items():
        if weight and name not in own:
            raise SlimjaxError(f"config key 'objective.{name}' is {weight} but the {family} family has no "
                               f"'{name}' term (its terms: {', '.join(own)}); set it to 0")
    if not any(weights[name] for name in own):
        raise SlimjaxError(f"every objective.* weight of the {family} family is 0: nothing to minimise; set "
                           f"objective.{own[0]}=1.0")


def _check_encoder(cfg: Config) -> None:
    """Keys that only the encoder reads, and the decoder-only features it lacks."""
    m, p = cfg.model, cfg.pretrain
    if not 0.0 < p.mask_rate < 1.0:
        raise SlimjaxError(f"config key 'pretrain.mask_rate' is {p.mask_rate}; it must lie in (0, 1) "
                           "(BERT masks 0.15 of the tokens)")
    if p.mask_id < 0:
        raise SlimjaxError(f"config key 'pretrain.mask_id' must be a token id >= 0, got {p.mask_id}")
    if m.family != "encoder":
        return
    if m.type_vocab_size < 2:
        raise SlimjaxError(f"config key 'model.type_vocab_size' is {m.type_vocab_size}; sentence pairs need 2 "
                           "token types")
    if m.positions != "learned" or m.n_kv_heads != m.n_heads or m.mlp == "swiglu" or not m.tie_embeddings:
        raise SlimjaxError("model.family='encoder' takes learned positions, multi-head attention, a GELU MLP and "
                           "the MLM head tied to the embeddings: set model.positions='learned', "
                           "model.n_kv_heads=model.n_heads, model.mlp='gelu_exact' (or 'gelu') and "
                           "model.tie_embeddings=True")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x

