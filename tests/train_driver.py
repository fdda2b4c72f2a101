"""Test-only driver: ``python tests/train_driver.py train ...`` runs the slimjax CLI, optionally with a
checkpoint write slowed down so a test can kill the process in the middle of it.

``SLIMJAX_TEST_SLOW_SAVE_STEP=N`` makes the write of step N's metadata item (one of the last items
Orbax finalises) announce itself in the file ``SLIMJAX_TEST_MARKER`` and then stall; the arrays
are already in the temporary directory, which Orbax has not yet renamed into place.
"""

import os
import sys
import time

slow_step = os.environ.get("SLIMJAX_TEST_SLOW_SAVE_STEP")
if slow_step:
    import orbax.checkpoint as ocp

    original = ocp.JsonCheckpointHandler._save_fn

    async def slow_save(self, item, directory):
        if isinstance(item, dict) and item.get("step") == int(slow_step) and "config" in item:
            with open(os.environ["SLIMJAX_TEST_MARKER"], "w") as f:
                f.write(str(directory))
            time.sleep(600)  # a background writer thread; the test kills the process meanwhile
        await original(self, item, directory)

    ocp.JsonCheckpointHandler._save_fn = slow_save

from slimjax.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
