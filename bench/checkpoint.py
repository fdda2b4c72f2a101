"""Checkpoint cost for a ~100M-parameter train state (params + AdamW moments, float32).

    python bench/checkpoint.py                 # 8 fake CPU devices; state on (2,2,2), restore also on (1,8,1)
    python bench/checkpoint.py --repeats=3 --dir=/fast/disk

Measures, with slimjax's ``Checkpointer`` (Orbax, per-leaf fingerprints included):
- synchronous save: seconds until the checkpoint is complete on disk;
- asynchronous save: seconds the caller (the step loop) is blocked in ``save()``, and the time until
  the background write is complete; target: blocked <= 10% of the synchronous save (``targets``
  in the JSON, with the 1-minute load average: the machine may be shared);
- restore on the saving mesh and on a different one (resharded while read), fingerprints verified;
- bytes on disk against the state's bytes in memory.
The peer, measured in the same run: ``device_get`` + ``np.save`` of every leaf (one file each, fsync),
the plainest way to put the same bytes on the same disk. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from slimjax import config as C  # noqa: E402
from slimjax.checkpoint import Checkpointer  # noqa: E402
from slimjax.configs import gpt2_small  # noqa: E402
from slimjax.models import compute_dtype  # noqa: E402
from slimjax.sharding import Rules, make_mesh  # noqa: E402
from slimjax.train import optimizer as optim  # noqa: E402
from slimjax.train.run import fresh_state  # noqa: E402
from slimjax.train.state import make_setup  # noqa: E402
from slimjax.train.step import tree_bytes  # noqa: E402
from table import print_table, write_result  # noqa: E402


def bench_config(mesh: tuple[int, int, int]) -> C.Config:
    """GPT-2-small-like with 10 layers and a 32k vocabulary: ~96M parameters, float32."""
    c = gpt2_small.get_config()
    c.model.n_layers, c.model.vocab_size, c.model.dtype = 10, 32768, "float32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return C.validate(c)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def randomize_moments(state: dict) -> dict:
    """AdamW moments as after training (random, incompressible) instead of init's zeros.

    Filled leaf by leaf on the host so no more than one leaf is ever held twice.
    """
    rng = np.random.default_rng(1)

    def fill(x):
        if not (x.ndim and jnp.issubdtype(x.dtype, jnp.floating)):
            return x
        return jax.device_put((rng.standard_normal(x.shape, np.float32) * 1e-3).astype(x.dtype), x.sharding)

    return jax.block_until_ready(dict(state, opt_state=jax.tree.map(fill, state["opt_state"])))


def progress(what: str) -> None:
    """A phase marker on stderr with the process's resident memory (the state is ~1.1 GB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.strftime('%H:%M:%S')}] {what} (peak RSS {peak:.1f} GiB)", file=sys.stderr, flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def numpy_save(state: dict, directory: str) -> None:
    os.makedirs(directory)
    for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state))):
        with open(os.path.join(directory, f"{i}.npy"), "wb") as f:
            np.save(f, leaf)
            f.flush()
            os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2, help="each timing is the best of this many")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="slimjax-bench-ckpt-", dir=args.dir)
    try:
        run(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: str, repeats: int) -> None:
    # (1,8,1) rather than (8,1,1): pure data parallelism would replicate the 1.1 GB state on all
    # 8 fake devices, i.e. 9 GB of host memory on this CPU machine; FSDP over 8 reshards every leaf.
    save_mesh, other_mesh = (2, 2, 2), (1, 8, 1)
    cfg = bench_config(save_mesh)
    _, setup, state = fresh_state(cfg, make_mesh(cfg.mesh))
    state = randomize_moments(state.as_dict())
    n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    sync_cfg = dataclasses.replace(cfg.checkpoint, async_save=False, keep=1000)
    async_cfg = dataclasses.replace(sync_cfg, async_save=True)
    meta = {"config": cfg.to_dict(), "step": 0}
    # One untimed save of each kind: compiles the fingerprint program and starts Orbax's threads.
    for name, ck_cfg in (("warm_sync", sync_cfg), ("warm_async", async_cfg)):
        ck = Checkpointer(os.path.join(root, name), ck_cfg)
        ck.save(0, state, {}, meta)
        ck.wait()
        ck.close()
    sync_s, blocked_s, async_total_s, numpy_s, step = [], [], [], [], 0

    progress("warm-up saves done")
    for r in range(repeats):
        numpy_s.append(timed(lambda: numpy_save(state, os.path.join(root, f"npy{r}"))))
        ck = Checkpointer(os.path.join(root, "sync"), sync_cfg)
        step += 1
        sync_s.append(timed(lambda: ck.save(step, state, {}, meta)))
        ck.close()
        ck = Checkpointer(os.path.join(root, "async"), async_cfg)
        step += 1
        t0 = time.perf_counter()
        ck.save(step, state, {}, meta)
        blocked_s.append(time.perf_counter() - t0)
        ck.wait()
        async_total_s.append(time.perf_counter() - t0)
        ck.close()
        progress(f"saves, repeat {r + 1}")

    restore = {}
    for name, mesh in (("same", save_mesh), ("other", other_mesh)):
        target = bench_config(mesh)
        # Only shapes and shardings: no second state is allocated for the target.
        abstract = make_setup(target.model, compute_dtype(target.model.dtype),
                              optim.make_optimizer(target.optimizer, target.train.steps),
                              Rules.from_config(target.mesh), make_mesh(target.mesh)).abstract.as_dict()
        times = []
        for _ in range(repeats):
            ck = Checkpointer(os.path.join(root, "sync"), sync_cfg, read_only=True)
            times.append(timed(lambda: jax.block_until_ready(ck.restore(1, abstract)[0])))  # result freed at once
            ck.close()
        restore[name] = min(times)
        progress(f"restores on the {name} mesh")

    bytes_disk = du(os.path.join(root, "sync", "1"))
    state_bytes = tree_bytes(setup.abstract)
    sync, blocked, total, peer = min(sync_s), min(blocked_s), min(async_total_s), min(numpy_s)
    rows = [
        {"what": "numpy .npy per leaf (peer)", "seconds": peer, "ratio": 1.0},
        {"what": "sync save", "seconds": sync, "ratio": sync / peer},
        {"what": "async save: loop blocked", "seconds": blocked, "ratio": blocked / peer},
        {"what": "async save: until on disk", "seconds": total, "ratio": total / peer},
        {"what": f"restore on {save_mesh}", "seconds": restore["same"], "ratio": restore["same"] / peer},
        {"what": f"restore on {other_mesh}", "seconds": restore["other"], "ratio": restore["other"] / peer},
    ]
    print(f"state: {n_params / 1e6:.1f}M parameters + AdamW moments = {state_bytes / 2**20:.0f} MiB; "
          f"on disk {bytes_disk / 2**20:.0f} MiB ({bytes_disk / state_bytes:.3f} x); "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, best of {repeats}")
    print_table(rows, ["what", "seconds", "ratio"])
    ratio = blocked / sync
    targets = [{"name": "async blocked / sync save", "value": ratio, "target": 0.10, "met": ratio <= 0.10}]
    print_table(targets, ["name", "value", "target", "met"])
    load_1min = os.getloadavg()[0]  # the machine is shared: a loaded one stretches every timing
    print(f"1-minute load average {load_1min:.2f} on {os.cpu_count()} cores")
    path = write_result("checkpoint", {
        "command": "python bench/checkpoint.py" + (f" --repeats={repeats}" if repeats != 2 else ""),
        "targets": targets, "load_average_1min": load_1min,
        "n_params": n_params, "state_bytes": state_bytes, "bytes_on_disk": bytes_disk,
        "save_mesh": list(save_mesh), "restore_mesh_other": list(other_mesh), "repeats": repeats,
        "numpy_save_s": peer, "sync_save_s": sync, "async_blocked_s": blocked, "async_total_s": total,
        "async_blocked_over_sync": ratio, "restore_same_mesh_s": restore["same"],
        "restore_other_mesh_s": restore["other"], "all": {"sync": sync_s, "blocked": blocked_s,
                                                           "async_total": async_total_s, "numpy": numpy_s},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
