"""`slimjax train --config=configs/bert_tiny.py` end to end, `slimjax eval` on the encoder run
(MLM accuracy on held-out plays above the unigram baseline), and bad pre-training input.

The suite trains a shrunk bert_tiny on bytes; the full bert_tiny's numbers are in the README."""

import json
import os

import pytest

from slimjax.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "bert_tiny.py")
# Small and short enough for the suite: bytes (no tokenizer to train) and 30% of them masked (twice
# BERT's signal per row), so 250 steps get well past the unigram plateau (about 50 s on 2 cores).
FAST = ["--config.model.d_model=64", "--config.model.head_dim=32", "--config.model.d_ff=256",
        "--config.data.seq_len=64", "--config.model.max_seq_len=64", "--config.train.global_batch_size=16",
        "--config.train.steps=250", "--config.train.eval_every=250", "--config.train.log_every=25",
        "--config.train.eval_batches=4", "--config.data.tokenizer_kind=byte", "--config.model.vocab_size=260",
        "--config.pretrain.mask_rate=0.3", "--config.optimizer.learning_rate=3e-3",
        "--config.optimizer.warmup_steps=20", "--config.train.progress=False", "--config.checkpoint.async_save=False"]


def test_bert_tiny_trains_through_the_cli_and_beats_the_unigram_baseline_on_held_out_plays(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", f"--config={CONFIG}", f"--workdir={run}", *FAST]) == 0
    logged = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [m for m in logged if "train/terms/mlm" in m]
    assert {"train/terms/nsp", "train/mlm_accuracy", "train/nsp_accuracy", "train/objective"} <= set(train[-1])
    assert train[-1]["train/terms/mlm"] < train[0]["train/terms/mlm"]
    evals = [m for m in logged if "eval/mlm_accuracy" in m]
    assert evals and {"eval/nsp", "eval/nsp_accuracy"} <= set(evals[-1])
    capsys.readouterr()
    assert main(["eval", f"--workdir={run}", "--max_docs=4"]) == 0
    out = capsys.readouterr().out
    result = json.load(open(os.path.join(run, "eval.json")))
    assert f"unigram baseline {result['unigram_accuracy']:.4f}" in out
    assert result["masked_tokens"] > 1000 and 0.05 < result["unigram_accuracy"] < 0.5
    assert result["mlm_accuracy"] > result["unigram_accuracy"] + 0.03, result  # measured 0.222 vs 0.156
    assert 0 <= result["nsp_accuracy"] <= 1
    assert main(["generate", f"--workdir={run}", "--prompt=ROMEO:"]) == 2  # an encoder does not generate
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "family 'encoder'" in err


@pytest.mark.parametrize("rate", ["0.0", "1.0", "1.5"])
def test_a_mask_rate_outside_0_1_is_one_line_and_exit_2(tmp_path, capsys, rate):
    run = tmp_path / "run"
    assert main(["train", f"--config={CONFIG}", f"--workdir={run}", f"--config.pretrain.mask_rate={rate}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pretrain.mask_rate" in err and "(0, 1)" in err
    assert not run.exists()
