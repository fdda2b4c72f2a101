"""A float64 NumPy decoder written from the math, independent of slimjax's JAX code."""

from __future__ import annotations

import numpy as np


def _norm(x, p, kind, eps):
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _dense(x, p, n_in=1):
    k = p["kernel"]
    x2 = x.reshape(*x.shape[: x.ndim - n_in], -1)
    y = x2 @ k.reshape(-1, int(np.prod(k.shape[n_in:]))) if n_in > 1 else x @ k.reshape(k.shape[0], -1)
    y = y.reshape(*x.shape[: x.ndim - n_in], *k.shape[n_in:])
    return y + p["bias"] if "bias" in p else y


def _rope(x, pos, theta):
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (np.arange(half) / half)
    ang = pos[..., None] * freq  # b t half
    cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1 + np.exp(-x))


def forward(params, cfg, tokens, positions, segment_ids):
    """Logits in float64 for the decoder described by ``cfg`` (a slimjax ModelConfig)."""
    p = _to64(params)
    b, t = tokens.shape
    x = p["embed"]["embedding"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"][positions]
    causal = np.tril(np.ones((t, t), bool))
    mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # b q k
    groups = cfg.n_heads // cfg.n_kv_heads
    for layer in range(cfg.n_layers):
        lp = _layer(p["blocks"], layer)
        h = _norm(x, lp["attn_norm"], cfg.norm, cfg.norm_eps)
        q = _dense(h, lp["attn"]["wq"])
        k = _dense(h, lp["attn"]["wk"])
        v = _dense(h, lp["attn"]["wv"])
        if cfg.positions == "rope":
            q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head n uses kv head n // groups
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(mask[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", w, v)
        x = x + _dense(o, lp["attn"]["wo"], n_in=2)
        h = _norm(x, lp["mlp_norm"], cfg.norm, cfg.norm_eps)
        if cfg.mlp == "swiglu":
            u = _silu(_dense(h, lp["mlp"]["gate"])) * _dense(h, lp["mlp"]["up"])
        else:
            u = _gelu(_dense(h, lp["mlp"]["up"]))
        x = x + _dense(u, lp["mlp"]["down"])
    x = _norm(x, p["final_norm"], cfg.norm, cfg.norm_eps)
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


def _layer(blocks, i):
    """Layer i of either layout: stacked (scan) arrays or a dict keyed by layer index."""
    if i in blocks:
        return blocks[i]
    return _map(lambda a: a[i], blocks)


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _to64(tree):
    return _map(lambda a: np.asarray(a, np.float64), tree)
