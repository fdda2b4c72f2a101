"""GPT-2 small (124M): learned positions, LayerNorm, GELU, biases, tied embeddings."""

import ml_collections

from slimjax.configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    m = c.model
    m.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 128 for sharding and speed
    m.d_model = 768  # residual width
    m.n_layers = 12  # blocks
    m.n_heads = 12  # query heads
    m.n_kv_heads = 12  # multi-head attention
    m.head_dim = 64  # per-head width
    m.d_ff = 3072  # 4 * d_model
    m.max_seq_len = 1024  # learned position table size
    m.positions = "learned"  # GPT-2 positions
    m.norm = "layernorm"  # GPT-2 normalisation
    m.mlp = "gelu"  # GPT-2 MLP
    m.use_bias = True  # GPT-2 has biases everywhere
    m.tie_embeddings = True  # GPT-2 ties input and output embeddings
    c.data.seq_len = 1024  # full context
    c.optimizer.learning_rate = 6e-4  # GPT-2 small / nanoGPT peak rate
    c.optimizer.warmup_steps = 2000  # warm-up as in nanoGPT
    c.optimizer.b2 = 0.95  # as nanoGPT
    c.train.steps = 100000  # long pre-training run
    c.train.global_batch_size = 512  # 0.5M tokens per step at 1024
    c.train.microbatches = 1  # raise to fit smaller devices
    c.train.eval_every = 1000  # evaluation cadence
    c.checkpoint.every_steps = 2000  # checkpoint cadence
    c.mesh.data = 1  # FSDP across all devices by default
    c.mesh.fsdp = -1  # fill with FSDP
    return c
