"""Model FLOPs per token, accelerator peaks and a measured CPU peak, for MFU.

The formula (one, used everywhere in slimjax; PaLM appendix B / Chinchilla convention):

    training FLOPs per token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

``N_matmul`` counts the weights of every matmul: attention projections, MLP and the output
layer (the embedding lookup is a gather, not a matmul). The second term is attention's QK^T and
AV (2 matmuls x 2 FLOPs x 3 for forward + backward), with no discount for the causal mask.
Recomputation from remat is not counted: this is model FLOPs utilisation, not hardware FLOPs.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from slimjax.config import ModelConfig

# Dense bf16 peak per chip, FLOP/s (vendor figures; see shared/ANCHORS.md).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls (attention, MLP, output layer)."""
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attn = d * (h + 2 * k) * hd + h * hd * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token by the formula in the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def device_peak(device: jax.Device) -> float | None:
    """Vendor peak for a known accelerator, else None."""
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``n x n`` matmuls on the default device.

    On CPU all fake devices share the same cores, so this host figure is the denominator for
    the whole mesh.
    """
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def system_peak(devices: list[jax.Device]) -> tuple[float, str]:
    """(peak FLOP/s of all devices, how it was obtained) for MFU."""
    peak = device_peak(devices[0])
    if peak is not None:
        return peak * len(devices), f"vendor peak {devices[0].device_kind}"
    if devices[0].platform == "cpu":
        return measured_matmul_peak(), "measured f32 matmul (host)"
    return float("nan"), f"unknown device {devices[0].device_kind}"
