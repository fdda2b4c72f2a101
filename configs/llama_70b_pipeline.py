"""Llama-2-70B laid out for a TPU v5p-512 slice (256 chips): 4 pipeline stages x FSDP over 8 x
tensor parallelism over 8, with the circular schedule (each stage holds 4 groups of 5 layers).

Check it before renting the slice: ``slimjax explain --config=llama_70b_pipeline --target=v5p-512``.
Pipeline stages split the 80 layers so FSDP and tensor parallelism stay inside a 64-chip group;
16 microbatches with 4 repeats bring the pipeline bubble to 3/(16*4+3), under 5%; repeats are a
multiple of the stages so the circular regrouping is one all-to-all over `stage`.
"""

import ml_collections

from slimjax.configs import llama_7b


def get_config() -> ml_collections.ConfigDict:
    c = llama_7b.get_config()  # Llama 2 tokenizer, norms, untied head and training schedule
    m = c.model
    m.d_model = 8192  # residual width
    m.n_layers = 80  # blocks
    m.n_heads = 64  # query heads
    m.n_kv_heads = 8  # grouped-query attention
    m.head_dim = 128  # per-head width
    m.d_ff = 28672  # SwiGLU hidden width
    c.mesh.data = 1  # no pure data parallelism
    c.mesh.stage = 4  # pipeline stages: 20 layers each
    c.mesh.fsdp = 8  # parameters and optimizer state split 8 ways within a stage
    c.mesh.tensor = 8  # heads, MLP and vocabulary split 8 ways inside each layer
    c.mesh.pipeline_schedule = "circular"  # interleaved stages: a smaller bubble than GPipe
    c.mesh.pipeline_microbatches = 16  # microbatches in flight through the stages
    c.mesh.pipeline_repeats = 4  # layer groups per stage (80 = 4 stages x 4 repeats x 5 layers)
    c.train.global_batch_size = 1024  # 4M tokens per step at 4096 (Llama 2)
    c.train.microbatches = 4  # gradient accumulation around the pipeline
    return c
