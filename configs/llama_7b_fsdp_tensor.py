"""Llama-2-7B laid out for a TPU v5p-64 slice (32 chips): FSDP over 8 chips x tensor parallelism
over 4, the layout MaxText and t5x use for 7B models at this size.

Check it before renting the slice: ``slimjax explain --config=llama_7b_fsdp_tensor --target=v5p-64``
(shapes only, no devices needed). The tensor axis sits on the innermost (fastest) links; FSDP
shards every weight's model dimension and the optimizer state 8 ways.
"""

import ml_collections

from slimjax.configs import llama_7b


def get_config() -> ml_collections.ConfigDict:
    c = llama_7b.get_config()
    c.mesh.data = 1  # no pure data parallelism: FSDP already splits the batch
    c.mesh.fsdp = 8  # parameters, gradients and optimizer state split 8 ways; batch rows too
    c.mesh.tensor = 4  # heads, MLP and vocabulary split 4 ways inside each layer
    c.train.global_batch_size = 256  # 1M tokens per step at 4096
    c.train.microbatches = 4  # gradient accumulation: 8 rows per chip per microbatch
    return c
