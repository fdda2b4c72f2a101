"""Fine-tuning pieces: the genre split, classification rows and the cls term, macro-F1, SFT masking and packing."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slimjax.config as C
from helpers import assert_segments_isolated, small_config
from slimjax.data import finetune, records, tokenizer
from slimjax.errors import SlimjaxError
from slimjax.infer.evaluate import classification_metrics, majority_baseline
from slimjax.infer.scoring import token_sums
from slimjax.slim import classify
from slimjax.slim.spec import build, init_fn, spec_from_config
from slimjax.slim.transform import Outputs

CLASSES = ("fruit", "metal", "stone")


def classify_config(classes=CLASSES, family="llama") -> C.Config:
    cfg = small_config(family)
    slim = dataclasses.replace(cfg.slim, recipe=("classify",), classify=C.ClassifyConfig(tuple(classes)))
    return dataclasses.replace(cfg, slim=slim)


def test_genre_split_is_by_play_deterministic_and_covers_every_genre():
    train, held = records.genre_plays("train"), records.genre_plays("eval")
    assert not set(train) & set(held)  # no play on both sides
    assert len(train) + len(held) == 38
    assert records.genre_classes() == ("comedies", "histories", "problems", "roman", "romances", "tragedies")
    for genre in records.genre_classes():  # every genre is trained and tested, on different plays
        n_train = sum(g == genre for g, _ in train.values())
        n_held = sum(g == genre for g, _ in held.values())
        assert n_held == -(-(n_train + n_held) // records.GENRE_HELD_OUT) and n_train > 0
    for play, (genre, path) in {**train, **held}.items():  # labelled by the play's folder
        assert path.endswith(f"/{genre}/{play}.md")
    assert records.genre_plays("eval") == held


def reference_macro_f1(pred, true):
    """Plain-Python macro-F1: per-class precision and recall from counts, F1 = 2PR / (P + R)."""
    scores = []
    for c in sorted(set(true) | set(pred)):
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        predicted, actual = sum(p == c for p in pred), sum(t == c for t in true)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def test_accuracy_and_macro_f1_match_a_plain_python_reference():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 200).tolist()
    pred = [t if rng.random() < 0.6 else int(rng.integers(0, 6)) for t in true]  # class 5 is never true
    got = classification_metrics(pred, true)
    assert got["macro_f1"] == pytest.approx(reference_macro_f1(pred, true), abs=1e-12)
    assert got["accuracy"] == pytest.approx(sum(p == t for p, t in zip(pred, true)) / len(true), abs=1e-12)
    base = majority_baseline({"a": 3, "b": 9, "c": 9}, [0, 1, 2, 1], ("a", "b", "c"))  # ties: the first class
    assert base["class"] == "b" and base["accuracy"] == 0.5
    assert base["macro_f1"] == pytest.approx(reference_macro_f1([1, 1, 1, 1], [0, 1, 2, 1]))


def test_classification_rows_mark_each_examples_last_token():
    tok = tokenizer.ByteTokenizer()
    examples = [records.Labelled("abc", "metal", "x:1"), records.Labelled("a" * 50, "fruit", "x:2"),
                records.Labelled("0123456789" * 3, "stone", "play", passages=True)]
    rows = finetune.classification_examples(examples, CLASSES, tok, seq_len=8)
    # "abc": BOS + 3 bytes; the long text cut to 8 tokens; the passage text: 30 bytes in windows of 7 (4 whole ones).
    assert rows["labels"].tolist() == [1, 0, 2, 2, 2, 2]
    lengths = rows["segment_ids"].sum(axis=1)
    assert lengths.tolist() == [4, 8, 8, 8, 8, 8]
    np.testing.assert_array_equal(rows["loss_mask"].argmax(axis=1), lengths - 1)
    assert rows["loss_mask"].sum() == 6  # one target per example: the step's token count is the example count
    assert (rows["inputs"][:, 0] == tok.bos_id).all()
    assert tok.decode(rows["inputs"][3, 1:]) == "7890123"  # passages: consecutive, non-overlapping windows


def classifier_on_three_texts(cfg, seed, seq_len, sep=False):
    """(built, params with a nonzero head bias, head, rows, batch) for three labelled byte texts."""
    built = build(spec_from_config(cfg))
    params = jax.jit(init_fn(built))(jax.random.key(seed))
    params["classifier"]["bias"] = jnp.asarray([0.3, -0.2, 0.1])
    examples = [records.Labelled(t, label, "x") for t, label in (("iron gold", "metal"), ("fig", "fruit"),
                                                                 ("a much longer stone text", "stone"))]
    rows = finetune.classification_examples(examples, CLASSES, tokenizer.ByteTokenizer(), seq_len, sep)
    return built, params, classify.head_of(built), rows, {k: jnp.asarray(v) for k, v in rows.items()}


def test_cls_term_and_head_match_a_float64_reference():
    cfg = classify_config()
    built, params, head, rows, batch = classifier_on_three_texts(cfg, 1, cfg.data.seq_len)
    assert built.shapes["classifier"]["kernel"].shape == (cfg.model.d_model, 3)
    assert built.axes["classifier"] == {"kernel": ("embed", "classes"), "bias": ("classes",)}
    model = nnx.merge(built.graphdef, params)
    hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
    (term,) = head.loss_terms()
    got = float(term.fn(params, {}, batch, Outputs(None, hidden)))
    # Reference: the hidden state at each row's last real token, the head in float64, summed cross-entropy.
    h = np.asarray(hidden, np.float64)
    last = rows["segment_ids"].sum(axis=1) - 1
    pooled = h[np.arange(3), last]
    logits = pooled @ np.asarray(params["classifier"]["kernel"], np.float64) + np.asarray(params["classifier"]["bias"])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -log_p[np.arange(3), rows["labels"]].sum()
    assert got == pytest.approx(want, rel=1e-5)
    assert built.objective_weights({"next_token": 1.0, "z_loss": 1e-4}) == {"next_token": 0.0, "z_loss": 0.0}


def test_encoder_classifier_pools_cls_and_matches_a_float64_reference():
    built, params, head, rows, batch = classifier_on_three_texts(classify_config(family="bert"), 2, 16, sep=True)
    tok = tokenizer.ByteTokenizer()
    # The encoder's pre-training layout: [CLS] (= BOS, the token the pooler reads) text [SEP] (= EOS), type 0.
    assert (rows["inputs"][:, 0] == tok.bos_id).all() and not rows["token_types"].any()
    lengths = rows["segment_ids"].sum(axis=1)
    assert lengths.tolist() == [11, 5, 16]
    assert (rows["inputs"][np.arange(3), lengths - 1] == tok.eos_id).all()
    model = nnx.merge(built.graphdef, params)
    hidden = model.features(batch["inputs"], batch["token_types"], batch["positions"], batch["segment_ids"])
    (term,) = head.loss_terms()
    got = float(term.fn(params, {}, batch, Outputs(None, hidden)))
    # Reference: BERT's pooler tanh(h[:, 0] W_p + b_p), then the head, in float64; summed cross-entropy.
    h = np.asarray(hidden, np.float64)[:, 0]
    pooled = np.tanh(h @ np.asarray(params["pooler"]["kernel"], np.float64) + np.asarray(params["pooler"]["bias"]))
    logits = pooled @ np.asarray(params["classifier"]["kernel"], np.float64) + np.asarray(params["classifier"]["bias"])
    np.testing.assert_allclose(np.asarray(head.logits(params, batch, hidden)), logits, rtol=1e-5, atol=1e-6)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert got == pytest.approx(-log_p[np.arange(3), rows["labels"]].sum(), rel=1e-5)
    # The train step's task: cls alone (no MLM/NSP arrays in a labelled batch), over one mark per example.
    task = classify.task_of(built)
    assert task.terms == () and task.primary == classify.TERM
    assert float(task.counts(batch)["tokens"]) == 3
    # The eval step pools the same way.
    out = classify.make_eval_step(built.graphdef, head)(params, batch)
    assert out["predicted"].tolist() == np.argmax(logits, axis=1).tolist()
    assert float(out["nll_sum"]) == pytest.approx(-log_p[np.arange(3), rows["labels"]].sum(), rel=1e-5)


def test_head_stays_trainable_behind_lora():
    cfg = classify_config()
    slim = dataclasses.replace(cfg.slim, recipe=("lora", "classify"))
    built = build(spec_from_config(dataclasses.replace(cfg, slim=slim)))
    trainable, frozen = built.split(jax.tree.map(lambda s: 0, built.shapes))
    assert set(trainable["classifier"]) == {"kernel", "bias"}
    assert "classifier" not in frozen and "embed" in frozen and "embed" not in trainable
    assert any(k == "tap" for k in trainable["blocks"]["attn"]["wq"])


def sft_rows(seq_len=32, packing="first_fit"):
    tok = tokenizer.ByteTokenizer()
    pairs = [records.Pair("Q: 2+2?", " 4"), records.Pair("Q: sky?", " blue"), records.Pair("Hi", " there!")]
    return pairs, tok, finetune.sft_examples(pairs, tok, seq_len, packing)


@pytest.mark.parametrize("packing", ["first_fit", "concat_split"])
def test_sft_loss_is_on_response_tokens_only(packing):
    pairs, tok, rows = sft_rows(packing=packing)
    # Which targets carry loss: exactly the response tokens and each pair's EOS.
    want = sum(len(tok.encode(p.response)) + 1 for p in pairs)
    assert rows["loss_mask"].sum() == want
    weighted = rows["targets"][rows["loss_mask"] > 0]
    assert (weighted == tok.eos_id).sum() == len(pairs)
    assert tok.decode(weighted) == "".join(p.response for p in pairs)
    # The gradient of the loss w.r.t. the logits is zero at every position whose target is a prompt token.
    cfg = small_config()
    logits = jax.random.normal(jax.random.key(0), (*rows["inputs"].shape, cfg.model.vocab_size))
    grad = jax.grad(lambda z: token_sums(z, {k: jnp.asarray(v) for k, v in rows.items()})["next_token"])(logits)
    per_position = np.abs(np.asarray(grad)).sum(axis=-1)
    assert (per_position[rows["loss_mask"] == 0] == 0).all()
    assert (per_position[rows["loss_mask"] > 0] > 0).all()


def test_sft_packing_keeps_pairs_apart():
    _, _, rows = sft_rows(seq_len=48)
    assert rows["segment_ids"].max() >= 3  # several pairs share a row
    cfg = small_config()
    assert_segments_isolated(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=48)), rows)


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


def test_pair_and_label_files_are_checked_by_line(tmp_path):
    cfg = small_config()
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}, {"question": "a", "answer": "b"}])
    data = dataclasses.replace(cfg.data, sources=(C.parse_source("s", f"pairs:{bad}"),), eval_fraction=0.0)
    with pytest.raises(SlimjaxError, match=r"pairs.jsonl:2: a 'pairs' record needs string fields 'prompt' and "
                                           r"'response'; this one has no 'prompt' string \(keys: question, answer\)"):
        records.pairs(data, "train")
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a", "label": "fruit"}, {"text": "b", "label": "wood"}])
    data = dataclasses.replace(cfg.data, sources=(C.parse_source("s", f"labels:{labels}"),), eval_fraction=0.0)
    with pytest.raises(SlimjaxError, match=r"labels.jsonl:2: label 'wood' is not one of slim.classify.classes "
                                           r"\(fruit, metal, stone\)"):
        records.labelled(data, "train", CLASSES)


@pytest.mark.parametrize("key, value, message", [
    ("slim.classify.classes", ("a",), "config key 'slim.classify.classes' must name at least two distinct"),
    ("slim.classify.classes", ("a", "a"), "config key 'slim.classify.classes' must name at least two distinct"),
    ("train.early_stop_patience", -1, "config key 'train.early_stop_patience' must be >= 0"),
    ("checkpoint.best_metric", "f1", "config key 'checkpoint.best_metric' is 'f1'; choose one of 'loss', 'accuracy'"),
])
def test_fine_tuning_config_is_checked(key, value, message):
    from slimjax.configs import base

    c = base.get_config()
    c.slim.recipe = ("classify",)
    c.slim.classify.classes = ("a", "b")
    section, _, name = key.rpartition(".")
    node = c
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(SlimjaxError, match=message):
        C.validate(c)


def test_task_of_a_config():
    from slimjax.configs import base

    c = base.get_config()
    assert finetune.task_of(C.validate(c)) == "lm"
    c.checkpoint.best_metric = "accuracy"
    with pytest.raises(SlimjaxError, match="checkpoint.best_metric='accuracy' is measured on classifiers only"):
        finetune.task_of(C.validate(c))
    c.checkpoint.best_metric = "loss"
    c.data.sources = ("genre",)
    with pytest.raises(SlimjaxError, match="data.sources kind 'genre' carries labels: add 'classify' to slim.recipe"):
        finetune.task_of(C.validate(c))
    c.slim.recipe, c.slim.classify.classes = ("classify",), ("a", "b")
    assert finetune.task_of(C.validate(c)) == "classify"
    c.slim.recipe, c.data.sources = (), ("pairs:/x.jsonl",)
    assert finetune.task_of(C.validate(c)) == "sft"
