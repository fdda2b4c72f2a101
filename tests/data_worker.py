"""One process of a real multi-process data run (started by tests/test_data_distributed.py).

Usage: python data_worker.py PROCESS_ID NUM_PROCESSES PORT CORPUS_DIR OUT_JSON [PREPARED_DIR]

Builds the data for a small mixed corpus through ``loader.build`` with this process's index,
assembles each global batch with ``jax.make_array_from_process_local_data`` and writes the
SHA-256 of every fully gathered global batch. With PREPARED_DIR (``slimjax tokenize`` of the same
corpus and config), the data comes from that directory's ArrayRecord shards instead.
"""

import hashlib
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))  # helpers.py, when started as a script

from helpers import join_cpu_run  # noqa: E402


def main(process_id: int, num_processes: int, port: int, corpus: str, out: str, prepared: str = "") -> None:
    join_cpu_run(process_id, num_processes, port)
    import numpy as np
    from jax.experimental import multihost_utils

    from slimjax import config as C
    from slimjax.configs import base
    from slimjax.data import loader, pipeline
    from slimjax.sharding import Rules, make_mesh

    c = base.get_config()
    c.data.sources = ({"kind": "text", "path": f"{corpus}/text/*.txt", "weight": 1.0},
                      {"kind": "jsonl", "path": f"{corpus}/jsonl/*.jsonl.zst", "weight": 3.0})
    if prepared:
        c.data.sources = ({"kind": "prepared", "path": prepared},)
    c.data.tokenizer_kind, c.data.packing, c.data.seq_len, c.data.shards = "byte", "first_fit", 32, 4
    c.train.global_batch_size = 8
    cfg = C.validate(c)
    data = loader.build(cfg.data, 8, seed=5, max_eval_batches=2, vocab_size=cfg.model.vocab_size,
                        workdir=os.path.dirname(out), process_index=jax.process_index(),
                        process_count=jax.process_count())
    mesh = make_mesh(cfg.mesh)
    sharding = pipeline.batch_sharding(mesh, Rules.from_config(cfg.mesh))
    hashes = []
    for step in range(6):
        batch = pipeline.to_global(data.train[step], sharding)
        full = multihost_utils.process_allgather(batch, tiled=True)
        digest = hashlib.sha256()
        for key in pipeline.BATCH_KEYS:
            digest.update(np.ascontiguousarray(full[key]).tobytes())
        hashes.append(digest.hexdigest())
    local_rows = int(data.train[0]["inputs"].shape[0])
    with open(out, "w") as f:
        json.dump({"hashes": hashes, "local_rows": local_rows, "devices": jax.device_count(),
                   "processes": jax.process_count(), "stats": data.stats}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
