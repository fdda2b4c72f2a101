"""BERT checkpoints in and out: MLM, NSP and sequence-classifier logit parity with transformers
(padding and token types included), byte-identical round trips, an imported classifier scored by
`slimjax eval` as transformers scores it, and one-line refusals of what cannot be computed."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from hf_models import BERT_ARCHS, WORDS, random_bert, write_tokenizer
from test_interop import mesh_and_rules, rel_err
from slimjax.cli import main
from slimjax.config import validate
from slimjax.interop.hf import base_config, export_hf, import_hf
from slimjax.interop.hf_config import read_config
from slimjax.models import abstract_params
from slimjax.slim import classify
from slimjax.slim.spec import build, spec_from_config

RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, 128, (3, 24))
TYPES = (np.arange(24) >= 9).astype(np.int64)[None].repeat(3, 0)
ATTENTION = np.ones((3, 24), np.int64)
ATTENTION[1, 15:] = 0  # a padded row
ATTENTION[2, 20:] = 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    out = {}
    for arch in BERT_ARCHS:
        random_bert(arch).save_pretrained(str(root / arch))
        out[arch] = str(root / arch)
    return out


def hf_outputs(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS), token_type_ids=torch.tensor(TYPES),
                     attention_mask=torch.tensor(ATTENTION))


def slim_outputs(cfg, params):
    model = nnx.merge(abstract_params(cfg)[0], params)
    mlm, pair = model(TOKENS, TYPES, None, ATTENTION)  # segment ids: 1 = real, 0 = padding
    return np.asarray(mlm), np.asarray(pair)


@pytest.mark.parametrize("arch", BERT_ARCHS)
def test_logits_match_transformers_with_padding_and_token_types(saved, arch):
    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(saved[arch], mesh, rules, dtype="float32")
    assert (cfg.family, cfg.norm_position, cfg.mlp) == ("encoder", "post", "gelu_exact")
    ref = hf_outputs(random_bert(arch))
    mlm, pair = slim_outputs(cfg, params)
    real = ATTENTION.astype(bool)  # padded positions' outputs are not defined by either model
    want = ref.prediction_logits if arch == "BertForPreTraining" else ref.logits
    assert rel_err(mlm[real], want.numpy()[real]) <= 1e-4
    if arch == "BertForPreTraining":
        assert rel_err(pair, ref.seq_relationship_logits.numpy()) <= 1e-4
    else:  # no NSP head in the checkpoint: it imports as zeros
        assert not np.any(np.asarray(params["nsp"]["kernel"]))
    # Token types matter: with all zeros the logits differ, so the parity above tests them.
    zero_types = nnx.merge(abstract_params(cfg)[0], params)(TOKENS, None, None, ATTENTION)[0]
    assert rel_err(np.asarray(zero_types)[real], want.numpy()[real]) > 1e-3


@pytest.mark.parametrize("arch", BERT_ARCHS)
def test_round_trip_gives_identical_tensors_that_transformers_loads(saved, arch, tmp_path):
    import transformers

    mesh, rules = mesh_and_rules(data=2, fsdp=2, tensor=2)
    cfg, params = import_hf(saved[arch], mesh, rules, dtype="float32")
    out = str(tmp_path / "out")
    export_hf(cfg, params, out, architecture=arch)
    before = load_file(os.path.join(saved[arch], "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert set(before) == set(after)
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [arch]
    reloaded = getattr(transformers, arch).from_pretrained(out).eval()
    a, b = hf_outputs(reloaded), hf_outputs(random_bert(arch))
    for x, y in zip(a.values(), b.values()):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.mark.parametrize("key,value", [("position_embedding_type", "relative_key"), ("hidden_act", "relu"),
                                       ("is_decoder", True), ("tie_word_embeddings", False)])
def test_unsupported_bert_settings_are_refused_by_name(saved, tmp_path, capsys, key, value):
    src = tmp_path / "src"
    src.mkdir()
    raw = json.load(open(os.path.join(saved["BertForPreTraining"], "config.json")))
    raw[key] = value
    (src / "config.json").write_text(json.dumps(raw))
    os.symlink(os.path.join(saved["BertForPreTraining"], "model.safetensors"), src / "model.safetensors")
    assert main(["import", f"--hf_dir={src}", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and repr(value) in err
    assert not (tmp_path / "run").exists()


CLS_ARCH = "BertForSequenceClassification"
LABELS = ("negative", "neutral", "positive")


def random_classifier(**config):
    return random_bert(CLS_ARCH, id2label=dict(enumerate(LABELS)), label2id={c: i for i, c in enumerate(LABELS)},
                       **config)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bert-cls") / "model")
    random_classifier().save_pretrained(path)
    return path


def classifier_logits(hf_dir, cfg, params, tokens, types, attention):
    """slimjax's class logits: the imported spec (encoder + classify), its pooler and head."""
    spec = dataclasses.replace(spec_from_config(validate(base_config(read_config(hf_dir)))), model=cfg)
    built = build(spec)
    hidden = nnx.merge(built.graphdef, params).features(tokens, types, None, attention)
    return np.asarray(classify.head_of(built).logits(params, {"segment_ids": attention}, hidden))


def test_sequence_classifier_matches_transformers_and_round_trips(classifier_dir, tmp_path):
    import transformers

    mesh, rules = mesh_and_rules(data=2, fsdp=2, tensor=2)
    cfg, params = import_hf(classifier_dir, mesh, rules, dtype="float32")
    assert params["classifier"]["kernel"].shape == (32, 3)
    assert not np.any(np.asarray(params["mlm"]["dense"]["kernel"]))  # heads it does not carry import as zeros
    got = classifier_logits(classifier_dir, cfg, params, TOKENS, TYPES, ATTENTION)
    want = hf_outputs(random_classifier()).logits.numpy()
    assert rel_err(got, want) <= 1e-4
    out = str(tmp_path / "out")
    export_hf(cfg, params, out, classes=LABELS)  # the classes pick the architecture
    before = load_file(os.path.join(classifier_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert set(before) == set(after)
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["architectures"] == [CLS_ARCH] and written["problem_type"] == "single_label_classification"
    reloaded = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == dict(enumerate(LABELS)) and reloaded.config.num_labels == 3
    np.testing.assert_array_equal(hf_outputs(reloaded).logits.numpy(), want)


@pytest.mark.parametrize("change,message", [
    ({"problem_type": "regression"}, "'problem_type' is 'regression'"),
    ({"problem_type": "multi_label_classification"}, "'problem_type' is 'multi_label_classification'"),
    ({"id2label": {"0": "score"}, "label2id": {"score": 0}}, "two or more distinct labels"),
])
def test_classifiers_slimjax_cannot_train_the_same_way_are_refused_by_name(classifier_dir, tmp_path, capsys,
                                                                           change, message):
    src = tmp_path / "src"
    src.mkdir()
    raw = json.load(open(os.path.join(classifier_dir, "config.json"))) | change
    (src / "config.json").write_text(json.dumps(raw))
    os.symlink(os.path.join(classifier_dir, "model.safetensors"), src / "model.safetensors")
    assert main(["import", f"--hf_dir={src}", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_imported_classifier_is_scored_by_eval_as_transformers_scores_it_and_exports_back(classifier_dir, tmp_path,
                                                                                         capsys):
    import torch

    import slimjax
    from slimjax.config import parse_source
    from slimjax.data import finetune, records

    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(classifier_dir, name), src / name)
    write_tokenizer(str(src / "tokenizer.json"))
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["import", f"--hf_dir={src}", f"--workdir={run}"]) == 0
    rng = np.random.default_rng(1)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 12)), "label": str(c)}) + "\n"
                                for c in rng.choice(LABELS, 40)))
    assert main(["eval", f"--workdir={run}", f"--source=labels:{labelled}", "--split=train"]) == 0
    result = json.load(open(run / "eval.json"))
    # transformers on the same rows ([CLS] text [SEP], padding masked): the same accuracy.
    loaded = slimjax.load_run(str(run))
    data = dataclasses.replace(loaded.config.data, sources=(parse_source("s", f"labels:{labelled}"),))
    rows = finetune.classification_examples(records.labelled(data, "train", LABELS), LABELS, loaded.tokenizer,
                                            data.seq_len, sep=True)
    with torch.no_grad():
        logits = random_classifier()(input_ids=torch.tensor(rows["inputs"]),
                                     attention_mask=torch.tensor(rows["segment_ids"])).logits.numpy()
    assert result["examples"] == len(rows["labels"]) > 20
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == rows["labels"]), abs=1e-12)
    # Its config.py is a classification config on labelled data, of the same model spec (what init_from loads).
    module_spec = importlib.util.spec_from_file_location("imported_config", run / "config.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config()
    c.data.sources = (f"labels:{labelled}",)
    cfg = validate(c)
    assert finetune.task_of(cfg) == "classify" and spec_from_config(cfg).difference(loaded.rundir.spec) is None
    capsys.readouterr()
    assert main(["export", f"--workdir={run}", f"--out={out}"]) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after) and all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert main(["export", f"--workdir={run}", f"--out={tmp_path / 'mlm'}", "--architecture=BertForMaskedLM"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export it as BertForSequenceClassification" in err
    assert not (tmp_path / "mlm").exists()


def test_interop_states_the_classifier_head_as_the_classify_transform_builds_it():
    import slimjax
    from slimjax.interop.hf import with_classifier_head

    c = slimjax.configs.bert_tiny.get_config()
    c.slim.recipe, c.slim.classify.classes = ("classify",), ("a", "b", "c")
    cfg = validate(c)
    built = build(spec_from_config(cfg))
    axes, shapes = with_classifier_head({}, {}, cfg.model.d_model, 3)
    assert axes["classifier"] == built.axes["classifier"]
    assert {k: (v.shape, v.dtype) for k, v in shapes["classifier"].items()} == {
        k: (v.shape, v.dtype) for k, v in built.shapes["classifier"].items()}
