"""BERT checkpoints in and out: MLM and NSP logit parity with transformers (padding and token
types included), byte-identical round trips, and one-line refusals of what cannot be computed."""

import json
import os

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from hf_models import BERT_ARCHS, random_bert
from test_interop import mesh_and_rules, rel_err
from slimjax.cli import main
from slimjax.interop.hf import export_hf, import_hf
from slimjax.models import abstract_params

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
