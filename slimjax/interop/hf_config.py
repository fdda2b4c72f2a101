"""Hugging Face ``config.json`` <-> slimjax model keys, for Llama, Mistral, GPT-2 and BERT (``bert``).

Import reads only the keys that change the function the model computes and refuses, by name,
any setting slimjax cannot reproduce exactly (biased Llama projections, exact-erf GELU, ...),
so an import either matches ``transformers`` or fails loudly.
"""

from __future__ import annotations

import json
import os
from typing import Any

from slimjax.config import ModelConfig
from slimjax.errors import SlimjaxError
from slimjax.interop import bert

CONFIG_FILE = "config.json"
# Hugging Face architecture -> the tensor layout slimjax maps it with.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel",
               "bert": "BertForPreTraining"}
# GPT-2 activations that are the tanh approximation slimjax computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def read_config(hf_dir: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    if not os.path.isdir(hf_dir):
        raise SlimjaxError(f"--hf_dir '{hf_dir}' is not a directory; give a local Hugging Face model directory")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SlimjaxError(f"'{hf_dir}' has no {CONFIG_FILE}; a Hugging Face model directory needs config.json "
                           "next to its safetensors")
    return read_json_object(path)


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding an object (config.json, adapter_config.json); one-line errors otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise SlimjaxError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SlimjaxError(f"'{path}' must hold a JSON object")
    return raw


def architecture(hf: dict[str, Any]) -> str:
    """The supported architecture class name of a config (``architectures[0]`` or ``model_type``)."""
    names = hf.get("architectures") or []
    name = names[0] if names else MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type"))
    if name not in ARCHITECTURES and name not in bert.HEADS:
        raise SlimjaxError(f"config.json architecture {name!r} is not supported; slimjax imports "
                           f"{', '.join([*ARCHITECTURES, *bert.HEADS])}")
    return name


def layout(arch: str) -> str:
    """The tensor layout of a supported architecture: "llama", "gpt2" or "bert"."""
    return "bert" if arch in bert.HEADS else ARCHITECTURES[arch]


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value is None:
        raise SlimjaxError(f"config.json has no '{key}'; it is needed to build the model")
    return value


def _require(hf: dict[str, Any], key: str, allowed: tuple, default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise SlimjaxError(f"config.json '{key}' is {value!r}; slimjax supports only {', '.join(map(repr, allowed))}")


def _rope_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE base and scaling from either the ``rope_scaling`` or the newer ``rope_parameters`` key."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind == "default":
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_factor": float(_get(params, "factor"))}
    if kind == "llama3":
        return out | {"rope_scaling": "llama3", "rope_factor": float(_get(params, "factor")),
                      "rope_low_freq_factor": float(_get(params, "low_freq_factor")),
                      "rope_high_freq_factor": float(_get(params, "high_freq_factor")),
                      "rope_original_max_len": int(_get(params, "original_max_position_embeddings"))}
    raise SlimjaxError(f"config.json rope_scaling type {kind!r} is not supported; slimjax implements "
                       "'default', 'linear' and 'llama3'")


def model_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """``model.*`` config values (see configs/base.py) equivalent to a Hugging Face config."""
    arch = architecture(hf)
    if layout(arch) == "bert":
        return bert.model_keys(hf)
    if ARCHITECTURES[arch] == "gpt2":
        _require(hf, "activation_function", TANH_GELUS, "gelu_new")
        _require(hf, "scale_attn_weights", (True,), True)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        d, heads = int(_get(hf, "n_embd")), int(_get(hf, "n_head"))
        return {
            "vocab_size": int(_get(hf, "vocab_size")), "d_model": d, "n_layers": int(_get(hf, "n_layer")),
            "n_heads": heads, "n_kv_heads": heads, "head_dim": d // heads,
            "d_ff": int(hf.get("n_inner") or 4 * d), "max_seq_len": int(_get(hf, "n_positions")),
            "positions": "learned", "norm": "layernorm", "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "mlp": "gelu", "use_bias": True, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "init_std": float(hf.get("initializer_range", 0.02)),
        }
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "attention_bias", (False,), False)
    _require(hf, "mlp_bias", (False,), False)
    d, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    max_len = int(_get(hf, "max_position_embeddings"))
    window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
    if window:
        # No sliding-window attention here: up to the window, full causal attention is the same function.
        max_len = min(max_len, int(window))
    return {
        "vocab_size": int(_get(hf, "vocab_size")), "d_model": d, "n_layers": int(_get(hf, "num_hidden_layers")),
        "n_heads": heads, "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d // heads), "d_ff": int(_get(hf, "intermediate_size")),
        "max_seq_len": max_len, "positions": "rope", "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "mlp": "swiglu", "use_bias": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)), **_rope_keys(hf),
    }


def family(cfg: ModelConfig) -> str:
    """"llama", "gpt2" or "bert": which Hugging Face layout can express this slimjax model."""
    if cfg.family == "encoder":
        bert.check_exportable(cfg)
        return "bert"
    if cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.use_bias:
        return "llama"
    if (cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.use_bias
            and cfg.n_kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.d_model):
        return "gpt2"
    raise SlimjaxError(
        f"this model (positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, "
        f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}) matches neither LlamaForCausalLM (rope, rmsnorm, "
        "swiglu, no biases) nor GPT2LMHeadModel (learned, layernorm, gelu, biases, head_dim*n_heads == d_model)")


def to_hf(cfg: ModelConfig, arch: str | None = None, classes: tuple[str, ...] = ()) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``; ``arch`` picks among the architectures of its family
    (``classes``: the class names of a classifier, which only a BERT sequence classifier holds)."""
    fam = family(cfg)
    if fam == "bert":
        default = bert.CLASSIFIER_ARCH if classes else "BertForPreTraining"
        return bert.to_hf(cfg, arch if arch in bert.HEADS else default, classes)
    arch = arch or ("GPT2LMHeadModel" if fam == "gpt2" else "LlamaForCausalLM")
    if ARCHITECTURES.get(arch) != fam:
        arch = "GPT2LMHeadModel" if fam == "gpt2" else "LlamaForCausalLM"
    common = {"architectures": [arch], "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "torch_dtype": "float32"}
    if fam == "gpt2":
        return common | {
            "model_type": "gpt2", "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rope_scaling = None
    if cfg.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_len}
    out = common | {
        "model_type": "mistral" if arch == "MistralForCausalLM" else "llama", "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0}
    if arch == "MistralForCausalLM":
        out["sliding_window"] = None
    return out
