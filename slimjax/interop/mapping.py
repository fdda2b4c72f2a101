"""Which Hugging Face tensor each slimjax parameter comes from, and the layout change between them.

A :class:`Link` ties one slimjax parameter (per layer, when the model stacks its layers) to one
Hugging Face tensor, or to a slice of one: GPT-2 fuses q, k and v into ``c_attn``. Transforms
are transposes and reshapes only, so on a memory-mapped tensor they stay lazy views and a
shard reads just its own bytes. Layouts:

- Llama/Mistral ``nn.Linear`` weights are ``[out, in]``; slimjax kernels are ``[in..., out...]``
  with heads as a real axis: ``q_proj [H*hd, D] -> wq [D, H, hd]``, ``o_proj [D, H*hd] -> wo [H, hd, D]``.
  Both use the half-split RoPE layout, so q and k need no permutation.
- GPT-2 ``Conv1D`` weights are already ``[in, out]``; ``c_attn [D, 3D]`` splits into q, k, v.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from slimjax.config import ModelConfig

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Link:
    """slimjax parameter ``path`` <-> Hugging Face tensor ``hf`` (``{i}`` = layer index).

    ``part`` = (axis, start, stop) when the parameter is a slice of a fused tensor. ``to_slim``
    maps the (sliced) tensor of one layer to slimjax's layout and ``to_hf`` maps back.
    """

    path: Path
    hf: str
    per_layer: bool
    to_slim: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    part: tuple[int, int, int] | None = None

    def hf_name(self, layer: int | None) -> str:
        return self.hf.format(i=layer)


def same(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def split_out(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
    """``[out, in] -> [in, *shape]`` (a Linear weight to a kernel with a structured output)."""
    return lambda w: w.T.reshape(w.shape[1], *shape)


def merge_out(k: np.ndarray) -> np.ndarray:
    """``[in, a, b] -> [a*b, in]``."""
    return k.reshape(k.shape[0], -1).T


def reshape(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.reshape(shape)


def flatten_to(ndim_keep_last: int) -> Callable[[np.ndarray], np.ndarray]:
    """Merge all but the last ``ndim_keep_last`` dims (``[H, hd, D] -> [H*hd, D]``, ``[H, hd] -> [H*hd]``)."""
    return lambda x: x.reshape(-1, *x.shape[x.ndim - ndim_keep_last:]) if ndim_keep_last else x.reshape(-1)


def llama_links(cfg: ModelConfig) -> list[Link]:
    """Links for ``LlamaForCausalLM`` / ``MistralForCausalLM``."""
    h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    links = [
        Link(("embed", "embedding"), "model.embed_tokens.weight", False, same, same),
        Link(("final_norm", "scale"), "model.norm.weight", False, same, same),
        Link(("blocks", "attn_norm", "scale"), layer + "input_layernorm.weight", True, same, same),
        Link(("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", True, same, same),
        Link(("blocks", "attn", "wq", "kernel"), layer + "self_attn.q_proj.weight", True, split_out(h, hd), merge_out),
        Link(("blocks", "attn", "wk", "kernel"), layer + "self_attn.k_proj.weight", True, split_out(k, hd), merge_out),
        Link(("blocks", "attn", "wv", "kernel"), layer + "self_attn.v_proj.weight", True, split_out(k, hd), merge_out),
        Link(("blocks", "attn", "wo", "kernel"), layer + "self_attn.o_proj.weight", True,
             lambda w: w.T.reshape(h, hd, w.shape[0]), lambda x: x.reshape(h * hd, -1).T),
        Link(("blocks", "mlp", "gate", "kernel"), layer + "mlp.gate_proj.weight", True, transpose, transpose),
        Link(("blocks", "mlp", "up", "kernel"), layer + "mlp.up_proj.weight", True, transpose, transpose),
        Link(("blocks", "mlp", "down", "kernel"), layer + "mlp.down_proj.weight", True, transpose, transpose),
    ]
    if not cfg.tie_embeddings:
        links.append(Link(("lm_head", "kernel"), "lm_head.weight", False, transpose, transpose))
    return links


def gpt2_links(cfg: ModelConfig, prefix: str = "transformer.") -> list[Link]:
    """Links for ``GPT2LMHeadModel``; ``prefix`` is "transformer." (save_pretrained) or "" (original files)."""
    h, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    layer = prefix + "h.{i}."
    links = [
        Link(("embed", "embedding"), prefix + "wte.weight", False, same, same),
        Link(("pos_embed",), prefix + "wpe.weight", False, same, same),
        Link(("final_norm", "scale"), prefix + "ln_f.weight", False, same, same),
        Link(("final_norm", "bias"), prefix + "ln_f.bias", False, same, same),
    ]
    for name, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        links += [Link(("blocks", name, "scale"), layer + hf + ".weight", True, same, same),
                  Link(("blocks", name, "bias"), layer + hf + ".bias", True, same, same)]
    for j, name in enumerate(("wq", "wk", "wv")):
        links += [
            Link(("blocks", "attn", name, "kernel"), layer + "attn.c_attn.weight", True,
                 lambda w: w.reshape(w.shape[0], h, hd), lambda x: x.reshape(x.shape[0], -1), (1, j * d, (j + 1) * d)),
            Link(("blocks", "attn", name, "bias"), layer + "attn.c_attn.bias", True,
                 reshape(h, hd), flatten_to(0), (0, j * d, (j + 1) * d)),
        ]
    links += [
        Link(("blocks", "attn", "wo", "kernel"), layer + "attn.c_proj.weight", True, reshape(h, hd, d), flatten_to(1)),
        Link(("blocks", "attn", "wo", "bias"), layer + "attn.c_proj.bias", True, same, same),
        Link(("blocks", "mlp", "up", "kernel"), layer + "mlp.c_fc.weight", True, same, same),
        Link(("blocks", "mlp", "up", "bias"), layer + "mlp.c_fc.bias", True, same, same),
        Link(("blocks", "mlp", "down", "kernel"), layer + "mlp.c_proj.weight", True, same, same),
        Link(("blocks", "mlp", "down", "bias"), layer + "mlp.c_proj.bias", True, same, same),
    ]
    if not cfg.tie_embeddings:
        links.append(Link(("lm_head", "kernel"), "lm_head.weight", False, transpose, transpose))
    return links


def links_for(cfg: ModelConfig, fam: str, gpt2_prefix: str = "transformer.") -> list[Link]:
    """The links of family ``fam`` ("llama" or "gpt2") for this model shape."""
    return gpt2_links(cfg, gpt2_prefix) if fam == "gpt2" else llama_links(cfg)


def ignorable(name: str, fam: str, tied: bool) -> bool:
    """Tensors some checkpoints carry that hold no parameters: causal-mask and RoPE buffers, and a
    duplicate ``lm_head.weight`` in checkpoints of tied models."""
    if tied and name == "lm_head.weight":
        return True
    if fam == "gpt2":
        return name.endswith((".attn.bias", ".attn.masked_bias"))
    return name.endswith("rotary_emb.inv_freq")


def hf_names(links: list[Link], n_layers: int) -> list[str]:
    """Every Hugging Face tensor name the links read, in a stable order (fused tensors once)."""
    out, seen = [], set()
    for link in links:
        for layer in (range(n_layers) if link.per_layer else [None]):
            name = link.hf_name(layer)
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


def get_at(tree: dict, path: Path) -> Any:
    """The leaf (or subtree) of a nested parameter dict at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def set_at(tree: dict, path: Path, value: Any) -> None:
    """Sets ``path`` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def slim_path(link: Link, layer: int | None, scan_layers: bool) -> Path:
    """Where a link's parameter lives in the param dict: unrolled layers add the layer index."""
    if link.per_layer and not scan_layers:
        return (link.path[0], layer, *link.path[1:])
    return link.path
