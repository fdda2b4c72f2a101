"""One process of a real multi-process import/export (started by tests/test_interop.py).

Usage: python interop_worker.py PROCESS_ID NUM_PROCESSES PORT HF_DIR OUT_DIR RESULT_PREFIX

Imports HF_DIR onto a (data=1, fsdp=2, tensor=4) mesh spanning every process's devices (each
process materialises only its own devices' shards), computes logits on fixed tokens across
the processes, and exports to OUT_DIR (process 0 writes). Writes RESULT_PREFIX<pid>.json and,
from process 0, RESULT_PREFIX.npy with the gathered logits.
"""

import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))  # helpers.py, when started as a script

from helpers import join_cpu_run  # noqa: E402


def main(process_id: int, num_processes: int, port: int, hf_dir: str, out_dir: str, prefix: str) -> None:
    join_cpu_run(process_id, num_processes, port)
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from slimjax import config as C
    from slimjax.configs import base
    from slimjax.interop.hf import export_hf, import_hf
    from slimjax.models import abstract_params
    from slimjax.sharding import Rules, activation_rules, make_mesh

    c = base.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 4
    mesh_cfg = C.validate(c).mesh
    mesh, rules = make_mesh(mesh_cfg), Rules.from_config(mesh_cfg)
    cfg, params = import_hf(hf_dir, mesh, rules, dtype="float32")
    local = sum(int(s.data.size) for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    total = sum(int(leaf.size) for leaf in jax.tree.leaves(params))

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40)).astype(np.int32)
    graphdef, _, _ = abstract_params(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    with activation_rules(mesh, rules):
        logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t), out_shardings=replicated)(
            params, jax.device_put(tokens, replicated))
    logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    files = export_hf(cfg, params, out_dir)
    if process_id == 0:
        np.save(prefix + ".npy", logits)
    with open(f"{prefix}{process_id}.json", "w") as f:
        json.dump({"files": files, "local_values": local, "total_values": total,
                   "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
