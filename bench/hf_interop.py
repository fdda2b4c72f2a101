"""Hugging Face checkpoint import/export: slimjax (memory-mapped safetensors streamed into sharded
jax.Arrays, and back one tensor at a time) against transformers' own ``from_pretrained`` and
``save_pretrained`` (torch CPU) on the same random Llama-style checkpoint, side by side in one run.

Each side's load is timed to a usable model (slimjax: parameters on the devices; transformers:
the nn.Module in f32), and the logits of both on the same tokens are compared. The two sides
alternate (slimjax, transformers, slimjax, ...) after one untimed call each, so load from other
jobs on the machine falls on both alike; each figure is the median of ``--repeats`` calls.

Usage: python bench/hf_interop.py [--layers=8] [--hidden=512] [--dtype=bfloat16] [--repeats=7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from slimjax import config as C
from slimjax.configs import base
from slimjax.interop.hf import export_hf, import_hf
from slimjax.sharding import Rules, make_mesh
from table import print_table, write_result


def build_checkpoint(path: str, layers: int, hidden: int, dtype: str) -> int:
    """A random Llama (GQA, 32k vocabulary) saved with save_pretrained; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def alternating(sides: dict[str, Callable[[], object]], repeats: int,
                tidy: Callable[[object], None] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Each side called once untimed, then ``repeats`` rounds of one timed call per side in turn;
    returns every side's times and last result. ``tidy(result)``, untimed, clears a side's
    previous result before its next call (a saved directory)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    out = {name: fn() for name, fn in sides.items()}
    for _ in range(repeats):
        for name, fn in sides.items():
            if tidy is not None:
                tidy(out[name])
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    root = tempfile.mkdtemp(prefix="slimjax-bench-hf-")
    try:
        src = os.path.join(root, "src")
        n_params = build_checkpoint(src, args.layers, args.hidden, args.dtype)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        c = base.get_config()
        c.mesh.data = 1
        mesh_cfg = C.validate(c).mesh
        mesh, rules = make_mesh(mesh_cfg, jax.devices()[:1]), Rules.from_config(mesh_cfg)

        def slimjax_load():
            cfg, params = import_hf(src, mesh, rules, dtype="float32")
            jax.block_until_ready(params)
            return cfg, params

        def hf_load():
            return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

        load_before = os.getloadavg()[0]
        load_times, loaded = alternating({"slimjax": slimjax_load, "transformers": hf_load}, args.repeats)
        (cfg, params), hf_model = loaded["slimjax"], loaded["transformers"]

        def slimjax_save():
            out = tempfile.mkdtemp(dir=root)
            shutil.rmtree(out)
            export_hf(cfg, params, out)
            return out

        def hf_save():
            out = tempfile.mkdtemp(dir=root)
            hf_model.save_pretrained(out)
            return out

        save_times, _ = alternating({"slimjax": slimjax_save, "transformers": hf_save}, args.repeats,
                                    tidy=shutil.rmtree)
        load_after = os.getloadavg()[0]

        from flax import nnx

        from slimjax.models import abstract_params

        tokens = np.random.default_rng(0).integers(0, 32000, (1, 64))
        graphdef, _, _ = abstract_params(cfg)
        ours = np.asarray(nnx.merge(graphdef, params)(tokens))
        with torch.no_grad():
            theirs = hf_model(torch.tensor(tokens)).logits.numpy()
        rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = size / 1e6
    t_import, t_hf_load = (statistics.median(load_times[k]) for k in ("slimjax", "transformers"))
    t_export, t_hf_save = (statistics.median(save_times[k]) for k in ("slimjax", "transformers"))
    rows = [
        {"operation": "load (file -> f32 model)", "slimjax_s": t_import, "transformers_s": t_hf_load,
         "speedup": t_hf_load / t_import, "slimjax_MB_per_s": mb / t_import},
        {"operation": "save (f32 model -> file)", "slimjax_s": t_export, "transformers_s": t_hf_save,
         "speedup": t_hf_save / t_export, "slimjax_MB_per_s": n_params * 4 / 1e6 / t_export},
    ]
    targets = [{"name": "load speed vs transformers", "value": t_hf_load / t_import, "target": 1.0,
                "met": t_hf_load / t_import >= 1.0}]
    print(f"random Llama, {n_params / 1e6:.1f}M parameters, {args.layers} layers, {args.dtype} file of {mb:.0f} MB; "
          f"logits max relative difference {rel:.2e}")
    print_table(rows, ["operation", "slimjax_s", "transformers_s", "speedup", "slimjax_MB_per_s"])
    print_table(targets, ["name", "value", "target", "met"])
    print(f"1-minute load average {load_before:.1f} before, {load_after:.1f} after")
    path = write_result("hf_interop", {
        "command": "python " + " ".join(sys.argv), "n_params": n_params, "layers": args.layers,
        "hidden": args.hidden, "file_dtype": args.dtype, "file_mb": mb, "logits_rel_diff": rel,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": load_after},
        "times_s": {"load": load_times, "save": save_times}, "rows": rows, "targets": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
