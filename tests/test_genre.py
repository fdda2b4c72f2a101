"""The bundled genre task end to end: tiny decoder and encoder classifiers beat the majority-class
baseline on plays they never saw."""

import pytest

import slimjax
from slimjax.configs import base
from slimjax.data import records

pytestmark = pytest.mark.filterwarnings("ignore")


def genre_config(spm_path: str, steps: int, lr: float, recipe=("classify",)):
    c = base.get_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 1024, 64, 2, 8, 4
    m.head_dim, m.d_ff, m.max_seq_len, m.dtype, m.tie_embeddings = 8, 128, 128, "float32", False
    c.data.seq_len, c.data.tokenizer = 128, spm_path
    c.data.eval_plays = tuple(records.genre_plays("eval"))  # pre-training never reads a held-out play
    c.train.global_batch_size, c.train.steps, c.train.eval_every, c.train.eval_batches = 16, steps, steps, 32
    c.train.progress, c.train.sample_tokens = False, 0
    c.optimizer.learning_rate, c.optimizer.warmup_steps = lr, 10
    c.checkpoint.every_steps = steps
    c.slim.recipe = recipe
    if "classify" in recipe:
        c.data.sources = ({"kind": "genre"},)
        c.slim.classify.classes = records.genre_classes()
    return c


def assert_beats_majority(summary, accuracy_margin, f1_margin, examples=512):
    e = summary["final_eval"]
    assert e["examples"] == examples and e["majority_class"] == "histories"
    assert e["accuracy"] > e["majority_accuracy"] + accuracy_margin, e
    assert e["macro_f1"] > e["majority_macro_f1"] + f1_margin, e


def test_decoder_classifier_beats_the_majority_baseline(spm_path, tmp_path):
    # Points of accuracy / macro-F1 over the majority at train.seed 0, 1, 2: 300 steps at 3e-3 (this
    # test) +8.2/+18.1, +10.2/+19.8, +3.3/+7.7; 150 at 5e-3 measured +4.3/+14.4 once and +2.7 on
    # another machine state, too close to the margin, so the test keeps 300. One step: accuracy 0.18.
    summary = slimjax.train(genre_config(spm_path, 300, 3e-3), str(tmp_path / "full"))
    assert_beats_majority(summary, 0.03, 0.08)


def test_encoder_classifier_beats_the_majority_baseline(spm_path, tmp_path):
    """The same model as a BERT-style encoder (post-LN, learned positions, pooled [CLS]), on rows of 64
    tokens from scratch: measured accuracy 0.320 vs 0.281, macro-F1 0.224 vs 0.073 on 256 examples."""
    c = genre_config(spm_path, 200, 3e-3)
    m = c.model
    m.family, m.norm_position, m.mlp, m.n_kv_heads = "encoder", "post", "gelu_exact", m.n_heads
    m.positions, m.norm, m.use_bias, m.tie_embeddings = "learned", "layernorm", True, True
    c.objective.next_token, c.objective.mlm, c.objective.nsp = 0.0, 1.0, 1.0  # the family's terms (weighted 0 here)
    c.data.seq_len, c.train.eval_batches = 64, 16
    summary = slimjax.train(c, str(tmp_path / "encoder"))
    assert_beats_majority(summary, 0.02, 0.1, examples=256)
