"""A Llama-3.2-1B-shaped model trained on 64K-token sequences, laid out for a TPU v5p-64 slice
(32 chips): sequence (context) parallelism over 8 chips x FSDP over 4, with ring attention.

Check it before renting the slice: ``slimjax explain --config=llama_1b_long_context --target=v5p-64``.
Each chip holds 8K positions of every sequence; ring attention passes key/value blocks around the
sequence axis, so no chip ever holds a 64K x 64K score matrix or the full keys and values.
"""

import ml_collections

from slimjax.configs import llama_1b


def get_config() -> ml_collections.ConfigDict:
    c = llama_1b.get_config()
    c.model.max_seq_len = 65536  # longest sequence
    c.model.rope_theta = 8000000.0  # a larger RoPE base for the longer context
    c.model.remat = "full"  # keep only each block's input; long sequences make activations dominate
    c.data.seq_len = 65536  # training context
    c.mesh.data = 1  # no pure data parallelism
    c.mesh.fsdp = 4  # parameters and optimizer state split 4 ways; batch rows too
    c.mesh.sequence = 8  # 8K positions of each sequence per chip
    c.mesh.sequence_attention = "ring"  # key/value blocks around the ring: memory ~ 1/sequence
    c.mesh.sequence_balance = True  # equal causal work per chip
    c.train.global_batch_size = 32  # 2M tokens per step
    c.train.microbatches = 4  # gradient accumulation: 2 rows per chip per microbatch
    return c
