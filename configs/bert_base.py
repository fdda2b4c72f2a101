"""BERT-base (Devlin et al. 2019): 12 layers, width 768, 12 heads, 110M parameters with a
30522-token vocabulary; MLM + NSP pre-training for accelerators. CI only shape-evaluates it."""

from slimjax.configs import bert_tiny


def get_config():
    c = bert_tiny.get_config()
    m = c.model
    m.vocab_size = 30522
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.n_kv_heads = 12
    m.head_dim = 64
    m.d_ff = 3072
    m.max_seq_len = 512
    m.remat = "dots"
    c.data.seq_len = 512
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.train.steps = 1_000_000
    c.train.global_batch_size = 256
    c.train.eval_every = 10_000
    c.checkpoint.every_steps = 10_000
    return c
