"""Fine-tuning through the CLI: a classifier's keep-best checkpoint, eval, early stopping and resume,
supervised fine-tuning on prompt/response pairs, and bad input as one line with exit 2.

Commands run in this process (``slimjax.cli.main``): no crash is simulated here, so the process
boundary adds nothing but interpreter start-up and recompiling what the earlier runs compiled."""

import json
import os
import random

import pytest

from test_fault import one_line_error
from test_prune_cli import cli_here

from slimjax.train.metrics import read_metrics

WORDS = {"fruit": "apple pear plum fig grape melon".split(), "metal": "iron gold zinc lead tin copper".split()}
# The encoder: configs/bert_tiny.py narrowed to the same size (MODEL's flags follow and apply on top).
ENCODER = [f"--config={os.path.join(os.path.dirname(__file__), '..', 'configs', 'bert_tiny.py')}",
           "--config.model.d_model=64", "--config.model.head_dim=32", "--config.model.d_ff=128"]
MODEL = ["--config.model.vocab_size=264", "--config.data.tokenizer_kind=byte", "--config.data.seq_len=32",
         "--config.model.max_seq_len=64", "--config.model.n_layers=1", "--config.train.global_batch_size=8",
         "--config.train.progress=False", "--config.train.sample_tokens=0", "--config.optimizer.warmup_steps=2"]


def write_jsonl(path, objects) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(o) + "\n" for o in objects)
    return str(path)


def labelled_flags(root, flip_eval=False):
    """Classification flags over two small JSON Lines files: word lists of two classes (with
    ``flip_eval`` the held-out labels are swapped, so the more the model learns, the worse it scores)."""
    rng = random.Random(0)
    files = {}
    for name, n in (("train", 64), ("eval", 16)):
        flip = {"fruit": "metal", "metal": "fruit"} if name == "eval" and flip_eval else {}
        rows = [{"text": " ".join(rng.choice(WORDS[label]) for _ in range(8)), "label": flip.get(label, label)}
                for label in ("fruit", "metal") * (n // 2)]
        files[name] = write_jsonl(root / f"{name}.jsonl", rows)
    source = {"kind": "labels", "path": files["train"], "eval_path": files["eval"]}
    return [*MODEL, f"--config.data.sources=({source!r},)", "--config.slim.recipe=('classify',)",
            "--config.slim.classify.classes=('fruit','metal')"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return labelled_flags(tmp_path_factory.mktemp("labels"))


def evals(workdir):
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "eval/accuracy" in r}


def test_classifier_keeps_its_best_checkpoint_and_evaluates(capsys, tmp_path):
    workdir = str(tmp_path / "run")
    flags = labelled_flags(tmp_path, flip_eval=True)
    result = cli_here(capsys, "train", *flags, "--config.train.steps=30", "--config.train.eval_every=10",
                      "--config.checkpoint.every_steps=10", "--config.checkpoint.keep=1",
                      "--config.checkpoint.keep_best=1", "--config.checkpoint.best_metric=loss", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = evals(workdir)
    assert sorted(scores) == [10, 20, 30]
    assert scores[10]["eval/loss"] < scores[20]["eval/loss"] < scores[30]["eval/loss"]  # swapped held-out labels
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [10, 30]  # best + latest
    result = cli_here(capsys, "eval", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    final = scores[30]
    assert report["examples"] == 16 and report["majority_accuracy"] == 0.5 and report["step"] == 30
    assert report["accuracy"] == pytest.approx(final["eval/accuracy"])
    assert report["macro_f1"] == pytest.approx(final["eval/macro_f1"])
    assert f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} (majority class 'fruit': " \
           "accuracy 0.5000, macro-F1 0.3333)" in result.stdout


def test_early_stopping_stops_and_survives_a_resume(capsys, labelled, tmp_path):
    workdir = str(tmp_path / "run")
    # A learning rate too small to change a prediction: accuracy never improves after the first evaluation.
    flags = [*labelled, "--config.optimizer.learning_rate=1e-9", "--config.train.eval_every=5",
             "--config.checkpoint.every_steps=5", "--config.checkpoint.best_metric=accuracy",
             "--config.train.early_stop_patience=2", f"--workdir={workdir}"]
    first = cli_here(capsys, "train", *flags, "--config.train.steps=10")
    assert first.returncode == 0, first.stderr[-3000:]  # evaluations at 5 (best) and 10 (1 without gain)
    second = cli_here(capsys, "train", *flags, "--config.train.steps=40")
    assert second.returncode == 0, second.stderr[-3000:]
    # Resumed at 10 with the count carried over: the second evaluation without gain (15) stops the run.
    assert sorted(evals(workdir)) == [5, 10, 15]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped_early"] and summary["final_step"] == 15
    assert "stopping early" in second.stderr + second.stdout
    third = cli_here(capsys, "train", *flags, "--config.train.steps=40")  # a stopped run is complete
    assert third.returncode == 0 and "already complete at step 15" in third.stderr


def test_sft_trains_on_prompt_response_pairs(capsys, tmp_path):
    pairs = [{"prompt": f"Q: {w}?\nA:", "response": f" {w[::-1]}"} for w in WORDS["fruit"] + WORDS["metal"]] * 4
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    workdir = str(tmp_path / "run")
    result = cli_here(capsys, "train", *MODEL, f"--config.data.sources=('pairs:{path}',)",
                      "--config.data.eval_fraction=0.2", "--config.data.packing=first_fit", "--config.train.steps=30",
                      "--config.train.eval_every=15", "--config.optimizer.learning_rate=1e-2", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["eval/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "eval/loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0] < 6.0
    train_tokens = [r["train/tokens"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
                    if "train/tokens" in r]
    assert max(train_tokens) < 8 * 32 / 2  # only response tokens are targets: far fewer than the row positions


def one_record(kind, path, record) -> str:
    """The data.sources flag of a ``kind`` source holding one record."""
    return f"--config.data.sources=('{kind}:{write_jsonl(path, [record])}',)"


BAD = {
    "label outside the classes": (
        lambda d: [*MODEL, one_record("labels", d / "l.jsonl", {"text": "a", "label": "x"}),
                   "--config.slim.recipe=('classify',)", "--config.slim.classify.classes=('fruit','metal')"],
        "l.jsonl:1: label 'x' is not one of slim.classify.classes (fruit, metal)"),
    "pair file without prompt/response": (
        lambda d: [*MODEL, one_record("pairs", d / "p.jsonl", {"q": "a", "a": "b"})],
        "p.jsonl:1: a 'pairs' record needs string fields 'prompt' and 'response'"),
    "classification config on a run without labels": (
        lambda d: [*MODEL, "--config.slim.recipe=('classify',)", "--config.slim.classify.classes=('a','b')"],
        "slim.recipe names 'classify' but data.sources (shakespeare) carry no labels"),
    "classification config on an encoder run without labels": (
        lambda d: [*ENCODER, *MODEL, "--config.slim.recipe=('classify',)", "--config.slim.classify.classes=('a','b')"],
        "slim.recipe names 'classify' but data.sources (shakespeare) carry no labels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fine_tuning_input_is_one_line_exit_2(capsys, case, tmp_path):
    flags, expected = BAD[case]
    workdir = tmp_path / "run"
    line = one_line_error(cli_here(capsys, "train", *flags(tmp_path), f"--workdir={workdir}"))
    assert expected in line
    assert not workdir.exists()  # nothing half-written


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_lora_fine_tunes_a_classifier_from_a_slimjax_run(capsys, labelled, tmp_path, family):
    import jax
    import numpy as np

    from slimjax import load_run
    from slimjax.sharding import tree_paths

    model = ENCODER if family == "encoder" else []  # the encoder pre-trains on MLM + NSP
    base_dir, workdir = str(tmp_path / "base"), str(tmp_path / "lora")
    result = cli_here(capsys, "train", *model, *MODEL, "--config.train.steps=2", f"--workdir={base_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli_here(capsys, "train", *model, *labelled, "--config.slim.recipe=('lora','classify')",
                      f"--config.checkpoint.init_from={base_dir}", "--config.optimizer.learning_rate=1e-2",
                      "--config.train.steps=30", "--config.train.eval_every=30", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = evals(workdir)[30]
    assert final["eval/accuracy"] > final["eval/majority_accuracy"] + 0.3
    flat = lambda run: dict(zip(tree_paths(run.params), map(np.asarray, jax.tree.leaves(run.params))))  # noqa: E731
    base, tuned = flat(load_run(base_dir)), flat(load_run(workdir))
    for path, value in base.items():  # the base stays exactly as pre-trained
        np.testing.assert_array_equal(tuned[path], value, err_msg=path)
    added = set(tuned) - set(base)
    assert {"classifier/kernel", "classifier/bias"} <= added
    assert all(p.startswith("classifier/") or "/tap/" in p for p in added)
    assert all(np.abs(tuned[p]).max() > 0 for p in added if p.endswith("/tap/b"))  # adapters trained (B starts at 0)

