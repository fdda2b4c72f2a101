"""LoRA adapters between slimjax's parameter layout and Hugging Face PEFT adapter directories.

A LoRA adapter on the slimjax ``Dense`` at path ``P`` (kernel ``[*in_shape, *out_shape]``) is
``P/tap/a`` ``[*in_shape, r]`` and ``P/tap/b`` ``[r, *out_shape]`` (with a leading ``[n_layers]``
dim when layers are stacked); the effective kernel is ``kernel + scale * a @ b``. PEFT stores
``lora_A.weight`` ``[r, in_features]`` and ``lora_B.weight`` ``[out_features, r]`` with
``delta W = scaling * B @ A`` on the ``[out, in]`` Linear weight. The kernels' own ``to_hf``
flatten ``in_shape`` and ``out_shape`` in C order, so ``lora_A = a.reshape(-1, r).T`` and
``lora_B = b.reshape(r, -1).T`` keep the two products identical.

Which Dense each PEFT module is comes from :func:`mapping.llama_links` (the kernel links' tensor
name minus ``.weight``), so there is no second name table. Only Llama/Mistral: GPT-2 fuses q, k, v
into one ``c_attn``, which a per-projection adapter cannot express.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from slimjax.config import ModelConfig
from slimjax.errors import SlimjaxError
from slimjax.interop import hf_config, mapping
from slimjax.interop.hf import FLOAT_DTYPES
from slimjax.interop.host_arrays import fill_float32
from slimjax.interop.safetensors_io import TensorFile, write_file
from slimjax.models import abstract_params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PeftModelForCausalLM wraps the base model twice (PeftModel.base_model -> LoraModel.model), and
# the saved tensor names keep that prefix.
KEY_PREFIX = "base_model.model."
ADAPTER_KEY = "tap"  # the Dense attribute LoRA's adapter sits in (slimjax.models.layers.Dense.tap)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """LoRA hyper-parameters: rank, alpha, rsLoRA scaling, dropout and slimjax target names
    (``wq, wk, wv, wo, gate, up, down``, ``lm_head``)."""

    rank: int
    alpha: float
    rslora: bool
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``scaling``)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class _Target:
    """One Dense a LoRA adapter can sit on: its kernel link and the kernel's in/out dims (per layer)."""

    name: str
    link: mapping.Link
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def hf_module(self) -> str:
        """The short module name PEFT's ``target_modules`` uses (``q_proj``, ``lm_head``)."""
        return self.module(0).rsplit(".", 1)[-1]

    def module(self, layer: int | None) -> str:
        """Full module name in the base model (``model.layers.3.self_attn.q_proj``)."""
        return self.link.hf_name(layer).removesuffix(".weight")

    def layers(self, n_layers: int) -> list[int | None]:
        return list(range(n_layers)) if self.link.per_layer else [None]

    def key(self, layer: int | None, which: str) -> str:
        """The tensor name in ``adapter_model.safetensors``; ``which`` is "A" or "B"."""
        return f"{KEY_PREFIX}{self.module(layer)}.lora_{which}.weight"

    def path(self, layer: int | None, scan_layers: bool, which: str) -> mapping.Path:
        """slimjax path of the adapter's ``a`` or ``b`` (``which``), in the Dense's ``tap`` seam
        next to the kernel (where ``slimjax.slim.lora`` puts it)."""
        return (*mapping.slim_path(self.link, layer, scan_layers)[:-1], ADAPTER_KEY, which)

    def hf_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lora_A shape, lora_B shape) in PEFT's layout."""
        return (rank, math.prod(self.in_shape)), (math.prod(self.out_shape), rank)


def _split_dims(kernel: tuple[int, ...], in_features: int) -> int:
    """How many leading kernel dims are inputs: the first split whose product is ``in_features``
    (the Linear's in dim, from the link's own ``to_hf``). Only a size-1 dim at the boundary could
    make this ambiguous, and either split then holds the same numbers."""
    for k in range(1, len(kernel)):
        if math.prod(kernel[:k]) == in_features:
            return k
    raise AssertionError(f"kernel {kernel} has no input split of size {in_features}")


def _targets(cfg: ModelConfig) -> dict[str, _Target]:
    """slimjax target name -> :class:`_Target`, for every Dense of a Llama/Mistral model, in link order."""
    if hf_config.family(cfg) != "llama":
        raise SlimjaxError("LoRA adapters export and import only for Llama/Mistral models (GPT-2 fuses q, k, v "
                           "into c_attn, which PEFT adapts as one module); export the merged model instead "
                           "(merge the adapter into the kernels, then export_hf)")
    shapes = abstract_params(cfg)[2]
    out = {}
    for link in mapping.llama_links(cfg):
        if link.path[-1] != "kernel":
            continue
        leaf = shapes
        for key in mapping.slim_path(link, 0, cfg.scan_layers):
            leaf = leaf[key]
        kernel = tuple(leaf.shape[1:] if link.per_layer and cfg.scan_layers else leaf.shape)
        _, hf_in = jax.eval_shape(link.to_hf, jax.ShapeDtypeStruct(kernel, np.float32)).shape
        k = _split_dims(kernel, hf_in)
        name = link.path[-2]
        out[name] = _Target(name, link, kernel[:k], kernel[k:])
    return out


def merge_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``kernel + scale * a @ b`` in slimjax layout (``a`` ``[*in, r]``, ``b`` ``[r, *out]``), for
    one layer or stacked layers (``kernel``, ``a`` and ``b`` all with a leading ``[L]``)."""
    kernel, a, b = (np.asarray(x) for x in (kernel, a, b))
    stacked = a.ndim + b.ndim - 2 == kernel.ndim + 1
    lead = "z" if stacked else ""
    n_in = a.ndim - 1 - len(lead)
    letters = iter("abcdefghijklmnopqstuvwxy")  # r and z are reserved
    ins = "".join(next(letters) for _ in range(n_in))
    outs = "".join(next(letters) for _ in range(b.ndim - 1 - len(lead)))
    delta = np.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a, b)
    return kernel + scale * delta


# ----------------------------------------------------------------------------------------- export


def _get(tree: dict, path: mapping.Path) -> Any:
    try:
        return mapping.get_at(tree, path)
    except (KeyError, TypeError):
        raise SlimjaxError(f"the adapter tree has no '{'/'.join(map(str, path))}'; give tap/a and tap/b for "
                           "every target (in the layout model.scan_layers says)") from None


def _host(value: Any) -> np.ndarray:
    """A float32 host copy; arrays spread over processes are gathered (a collective: all processes)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value), np.float32)


def _peft_config(options: LoraOptions, targets: dict[str, _Target], base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": options.rank, "lora_alpha": options.alpha,
        "use_rslora": options.rslora, "lora_dropout": options.dropout,
        "target_modules": [targets[t].hf_module for t in options.targets], "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model or None,
    }


def _peft_tensors(cfg: ModelConfig, adapters: dict, options: LoraOptions, targets: dict[str, _Target]
                  ) -> dict[str, np.ndarray]:
    """PEFT tensor name -> ``lora_A`` ``[r, in]`` / ``lora_B`` ``[out, r]``, checking each leaf's shape.
    LoRA factors are small, so they are all gathered to the host at once (same order everywhere)."""
    tensors: dict[str, np.ndarray] = {}
    r, scan = options.rank, cfg.scan_layers
    for name in options.targets:
        target = targets[name]
        stacked = target.link.per_layer and scan
        lead = (cfg.n_layers,) if stacked else ()
        for layer in ([None] if stacked else target.layers(cfg.n_layers)):
            a = _host(_get(adapters, target.path(layer, scan, "a")))
            b = _host(_get(adapters, target.path(layer, scan, "b")))
            for which, value, want in (("a", a, (*lead, *target.in_shape, r)), ("b", b, (*lead, r, *target.out_shape))):
                if value.shape != want:
                    raise SlimjaxError(f"'{'/'.join(map(str, target.path(layer, scan, which)))}' has shape "
                                       f"{value.shape} but rank {r} on this model needs {want}")
            for i in (range(cfg.n_layers) if stacked else [layer]):
                la, lb = (a[i], b[i]) if stacked else (a, b)
                # C-order flattening of in/out dims, as the kernel links' to_hf do.
                tensors[target.key(i, "A")] = la.reshape(-1, r).T
                tensors[target.key(i, "B")] = lb.reshape(r, -1).T
    return tensors


def export_adapter(model_cfg: ModelConfig, adapters: dict, options: LoraOptions, out_dir: str,
                   base_model: str = "") -> list[str]:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` that
    ``peft.PeftModel.from_pretrained(base, out_dir)`` loads; returns the file names.

    ``adapters`` holds the ``tap/a``, ``tap/b`` leaves of ``options.targets`` at their slimjax
    paths (stacked or unrolled as ``model_cfg.scan_layers`` says). ``out_dir`` must be new or
    empty. With several processes every one must call this (arrays are gathered collectively);
    process 0 writes and gets the names, the others get ``[]``.
    """
    targets = _targets(model_cfg)
    for name in options.targets:
        if name not in targets:
            raise SlimjaxError(f"LoRA target '{name}' has no Dense in this model; targets are "
                               f"{', '.join(targets)}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SlimjaxError(f"--out '{out_dir}' exists and is not an empty directory; give a new one")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("slimjax export_adapter: out_dir checked")
    tensors = _peft_tensors(model_cfg, adapters, options, targets)
    if jax.process_index() != 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    specs = [(key, value.shape, np.dtype(np.float32)) for key, value in tensors.items()]
    write_file(os.path.join(out_dir, WEIGHTS_FILE), specs, tensors.__getitem__)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(_peft_config(options, targets, base_model), f, indent=2)
    return [WEIGHTS_FILE, CONFIG_FILE]


# ----------------------------------------------------------------------------------------- import


def _read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    if not os.path.isdir(adapter_dir):
        raise SlimjaxError(f"adapter directory '{adapter_dir}' does not exist; give a PEFT adapter directory "
                           "(save_pretrained output)")
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SlimjaxError(f"'{adapter_dir}' has no {CONFIG_FILE}; a PEFT adapter directory needs it next to "
                           f"{WEIGHTS_FILE}")
    return hf_config.read_json_object(path)


def _check_supported(raw: dict[str, Any], path: str) -> None:
    """Refuses, by key, every PEFT option whose effect slimjax's plain LoRA cannot reproduce."""
    if raw.get("peft_type") != "LORA":
        raise SlimjaxError(f"'{path}' has peft_type {raw.get('peft_type')!r}; slimjax imports only LORA adapters")
    # key -> (the value slimjax reproduces, what it would take instead)
    plain = {
        "use_dora": (False, "DoRA's magnitude vectors have no place in slimjax's LoRA"),
        "bias": ("none", "slimjax's Llama projections have no biases to train"),
        "lora_bias": (False, "slimjax's Llama projections have no biases"),
        "fan_in_fan_out": (False, "Llama's nn.Linear weights are [out, in]"),
    }
    for key, (want, why) in plain.items():
        if raw.get(key, want) not in (want, None):
            raise SlimjaxError(f"'{path}' sets {key}={raw[key]!r}; slimjax supports only {key}={want!r} ({why}); "
                               "merge the adapter with peft and import the merged model instead")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication",
                "target_parameters", "trainable_token_indices"):
        if raw.get(key):
            raise SlimjaxError(f"'{path}' sets {key}={raw[key]!r}; slimjax's LoRA uses one rank and alpha on "
                               "every layer of each target and nothing else trained; merge the adapter with peft "
                               "and import the merged model instead")


def _resolve_targets(spec: Any, targets: dict[str, _Target], n_layers: int, path: str) -> tuple[str, ...]:
    """slimjax targets a PEFT ``target_modules`` (list of names or a regex string) selects."""
    modules = {t.module(layer): name for name, t in targets.items() for layer in t.layers(n_layers)}
    if isinstance(spec, str):  # PEFT full-matches a string against each module name
        matched = {full for full in modules if re.fullmatch(spec, full)}
    elif isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
        matched = set()
        for entry in spec:  # PEFT matches a list entry to the module name or its dotted tail
            hits = {full for full in modules if full == entry or full.endswith("." + entry)}
            if not hits:
                raise SlimjaxError(f"'{path}' target_modules names '{entry}', which slimjax has no Dense for "
                                   f"(it has {', '.join(t.hf_module for t in targets.values())}); merge the "
                                   "adapter with peft and import the merged model instead")
            matched |= hits
    else:
        raise SlimjaxError(f"'{path}' target_modules is {spec!r}; give a list of module names or a regex string")
    if not matched:
        raise SlimjaxError(f"'{path}' target_modules {spec!r} matches no module slimjax has a Dense for "
                           f"({', '.join(t.hf_module for t in targets.values())})")
    out = []
    for name, t in targets.items():
        hits = [layer for layer in t.layers(n_layers) if t.module(layer) in matched]
        if hits and len(hits) < len(t.layers(n_layers)):
            raise SlimjaxError(f"'{path}' target_modules {spec!r} adapts {t.hf_module} in only some layers "
                               f"({hits}); slimjax puts an adapter on every layer of a target")
        if hits:
            out.append(name)
    return tuple(out)


def _read_tensor(tensors: TensorFile, key: str, want: tuple[int, ...]) -> np.ndarray:
    if key not in tensors.header:
        raise SlimjaxError(f"tensor '{key}' is missing from '{tensors.path}'; adapter_config.json's "
                           "target_modules needs it for every layer (incomplete or edited adapter?)")
    if tensors.shape(key) != want:
        raise SlimjaxError(f"tensor '{key}' in '{tensors.path}' has shape {tensors.shape(key)} but this model "
                           f"needs {want}; the adapter was made for a different base model")
    dtype = tensors.header[key]["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise SlimjaxError(f"tensor '{key}' in '{tensors.path}' is {dtype}; slimjax imports floating-point "
                           f"adapters ({', '.join(FLOAT_DTYPES)}), not quantized ones")
    out = np.empty(want, np.float32)
    fill_float32(out, tensors.array(key))
    return out


def _base_copies(tensors: TensorFile, target: _Target, layers: list[int | None]) -> set[str]:
    """Copies of a targeted module's base weight that PEFT saves next to the adapter (it does for
    ``lm_head``, in case the vocabulary was resized). slimjax keeps the base model's own weight, so
    a copy is skipped when its shape fits this model and refused when it does not."""
    found = set()
    for layer in layers:
        key = f"{KEY_PREFIX}{target.module(layer)}.base_layer.weight"
        if key in tensors.header:
            want = (math.prod(target.out_shape), math.prod(target.in_shape))
            if tensors.shape(key) != want:
                raise SlimjaxError(f"tensor '{key}' in '{tensors.path}' has shape {tensors.shape(key)} but this "
                                   f"model needs {want}; the adapter was made for a different base model")
            found.add(key)
    return found


def adapted_targets(cfg: ModelConfig, adapters: dict) -> tuple[str, ...]:
    """The slimjax target names (``wq`` ... ``lm_head``) that hold an adapter in ``adapters``."""
    out = []
    for name, target in _targets(cfg).items():
        try:
            _get(adapters, target.path(target.layers(cfg.n_layers)[0], cfg.scan_layers, "a"))
        except (KeyError, SlimjaxError):
            continue
        out.append(name)
    return tuple(out)


def slim_patterns(targets: tuple[str, ...], cfg: ModelConfig) -> tuple[str, ...]:
    """``slim.lora.targets`` regexes selecting exactly these targets (``attn/wq$``, ``^lm_head$``)."""
    out = []
    for name in targets:
        path = _targets(cfg)[name].link.path[:-1]
        out.append(f"{path[-2]}/{name}$" if len(path) > 1 else f"^{name}$")
    return tuple(out)


def import_adapter(adapter_dir: str, model_cfg: ModelConfig) -> tuple[LoraOptions, dict]:
    """(options, adapters) from a PEFT LoRA directory, for a model shaped like ``model_cfg``.

    ``adapters`` is a nested dict of float32 NumPy ``tap/a``, ``tap/b`` leaves at their slimjax
    paths, stacked per ``model_cfg.scan_layers``. Anything slimjax cannot reproduce exactly
    (DoRA, biases, per-module ranks, other trained modules, a different base model) is refused
    with a one-line :class:`SlimjaxError`.
    """
    raw = _read_adapter_config(adapter_dir)
    config_path = os.path.join(adapter_dir, CONFIG_FILE)
    _check_supported(raw, config_path)
    weights = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise SlimjaxError(f"'{adapter_dir}' has no {WEIGHTS_FILE}; save the adapter with safetensors "
                           "(save_pretrained(..., safe_serialization=True))")
    try:
        rank, alpha = int(raw["r"]), float(raw.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise SlimjaxError(f"'{config_path}' needs an integer 'r' and a numeric 'lora_alpha'") from None
    targets = _targets(model_cfg)
    names = _resolve_targets(raw.get("target_modules"), targets, model_cfg.n_layers, config_path)
    options = LoraOptions(rank, alpha, bool(raw.get("use_rslora", False)), float(raw.get("lora_dropout") or 0.0),
                          names)
    tensors = TensorFile(weights)
    expected: set[str] = set()
    adapters: dict = {}
    for name in names:
        target = targets[name]
        shape_a, shape_b = target.hf_shapes(rank)
        layers = target.layers(model_cfg.n_layers)
        a = [_read_tensor(tensors, target.key(i, "A"), shape_a).T.reshape(*target.in_shape, rank) for i in layers]
        b = [_read_tensor(tensors, target.key(i, "B"), shape_b).T.reshape(rank, *target.out_shape) for i in layers]
        expected |= {target.key(i, w) for i in layers for w in "AB"}
        expected |= _base_copies(tensors, target, layers)
        if target.link.per_layer and model_cfg.scan_layers:
            mapping.set_at(adapters, target.path(None, True, "a"), np.stack(a))
            mapping.set_at(adapters, target.path(None, True, "b"), np.stack(b))
        else:
            for i, la, lb in zip(layers, a, b):
                mapping.set_at(adapters, target.path(i, model_cfg.scan_layers, "a"), np.ascontiguousarray(la))
                mapping.set_at(adapters, target.path(i, model_cfg.scan_layers, "b"), np.ascontiguousarray(lb))
    for key in sorted(set(tensors.header) - expected):
        raise SlimjaxError(f"tensor '{key}' in '{weights}' is not a LoRA A/B of a module target_modules selects; "
                           "slimjax cannot place it (DoRA, embedding adapters or extra trained modules?)")
    return options, adapters

