"""Evaluation: perplexity and bits per byte against NumPy on the model's logits, task metrics
against hand computations and the libraries themselves, and the `slimjax eval` command."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import save, sentences

from slimjax.cli import main
from slimjax.cli.rundir import open_run
from slimjax.data.hf_tokenizer import HFTokenizer
from slimjax.infer import evaluate
from slimjax.models import abstract_params


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(run dir of an imported random Llama with a tokenizer, glob of a small text corpus)."""
    root = tmp_path_factory.mktemp("eval")
    hf_dir = save("llama_gqa", str(root / "hf"))
    run = str(root / "run")
    assert main(["import", f"--hf_dir={hf_dir}", f"--workdir={run}"]) == 0
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(sentences(30, seed=1)):
        (corpus / f"doc{i:02d}.txt").write_text(text + " ünïcödé" * (i % 3))  # multi-byte characters count as bytes
    return run, str(corpus / "*.txt")


def numpy_score(run, source, split, rows, tok=None):
    """Summed NLL from the unsharded model's logits with a float64 NumPy log-softmax, tokens, bytes."""
    rd = open_run(run)
    data = rd.cfg.data.__class__(**{**rd.cfg.data.__dict__, "sources": (source,)})
    docs = evaluate.split_documents(data, split)
    tok = tok or HFTokenizer(data.tokenizer)
    graphdef, _, _ = abstract_params(rd.cfg.model)
    params = jax.device_get(rd.restore_params())
    model = nnx.merge(graphdef, params)
    nll = tokens = 0.0
    for b in evaluate.document_batches(data, tok, docs, rows):
        logits = np.asarray(model(b["inputs"], b["positions"], b["segment_ids"]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        nll -= float((picked * b["loss_mask"]).sum())
        tokens += float(b["loss_mask"].sum())
    return nll, tokens, sum(len(d.encode("utf-8")) for d in docs), len(docs)


def test_eval_command_matches_numpy_on_the_logits(imported, capsys):
    from slimjax.config import parse_source

    run, pattern = imported
    out = os.path.join(run, "scores.json")
    assert main(["eval", f"--workdir={run}", f"--source=text:{pattern}", "--split=train", "--batch_size=8",
                 f"--out={out}"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    got = json.load(open(out))
    nll, tokens, n_bytes, n_docs = numpy_score(run, parse_source("s", f"text:{pattern}"), "train", 8)
    assert n_docs >= 25 and got["documents"] == n_docs
    assert got["tokens"] == tokens and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    # Deterministic: a second run (other batch size, so other batch boundaries) gives the same sums.
    again = os.path.join(run, "again.json")
    assert main(["eval", f"--workdir={run}", f"--source=text:{pattern}", "--split=train", "--batch_size=16",
                 f"--out={again}"]) == 0
    assert json.load(open(again))["bits_per_byte"] == pytest.approx(got["bits_per_byte"], rel=1e-6)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records if "evaluate/bits_per_byte" in r] == [0, 0]
    assert os.listdir(os.path.join(run, "tensorboard"))


def test_eval_reads_a_training_checkpoint(imported, tmp_path, capsys):
    """A `slimjax train` layout (full train state) is scored from its params alone."""
    import dataclasses

    from helpers import build_state, small_config

    from slimjax.checkpoint import Checkpointer
    from slimjax.config import parse_source
    from slimjax.data.tokenizer import ByteTokenizer

    _, pattern = imported
    cfg = small_config(vocab_size=264)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_kind="byte"))
    _, _, _, state = build_state(cfg)
    run = str(tmp_path / "trained")
    ck = Checkpointer(os.path.join(run, "checkpoints"), cfg.checkpoint)
    ck.save(5, state.as_dict(), {}, {"config": cfg.to_dict(), "step": 5})
    ck.wait()
    ck.close()
    out = str(tmp_path / "scores.json")
    assert main(["eval", f"--workdir={run}", f"--source=text:{pattern}", "--split=train", f"--out={out}"]) == 0
    got = json.load(open(out))
    nll, tokens, n_bytes, _ = numpy_score(run, parse_source("s", f"text:{pattern}"), "train", 16, ByteTokenizer())
    assert got["step"] == 5 and got["tokens"] == tokens and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def test_eval_command_errors(imported, tmp_path, capsys):
    run, pattern = imported
    cases = [
        (["eval", f"--workdir={tmp_path}"], "has no checkpoints/ directory"),
        (["eval", f"--workdir={run}", "--batch_size=12"], "batch_size=12 must be a multiple of the 8"),
        (["eval", f"--workdir={run}", "--split=test"], "--split='test'"),
        (["eval", f"--workdir={run}", "--step=5"], "--step 5 is not a checkpoint"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_classification_metrics_by_hand():
    pred = [0, 1, 1, 2, 2, 2, 3]
    true = [0, 1, 2, 2, 2, 1, 0]
    # accuracy 4/7; F1 per class: 0: tp1 fp0 fn1 -> 2/3; 1: tp1 fp1 fn1 -> 1/2; 2: tp2 fp1 fn1 -> 2/3; 3: tp0 fp1 -> 0
    got = evaluate.classification_metrics(pred, true)
    assert got["accuracy"] == pytest.approx(4 / 7)
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3 + 0) / 4)
    labels = evaluate.classification_metrics(["pos", "neg", "pos"], ["pos", "pos", "pos"])
    assert labels == pytest.approx({"accuracy": 2 / 3, "macro_f1": (0.8 + 0.0) / 2})
    assert evaluate.classification_metrics(true, true) == {"accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError):
        evaluate.classification_metrics([1, 2], [1])


def test_generation_scores_equal_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "it was raining all day"]
    preds = ["the cat sat on a mat", "the quick brown fox jumped over a lazy dog", "it rained all day long"]
    got = evaluate.score_generations(preds, refs)
    assert got["bleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert got[kind] == pytest.approx(np.mean([scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs)]))
    assert 0 < got["bleu"] < 100 and 0 < got["rouge2"] < got["rouge1"] < 1
    perfect = evaluate.score_generations(refs, refs)
    assert perfect == pytest.approx({"bleu": 100.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
