"""One process of a real multi-process training run (started by tests/test_multihost.py).

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR [tokenizer]

Calls ``slimjax.train`` on :func:`multihost_config` with 8 CPU devices in total, split evenly
over the processes; ``slimjax.train`` itself joins the run (``distributed.`` config keys). Writes
WORKDIR.processN.json: what process N saw when ``slimjax.train`` returned.

With ``tokenizer``, each process only joins the run (twice: the second call must be a no-op) and
gets the run's SentencePiece model into its own workdir WORKDIR/pN, as hosts without a shared
filesystem would.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # helpers.py, when started as a script

from helpers import small_config, with_train  # noqa: E402

DEVICES = 8


def multihost_config(process_id: int = 0, num_processes: int = 1, port: int = 0):
    """A small Llama on Shakespeare with a SentencePiece model trained by the run, 4 steps, every
    step logged, checkpoints at steps 2 and 4; distributed over ``num_processes`` on 127.0.0.1:port."""
    cfg = small_config("llama", vocab_size=512)
    cfg = with_train(cfg, steps=4, log_every=1, eval_every=100, eval_batches=1, progress=False)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=2))
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=2, fsdp=2, tensor=2))
    dist = dataclasses.replace(cfg.distributed, cpu_devices=DEVICES // num_processes, timeout_s=120)
    if num_processes > 1:
        dist = dataclasses.replace(dist, coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id)
    return dataclasses.replace(cfg, distributed=dist)


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    import slimjax

    summary = slimjax.train(multihost_config(process_id, num_processes, port), workdir)
    # What this process saw when train() returned (written next to the workdir, not into it).
    with open(f"{workdir}.process{process_id}.json", "w") as f:
        json.dump({"final_step": summary["final_step"], "processes": summary["processes"],
                   "summary_written": os.path.exists(os.path.join(workdir, "summary.json"))}, f)


def share_tokenizer(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    import jax

    from slimjax.train import distributed
    from slimjax.train.run import share_tokenizer

    cfg = multihost_config(process_id, num_processes, port)
    plan = distributed.initialize(cfg.distributed)
    assert plan is not None and plan.source == "config"
    assert distributed.initialize(cfg.distributed) is None  # already joined: nothing happens
    assert (jax.process_count(), jax.process_index(), jax.local_device_count()) == (num_processes, process_id, 4)
    share_tokenizer(cfg, os.path.join(workdir, f"p{process_id}"))


if __name__ == "__main__":
    fn = share_tokenizer if sys.argv[5:] == ["tokenizer"] else main
    fn(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
