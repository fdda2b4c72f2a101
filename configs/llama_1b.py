"""A Llama-3.2-1B-shaped model: RoPE, RMSNorm, SwiGLU, GQA (32 query / 8 key-value heads)."""

import ml_collections

from slimjax.configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    m = c.model
    m.vocab_size = 32768  # SentencePiece vocabulary (Llama 3 uses 128256 with its own tokenizer)
    m.d_model = 2048  # residual width
    m.n_layers = 16  # blocks
    m.n_heads = 32  # query heads
    m.n_kv_heads = 8  # grouped-query attention
    m.head_dim = 64  # per-head width
    m.d_ff = 8192  # SwiGLU hidden width
    m.max_seq_len = 4096  # longest sequence
    m.rope_theta = 500000.0  # Llama 3 RoPE base
    m.tie_embeddings = True  # Llama 3.2 1B ties embeddings
    m.remat = "dots"  # save matmul outputs, recompute the rest
    c.data.seq_len = 2048  # training context
    c.optimizer.learning_rate = 3e-4  # peak rate
    c.optimizer.warmup_steps = 2000  # warm-up
    c.train.steps = 100000  # long run
    c.train.global_batch_size = 256  # 0.5M tokens per step at 2048
    c.train.eval_every = 1000  # evaluation cadence
    c.checkpoint.every_steps = 1000  # checkpoint cadence
    c.mesh.data = 1  # FSDP by default
    c.mesh.fsdp = -1  # fill with FSDP
    return c
