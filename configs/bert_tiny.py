"""A tiny BERT (post-LN encoder, MLM + NSP) that pre-trains on the bundled plays on a 2-core CPU
in minutes: `slimjax train --config=configs/bert_tiny.py --workdir=runs/bert_tiny`."""

from slimjax.configs import base


def get_config():
    c = base.get_config()
    m = c.model
    m.family = "encoder"
    m.vocab_size = 1024
    m.d_model = 128
    m.n_layers = 2
    m.n_heads = 2
    m.n_kv_heads = 2
    m.head_dim = 64
    m.d_ff = 512
    m.max_seq_len = 128
    m.positions = "learned"
    m.norm = "layernorm"
    m.norm_position = "post"
    m.norm_eps = 1e-12
    m.mlp = "gelu_exact"
    m.use_bias = True
    m.tie_embeddings = True
    m.type_vocab_size = 2
    c.data.seq_len = 128
    c.objective.next_token = 0.0
    c.objective.mlm = 1.0
    c.objective.nsp = 1.0
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.train.steps = 600
    c.train.global_batch_size = 32
    c.train.eval_every = 200
    c.train.sample_tokens = 0
    return c
