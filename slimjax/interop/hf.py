"""Hugging Face model directories in and out: ``import_hf`` and ``export_hf``.

Import checks every tensor name and shape against what ``config.json`` implies before reading
any data, then builds each parameter with ``jax.make_array_from_callback`` on its
``NamedSharding`` from the rules: each device's callback reads only its shard's slice of the
memory-mapped tensors (layer by layer when layers are stacked), so no host ever holds the whole
model. Export streams the other way, one Hugging Face tensor at a time.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from slimjax.config import ModelConfig, fit_to_model, validate
from slimjax.configs import base
from slimjax.errors import SlimjaxError
from slimjax.interop import bert, hf_config, mapping
from slimjax.interop.host_arrays import aligned_empty, fill_float32, fill_many
from slimjax.interop.safetensors_io import TensorIndex, write_model
from slimjax.models import abstract_params
from slimjax.sharding import Rules

TOKENIZER_FILE = "tokenizer.json"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


def base_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
    """configs/base.py with the model section taken from a Hugging Face config (and rows no longer
    than the model accepts); a sequence classifier's also with ``slim.recipe=("classify",)`` and its
    labels as ``slim.classify.classes``."""
    c = base.get_config()
    c.model.update(hf_config.model_keys(hf))
    if bert.classifies(hf_config.architecture(hf)):
        c.slim.recipe, c.slim.classify.classes = ("classify",), bert.labels(hf)
    fit_to_model(c)
    return c


def links_for(cfg: ModelConfig, arch: str, prefix: str = "transformer.") -> list[mapping.Link]:
    """The links of architecture ``arch`` for this model shape (``prefix``: GPT-2's tensor prefix)."""
    fam = hf_config.layout(arch)
    return bert.links(cfg, arch) if fam == "bert" else mapping.links_for(cfg, fam, prefix)


def _ignorable(name: str, arch: str, cfg: ModelConfig) -> bool:
    fam = hf_config.layout(arch)
    return bert.ignorable(name) if fam == "bert" else mapping.ignorable(name, fam, cfg.tie_embeddings)


def _hf_shape(link: mapping.Link, slim_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape a parameter of ``slim_shape`` maps to (computed without data)."""
    return tuple(jax.eval_shape(link.to_hf, jax.ShapeDtypeStruct(slim_shape, np.float32)).shape)


def expected_tensors(cfg: ModelConfig, links: list[mapping.Link], shapes: dict | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape, for every tensor the model reads (fused tensors whole);
    ``shapes`` are the model's abstract parameters when the caller has them."""
    shapes = abstract_params(cfg)[2] if shapes is None else shapes
    by_template: dict[str, tuple[int, ...]] = {}
    for link in links:
        shape = tuple(mapping.get_at(shapes, mapping.slim_path(link, 0, cfg.scan_layers)).shape)
        hf_shape = _hf_shape(link, shape[1:] if link.per_layer and cfg.scan_layers else shape)
        if link.part:  # a slice of a fused tensor: the whole runs to the furthest part's end
            axis, _, stop = link.part
            prev = by_template[link.hf][axis] if link.hf in by_template else 0
            hf_shape = hf_shape[:axis] + (max(stop, prev),) + hf_shape[axis + 1:]
        by_template[link.hf] = hf_shape
    return {link.hf_name(layer): by_template[link.hf] for link in links
            for layer in (range(cfg.n_layers) if link.per_layer else [None])}


def check_tensors(tensors: TensorIndex, cfg: ModelConfig, arch: str, links: list[mapping.Link],
                  shapes: dict) -> None:
    """Every expected tensor present with its shape, and nothing unexplained left over."""
    expected = expected_tensors(cfg, links, shapes)
    present = tensors.names()
    where = tensors.directory
    for name, shape in expected.items():
        if name not in present:
            raise SlimjaxError(f"tensor '{name}' is missing from '{where}'; a {arch} with this config.json needs it")
        if tensors.shape(name) != shape:
            raise SlimjaxError(f"tensor '{name}' in '{where}' has shape {tensors.shape(name)} but config.json "
                               f"implies {shape}")
        if tensors.dtype(name) not in FLOAT_DTYPES:
            raise SlimjaxError(f"tensor '{name}' in '{where}' is {tensors.dtype(name)}; slimjax imports floating-point "
                               f"weights ({', '.join(FLOAT_DTYPES)}), not quantized ones")
    for name in sorted(present - set(expected)):
        if not _ignorable(name, arch, cfg):
            raise SlimjaxError(f"tensor '{name}' in '{where}' has no place in a {arch} with this config.json "
                               "(wrong architecture or layer count?)")


def tensor_reader(tensors: TensorIndex, link: mapping.Link) -> Callable[[int | None], np.ndarray]:
    """``read(layer)``: the link's tensor for one layer in slimjax's layout, as a lazy view of the
    memory-mapped file (slicing it reads only the slice)."""

    def read(layer: int | None) -> np.ndarray:
        src = tensors.array(link.hf_name(layer))
        if link.part:
            axis, start, stop = link.part
            src = src[(slice(None),) * axis + (slice(start, stop),)]
        return link.to_slim(src)

    return read


def with_classifier_head(axes: dict, shapes: dict, d_model: int, n_classes: int) -> tuple[dict, dict]:
    """Axes and shapes with the ``classifier`` head of ``slim.classify`` (kernel [embed, classes] and
    bias; ``tests/test_bert_interop.py`` checks them against the transform's own build). Interop
    sits below slim in the layers, so it states the head's shape instead of building the spec."""
    head_axes = {"kernel": ("embed", "classes"), "bias": ("classes",)}
    head = {"kernel": jax.ShapeDtypeStruct((d_model, n_classes), jnp.float32),
            "bias": jax.ShapeDtypeStruct((n_classes,), jnp.float32)}
    return {**axes, "classifier": head_axes}, {**shapes, "classifier": head}


def import_hf(hf_dir: str, mesh: Mesh, rules: Rules, *, scan_layers: bool = True,
              **model_overrides: Any) -> tuple[ModelConfig, dict]:
    """(model config, parameters sharded by ``rules`` on ``mesh``) from a Hugging Face directory.

    ``model_overrides`` set other model keys that do not change the parameters (dtype, remat...).
    """
    hf = hf_config.read_config(hf_dir)
    arch = hf_config.architecture(hf)
    c = base_config(hf)
    c.model.scan_layers = scan_layers
    c.model.update(model_overrides)
    full = validate(c)
    cfg = full.model
    tensors = TensorIndex(hf_dir)
    prefix = "transformer." if any(n.startswith("transformer.") for n in tensors.names()) else ""
    links = links_for(cfg, arch, prefix)
    _, axes, shapes = abstract_params(cfg)
    if "classify" in full.slim.recipe:  # a sequence classifier: the classify transform's head, as it builds it
        axes, shapes = with_classifier_head(axes, shapes, cfg.d_model, len(full.slim.classify.classes))
    check_tensors(tensors, cfg, arch, links, shapes)
    shardings = rules.tree_shardings(axes, shapes, mesh)
    params: dict = {}
    for link in links:
        read = tensor_reader(tensors, link)
        stacked = link.per_layer and cfg.scan_layers
        for layer in ([None] if stacked or not link.per_layer else range(cfg.n_layers)):
            path = mapping.slim_path(link, layer, cfg.scan_layers)
            shape, sharding = mapping.get_at(shapes, path).shape, mapping.get_at(shardings, path)

            def shard(index, read=read, layer=layer, stacked=stacked, shape=shape):
                dims = [len(range(n)[i]) for n, i in zip(shape, index)]
                out = aligned_empty(tuple(dims))
                if stacked:  # [layers, ...]: read each layer's tensor, only this shard's slice of it
                    fill_many([(out[j], read(i)[index[1:]]) for j, i in enumerate(range(cfg.n_layers)[index[0]])])
                else:
                    fill_float32(out, read(layer)[index])
                return out

            mapping.set_at(params, path, jax.make_array_from_callback(shape, sharding, shard))
    if hf_config.layout(arch) == "bert":  # heads this architecture does not carry start at zero
        for link in bert.absent_links(cfg, arch):
            sharding = mapping.get_at(shardings, link.path)
            zeros = jax.jit(lambda s=mapping.get_at(shapes, link.path): np.zeros(s.shape, np.float32),
                            out_shardings=sharding)()
            mapping.set_at(params, link.path, zeros)
    return cfg, params


def export_hf(cfg: ModelConfig, params: dict, out_dir: str, *, architecture: str | None = None,
              classes: tuple[str, ...] = (), max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes ``config.json`` and safetensors that ``transformers`` loads; returns the file names.
    ``out_dir`` must be new or empty (the tokenizer: ``tokenizer_files.export_tokenizer``).
    ``classes``: a classifier's class names (``params`` then hold its ``classifier`` head).

    With several processes every one must call this (each tensor is gathered collectively);
    process 0 writes the files (and gets their names), the others get ``[]``.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise SlimjaxError(f"--out '{out_dir}' exists and is not an empty directory; give a new one")
    writer = jax.process_index() == 0  # every process gathers each tensor; process 0 writes it
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("slimjax export_hf: out_dir checked")
    hf = hf_config.to_hf(cfg, architecture, classes)
    links = links_for(cfg, hf["architectures"][0])
    shapes = expected_tensors(cfg, links, params)  # the parameters given: a classifier's head included
    by_name: dict[str, list[tuple[mapping.Link, int | None]]] = {}
    for link in links:
        for layer in range(cfg.n_layers) if link.per_layer else [None]:
            by_name.setdefault(link.hf_name(layer), []).append((link, layer))

    # Host copies of the parameters behind the tensor being written: a fused tensor needs three, and
    # layers of a stacked parameter are written one after another, so each is fetched once.
    host: dict[mapping.Path, np.ndarray] = {}

    def param(path: mapping.Path) -> np.ndarray:
        if path not in host:
            if len(host) == 3:
                host.pop(next(iter(host)))
            value = mapping.get_at(params, path)
            if isinstance(value, jax.Array) and not value.is_fully_addressable:  # collective: all processes
                value = multihost_utils.process_allgather(value, tiled=True)
            host[path] = np.asarray(jax.device_get(value), np.float32)
        return host[path]

    def fetch(name: str) -> np.ndarray:
        parts = []
        for link, layer in by_name[name]:
            value = param(mapping.slim_path(link, layer, cfg.scan_layers))
            if link.per_layer and cfg.scan_layers:
                value = value[layer]
            parts.append((link.part, link.to_hf(value)))
        if len(parts) == 1:
            return parts[0][1]
        parts.sort(key=lambda p: p[0][1])
        return np.concatenate([p for _, p in parts], axis=parts[0][0][0])

    specs = [(name, shapes[name], np.dtype(np.float32)) for name in mapping.hf_names(links, cfg.n_layers)]
    if not writer:  # take part in the same gathers, in the same order, and write nothing
        for name, _, _ in specs:
            fetch(name)
        return []
    os.makedirs(out_dir, exist_ok=True)
    files = write_model(out_dir, specs, fetch, max_shard_bytes)
    with open(os.path.join(out_dir, hf_config.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    files.append(hf_config.CONFIG_FILE)
    return files
