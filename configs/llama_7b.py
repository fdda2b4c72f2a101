"""Llama-2-7B shapes (for TPU/GPU; CI only evaluates its shapes with jax.eval_shape)."""

import ml_collections

from slimjax.configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    m = c.model
    m.vocab_size = 32000  # Llama 2 SentencePiece vocabulary
    m.d_model = 4096  # residual width
    m.n_layers = 32  # blocks
    m.n_heads = 32  # query heads
    m.n_kv_heads = 32  # Llama 2 7B uses full multi-head attention
    m.head_dim = 128  # per-head width
    m.d_ff = 11008  # SwiGLU hidden width
    m.max_seq_len = 4096  # longest sequence
    m.norm_eps = 1e-5  # RMSNorm epsilon
    m.tie_embeddings = False  # separate output projection
    m.remat = "full"  # recompute every block in the backward pass
    c.data.seq_len = 4096  # training context
    c.optimizer.learning_rate = 3e-4  # Llama 2 peak rate
    c.optimizer.warmup_steps = 2000  # Llama 2 warm-up
    c.optimizer.min_lr_ratio = 0.1  # Llama 2 decays to 10%
    c.train.steps = 500000  # long run
    c.train.global_batch_size = 1024  # 4M tokens per step at 4096
    c.train.eval_every = 1000  # evaluation cadence
    c.checkpoint.every_steps = 1000  # checkpoint cadence
    c.mesh.data = 1  # FSDP by default
    c.mesh.fsdp = -1  # fill with FSDP
    c.mesh.tensor = 1  # raise for tensor parallelism within a host
    return c
