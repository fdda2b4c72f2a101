"""Small builders shared by tests: configs, synthetic packed batches, a state + compiled step."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import socket
import subprocess
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from slimjax import config as C
from slimjax.configs import base
from slimjax.data import pipeline
from slimjax.sharding import make_mesh
from slimjax.train.run import build_fresh, fresh_state
from slimjax.train.state import build_model, params_of


def small_config(family: str = "llama", **model_overrides) -> C.Config:
    """A 2-layer model small enough to compile quickly, shaped to divide every test mesh."""
    c = base.get_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 256, 64, 2, 8, 4
    m.head_dim, m.d_ff, m.max_seq_len = 8, 128, 64
    m.dtype = "float32"
    if family in ("gpt2", "bert"):
        m.positions, m.norm, m.mlp, m.use_bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
        m.n_kv_heads = m.n_heads
        if family == "bert":  # the encoder: post-LN, exact GELU, MLM + NSP
            m.family, m.norm_position, m.mlp = "encoder", "post", "gelu_exact"
            c.objective.next_token, c.objective.mlm, c.objective.nsp = 0.0, 1.0, 1.0
            c.train.sample_tokens = 0
    else:
        m.tie_embeddings = False
    for k, v in model_overrides.items():
        setattr(m, k, v)
    c.data.seq_len = 32
    c.train.global_batch_size = 16
    c.optimizer.warmup_steps = 1
    c.train.steps = 10
    return C.validate(c)


def with_mesh(cfg: C.Config, data: int, fsdp: int, tensor: int) -> C.Config:
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=data, fsdp=fsdp, tensor=tensor))


def with_train(cfg: C.Config, **kw) -> C.Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


def with_lora(cfg: C.Config, rank: int = 4, **lora) -> C.Config:
    """``cfg`` with the LoRA recipe (``slim.recipe=("lora",)``) and these ``slim.lora`` options."""
    if "targets" in lora:
        lora["targets"] = tuple(lora["targets"])
    return dataclasses.replace(cfg, slim=dataclasses.replace(
        cfg.slim, recipe=("lora",), lora=dataclasses.replace(cfg.slim.lora, rank=rank, **lora)))


def flat(tree) -> dict:
    """{'blocks/attn/wq/kernel': leaf} for a nested tree."""
    from slimjax.sharding import path_str

    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def synthetic_rows(cfg: C.Config, n_rows: int, seed: int = 0) -> pipeline.PackedRows:
    """Random documents of random lengths packed like real data (several segments per row)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_rows * cfg.data.seq_len + 1:
        n = int(rng.integers(3, cfg.data.seq_len))
        docs.append(rng.integers(4, cfg.model.vocab_size, size=n).astype(np.int32))
        total += n
    return pipeline.pack_concat_split(docs, cfg.data.seq_len)


def synthetic_batch(cfg: C.Config, seed: int = 0) -> dict[str, np.ndarray]:
    rows = synthetic_rows(cfg, cfg.train.global_batch_size, seed)
    idx = np.arange(cfg.train.global_batch_size)
    return pipeline.to_example({k: v[idx] for k, v in dataclasses.asdict(rows).items()})


def synthetic_encoder_batch(cfg: C.Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Encoder pre-training rows (pairs, masks) from random documents, as the data pipeline builds them."""
    from slimjax.data import mlm

    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, cfg.model.vocab_size, size=int(rng.integers(20, 60))) for _ in range(8)]
    pieces = mlm.cut_pieces(docs, (cfg.data.seq_len - 3) // 2)
    specials = mlm.Specials(cls=2, sep=3, pad=0, mask=1, vocab_size=cfg.model.vocab_size)
    rows = [mlm.make_row(pieces, int(pieces.anchors[i % len(pieces)]), cfg.data.seq_len, cfg.pretrain, specials,
                         mlm.row_rng(seed, 0, i), None) for i in range(cfg.train.global_batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def build_state(cfg: C.Config, devices=None):
    """(mesh, rules, setup, state): the sharded train state for ``cfg``, nothing compiled but init."""
    mesh = make_mesh(cfg.mesh, devices)
    return (mesh, *fresh_state(cfg, mesh))


def build(cfg: C.Config, devices=None):
    """(mesh, setup, state, compiled train step, compiled eval step, batch sharding) for ``cfg``."""
    mesh = make_mesh(cfg.mesh, devices)
    return (mesh, *build_fresh(cfg, mesh))


def run_steps(cfg: C.Config, n: int, devices=None, seed: int = 0) -> list[float]:
    """Losses of ``n`` train steps on fixed synthetic batches."""
    _, _, state, train_step, _, sharding = build(cfg, devices)
    make = synthetic_encoder_batch if cfg.model.family == "encoder" else synthetic_batch
    losses = []
    for i in range(n):
        batch = pipeline.to_global(make(cfg, seed + i), sharding)
        state, metrics = train_step(state, batch)
        losses.append(float(jax.device_get(metrics["loss"])))
    return losses


def random_model(cfg, seed=0):
    """A model with every parameter random (norm scales and biases too), so all terms are tested."""
    model = build_model(cfg.model, jax.random.key(seed), np.float32)
    params = params_of(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    # Norm scales around 1 (a realistic regime), everything else N(0, 0.3^2).
    leaves = [np.asarray(0.3 * jax.random.normal(k, x.shape), np.float32)
              + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
              for k, (path, x) in zip(keys, flat)]
    params = jax.tree.unflatten(treedef, leaves)
    return nnx.graphdef(model), params


def assert_segments_isolated(cfg: C.Config, batch: dict[str, np.ndarray]) -> None:
    """Changing one packed document's tokens changes no logit outside it (bit for bit)."""
    graphdef, params = random_model(cfg)
    model = nnx.merge(graphdef, params)
    seg = batch["segment_ids"]
    row = int(np.argmax(seg.max(axis=1)))  # a row with several documents
    target = 2
    assert (seg[row] == target).any() and seg[row].max() > target
    perturbed = batch["inputs"].copy()
    where = seg[row] == target
    perturbed[row, where] = (perturbed[row, where] + 7) % cfg.model.vocab_size
    base = np.asarray(model(batch["inputs"], batch["positions"], seg))
    moved = np.asarray(model(perturbed, batch["positions"], seg))
    others = seg[row] != target
    np.testing.assert_array_equal(base[row, others], moved[row, others])  # bit-identical elsewhere
    assert np.abs(base[row, where] - moved[row, where]).max() > 1e-3  # the segment itself changed
    np.testing.assert_array_equal(np.delete(base, row, 0), np.delete(moved, row, 0))


def snapshot(path: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (or of the file itself): "nothing changed" checks."""
    if os.path.isfile(path):
        return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for f in glob.glob(os.path.join(path, "**"), recursive=True):
        if os.path.isfile(f):
            out[os.path.relpath(f, path)] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment for worker processes: without conftest's 8-device XLA_FLAGS, since each worker
    sets its own CPU device count."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


# What a coordinator port taken by someone else between free_port() and bind looks like.
PORT_CLASH = ("address already in use", "failed to add port", "failed to bind")


def run_processes(argv_for: Callable[[int, int], Sequence[str]], n: int, timeout: float = 600) -> list[str]:
    """Runs ``n`` real processes ``argv_for(process_id, port)`` that meet on a free 127.0.0.1 port and
    returns their stdouts; any failure asserts with the failing process's stderr. A port clash (the
    port was taken between choosing and binding it) is retried once on a new port."""
    for attempt in range(2):
        port = free_port()
        # Files, not pipes: a chatty process must never block on a full pipe while we poll.
        logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(n)]
        procs = [subprocess.Popen(list(argv_for(i, port)), env=child_env(), stdout=out, stderr=err, text=True)
                 for i, (out, err) in enumerate(logs)]
        results = _wait_all(procs, logs, timeout)
        failed = [(i, out, err) for i, (code, out, err) in enumerate(results) if code != 0]
        if not failed:
            return [out for _, out, _ in results]
        clash = any(marker in err.lower() for _, _, err in failed for marker in PORT_CLASH)
        if attempt == 1 or not clash:
            i, _, err = failed[0]
            raise AssertionError(f"process {i} of {n} failed (exit {results[i][0]}):\n{err[-4000:]}")


def _wait_all(procs: list[subprocess.Popen], logs: list, timeout: float) -> list[tuple[int, str, str]]:
    """Waits for every process; once one fails (or time runs out) the others get 30 s, then are killed,
    so a crashed peer does not leave the rest waiting on collectives for the whole timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + 30)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    results = []
    for p, files in zip(procs, logs):
        code = p.wait()
        texts = []
        for f in files:
            f.seek(0)
            texts.append(f.read())
            f.close()
        results.append((code, *texts))
    return results


def join_cpu_run(process_id: int, num_processes: int, port: int, devices: int = 8) -> None:
    """Makes this process one of ``num_processes`` real processes on 127.0.0.1:``port`` holding
    ``devices`` CPU devices in all, through slimjax's own ``distributed.initialize`` (call it
    before anything touches a JAX device)."""
    from slimjax.train import distributed

    dist = dataclasses.replace(C.validate(base.get_config()).distributed, cpu_devices=devices // num_processes,
                               timeout_s=120)
    if num_processes > 1:
        dist = dataclasses.replace(dist, coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id)
    distributed.initialize(dist)
