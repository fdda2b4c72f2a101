"""One process of a two-process run in which only process 1 receives SIGTERM (tests/test_fault.py).

Usage: python preempt_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Writes WORKDIR.processN.json: the step at which ``slimjax.train`` raised ``Preempted`` (or null).
"""

import dataclasses
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))  # helpers.py, when started as a script

from helpers import with_train  # noqa: E402
from multihost_worker import multihost_config  # noqa: E402


def signal_once_training(workdir: str) -> None:
    """SIGTERM to this process once process 0 has logged a few steps (the run is in its loop)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    import slimjax
    from slimjax.errors import Preempted

    cfg = with_train(multihost_config(process_id, num_processes, port), steps=100000, log_every=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_kind="byte"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=100000))
    if process_id == 1:
        threading.Thread(target=signal_once_training, args=(workdir,), daemon=True).start()
    try:
        slimjax.train(cfg, workdir)
        step = None
    except Preempted as e:
        step = e.step
    with open(f"{workdir}.process{process_id}.json", "w") as f:
        json.dump({"preempted_at": step}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
