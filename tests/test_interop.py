"""Hugging Face import/export: logit parity with transformers, identical round trips, sharded
import, and one-line errors for bad directories."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from hf_models import VARIANTS, hf_logits, random_model, save
from safetensors.numpy import load_file, save_file

from slimjax import config as C
from slimjax.cli import main
from slimjax.configs import base
from slimjax.interop.hf import export_hf, import_hf
from slimjax.interop.safetensors_io import INDEX_FILE
from slimjax.models import abstract_params
from slimjax.sharding import Rules, activation_rules, make_mesh

TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 40))


def mesh_and_rules(data=1, fsdp=1, tensor=1):
    c = base.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    m = C.validate(c).mesh
    n = data * fsdp * tensor
    return make_mesh(m, jax.devices()[:n]), Rules.from_config(m)


def slim_logits(cfg, params, tokens=TOKENS):
    graphdef, _, _ = abstract_params(cfg)
    return np.asarray(nnx.merge(graphdef, params)(tokens))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> directory of a saved random model (built once per module)."""
    root = tmp_path_factory.mktemp("hf")
    return {v: save(v, str(root / v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(saved, variant):
    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(saved[variant], mesh, rules, dtype="float32")
    ref = hf_logits(random_model(variant), TOKENS)
    assert rel_err(slim_logits(cfg, params), ref) <= 1e-4
    if variant == "llama_tied_llama3":
        assert (cfg.tie_embeddings, cfg.rope_scaling, cfg.head_dim) == (True, "llama3", 24)
        # The scaling matters: without it the logits differ, so parity above really tests it.
        plain = cfg.__class__(**{**cfg.__dict__, "rope_scaling": "none"})
        assert rel_err(slim_logits(plain, params), ref) > 1e-3


def test_unrolled_layers_give_the_same_logits(saved):
    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(saved["mistral"], mesh, rules, scan_layers=False, dtype="float32")
    assert set(params["blocks"]) == {0, 1}
    assert rel_err(slim_logits(cfg, params), hf_logits(random_model("mistral"), TOKENS)) <= 1e-4


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied_llama3", "mistral", "gpt2"])
def test_round_trip_gives_identical_tensors_and_transformers_loads_it(saved, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(saved[variant], mesh, rules, dtype="float32")
    arch = json.load(open(os.path.join(saved[variant], "config.json")))["architectures"][0]
    out = str(tmp_path / "out")
    export_hf(cfg, params, out, architecture=arch)
    before, after = load_file(os.path.join(saved[variant], "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == arch
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(random_model(variant), TOKENS))


def test_import_onto_a_mesh_shards_each_leaf_by_the_rules(saved):
    ref_cfg, ref_params = import_hf(saved["llama_gqa"], *mesh_and_rules(), dtype="float32")
    mesh, rules = mesh_and_rules(1, 2, 4)
    cfg, params = import_hf(saved["llama_gqa"], mesh, rules, dtype="float32")
    _, axes, shapes = abstract_params(cfg)
    want = rules.tree_shardings(axes, shapes, mesh)
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    flat_want = jax.tree.leaves(want)
    assert len(flat_params) == len(flat_want) == 12
    sharded = 0
    for (path, leaf), sharding in zip(flat_params, flat_want):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), jax.tree_util.keystr(path)
        sharded += leaf.addressable_shards[0].data.size < leaf.size
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_at(ref_params, path)))
    assert sharded >= 8  # most leaves really are split over the devices
    graphdef, _, _ = abstract_params(cfg)
    with activation_rules(mesh, rules):
        logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, TOKENS)
    np.testing.assert_allclose(np.asarray(logits), slim_logits(ref_cfg, ref_params), rtol=1e-5, atol=1e-5)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_sharded_checkpoints_in_and_out(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save("llama_gqa", str(tmp_path / "src"), max_shard_size="100KB")
    assert os.path.isfile(os.path.join(src, INDEX_FILE))
    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(src, mesh, rules, dtype="float32")
    ref = hf_logits(random_model("llama_gqa"), TOKENS)
    assert rel_err(slim_logits(cfg, params), ref) <= 1e-4
    out = str(tmp_path / "out")
    files = export_hf(cfg, params, out, max_shard_bytes=100_000)
    assert INDEX_FILE in files and len([f for f in files if f.endswith(".safetensors")]) >= 3
    np.testing.assert_array_equal(hf_logits(AutoModelForCausalLM.from_pretrained(out), TOKENS), ref)


def test_cli_import_then_export_round_trips_with_tokenizer(saved, tmp_path, capsys):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert main(["import", f"--hf_dir={saved['gpt2']}", f"--workdir={run}"]) == 0
    assert "imported GPT2LMHeadModel" in capsys.readouterr().out
    # The run's config.py rebuilds the imported config (what fine-tuning with checkpoint.init_from uses).
    from slimjax.cli.flags import load_config_file
    from slimjax.cli.rundir import open_run

    rd = open_run(run)
    assert C.validate(load_config_file(os.path.join(run, "config.py"))) == rd.cfg
    assert rd.cfg.model.positions == "learned" and rd.cfg.data.tokenizer == os.path.join(run, "tokenizer", "tokenizer.json")
    assert main(["export", f"--workdir={run}", f"--out={out}"]) == 0
    before, after = load_file(os.path.join(saved["gpt2"], "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    # The same tokenizer, plus a post-processor that puts BOS first, as slimjax encodes (test_api checks
    # that transformers then encodes and generates like slimjax).
    exported, original = (json.load(open(os.path.join(d, "tokenizer.json"))) for d in (out, saved["gpt2"]))
    assert exported.pop("post_processor")["type"] == "TemplateProcessing" and original.pop("post_processor") is None
    assert exported == original
    # Exporting over an existing directory is refused and leaves it alone.
    assert main(["export", f"--workdir={run}", f"--out={out}"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def _broken(tmp_path, saved, edit):
    """A copy of the llama_gqa directory with its tensors (or config) changed by ``edit``."""
    d = tmp_path / "broken"
    d.mkdir()
    tensors = load_file(os.path.join(saved["llama_gqa"], "model.safetensors"))
    config = json.load(open(os.path.join(saved["llama_gqa"], "config.json")))
    edit(tensors, config)
    save_file(tensors, str(d / "model.safetensors"))
    json.dump(config, open(d / "config.json", "w"))
    return str(d)


BAD = {
    "missing tensor": (lambda t, c: t.pop("model.layers.1.mlp.up_proj.weight"),
                       "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    "extra tensor": (lambda t, c: t.__setitem__("model.layers.2.mlp.up_proj.weight", np.zeros((96, 64), np.float32)),
                     "tensor 'model.layers.2.mlp.up_proj.weight'"),
    "shape mismatch": (lambda t, c: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                  np.zeros((16, 64), np.float32)),
                       "tensor 'model.layers.0.self_attn.k_proj.weight'"),
    "integer tensor": (lambda t, c: t.__setitem__("model.norm.weight", np.ones(64, np.int8)),
                       "tensor 'model.norm.weight'"),
    "unsupported architecture": (lambda t, c: c.__setitem__("architectures", ["T5ForConditionalGeneration"]),
                                 "architecture 'T5ForConditionalGeneration' is not supported"),
    "unsupported setting": (lambda t, c: c.__setitem__("attention_bias", True), "'attention_bias'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_directories_fail_in_one_line_naming_the_tensor_or_key(saved, tmp_path, capsys, case):
    edit, expected = BAD[case]
    src = _broken(tmp_path, saved, edit)
    run = str(tmp_path / "run")
    assert main(["import", f"--hf_dir={src}", f"--workdir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimjax: error: ") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists(run)  # nothing written


def test_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import", f"--hf_dir={tmp_path / 'empty'}", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["llama3", "linear"])
def test_rope_frequencies_equal_transformers_at_llama_31_scale(kind):
    """Head dim 128, theta 5e5, 8192 original positions: all three llama3 bands are populated."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from slimjax.models.layers import rope_inv_freq

    scaling = {"rope_type": kind, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_theta=500000.0, rope_scaling=scaling)
    ref, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ref = ref.numpy()
    mine = np.asarray(rope_inv_freq(128, 500000.0, (kind, 8.0, 1.0, 4.0, 8192)))
    assert attention_factor == 1.0
    np.testing.assert_allclose(mine, ref, rtol=1e-6)
    if kind == "llama3":
        wavelen = 2 * np.pi / ref
        assert min((wavelen < 2048).sum(), ((wavelen >= 2048) & (wavelen <= 8192)).sum(), (wavelen > 8192).sum()) >= 3


@pytest.mark.parametrize("variant", ["llama_tied_llama3", "gpt2"])
def test_greedy_tokens_equal_transformers_generate(saved, variant):
    """Greedy continuation by full forward passes of the imported model equals transformers' generate."""
    import torch

    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(saved[variant], mesh, rules, dtype="float32")
    graphdef, _, _ = abstract_params(cfg)
    model = nnx.merge(graphdef, params)
    prompt = TOKENS[:1, :8]
    tokens = prompt
    for _ in range(12):
        nxt = np.asarray(model(tokens))[:, -1].argmax(-1)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    hf_model = random_model(variant)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                                max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(tokens, ref)


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2"])
def test_layout_transforms_are_views_of_the_memory_map(saved, variant):
    """Every parameter is a transpose/reshape/slice view of the mapped file, so a device's shard
    callback reads only its own bytes (streaming, not a full tensor per device)."""
    from slimjax.interop import hf_config, mapping
    from slimjax.interop.hf import tensor_reader
    from slimjax.interop.safetensors_io import TensorIndex

    mesh, rules = mesh_and_rules()
    cfg, _ = import_hf(saved[variant], mesh, rules)
    tensors = TensorIndex(saved[variant])
    links = mapping.links_for(cfg, hf_config.family(cfg), "transformer." if variant == "gpt2" else "")
    for link in links:
        layer = 1 if link.per_layer else None
        view = tensor_reader(tensors, link)(layer)
        assert np.shares_memory(view, tensors.array(link.hf_name(layer))), link.path
        assert not view.flags.owndata, link.path


def test_bfloat16_checkpoints_import_exactly(tmp_path):
    """Released checkpoints are bf16: each value arrives exactly (bf16 -> f32 is lossless)."""
    import torch

    model = random_model("llama_gqa").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    mesh, rules = mesh_and_rules()
    cfg, params = import_hf(str(tmp_path / "bf16"), mesh, rules, dtype="float32")
    want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [kv*hd, D]
    got = np.asarray(params["blocks"]["attn"]["wk"]["kernel"][1])  # [D, kv, hd]
    np.testing.assert_array_equal(got.reshape(got.shape[0], -1).T, want)
    from transformers import AutoModelForCausalLM

    # The bf16 weights computed in f32 (a fresh load, so RoPE's buffer is f32 too).
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32), TOKENS)
    assert rel_err(slim_logits(cfg, params), ref) <= 1e-4


def test_config_keys_old_and_new_rope_spellings_and_sliding_window():
    from slimjax.interop.hf_config import model_keys

    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 8, "intermediate_size": 96, "max_position_embeddings": 64}
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = model_keys({**llama, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = model_keys({**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})
    assert legacy == v5
    assert (v5["rope_scaling"], v5["rope_factor"], v5["rope_original_max_len"], v5["rope_theta"]) == (
        "llama3", 32.0, 8192, 500000.0)
    assert (v5["n_kv_heads"], v5["head_dim"], v5["tie_embeddings"]) == (8, 8, False)  # transformers' defaults
    mistral = model_keys({**llama, "architectures": ["MistralForCausalLM"], "sliding_window": 16})
    assert mistral["max_seq_len"] == 16  # full attention equals the window's up to its length


@pytest.mark.parametrize("edit, expected", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "config.json 'hidden_act' is 'gelu'"),
    ({"hidden_size": None}, "config.json has no 'hidden_size'"),
    ({"architectures": [], "model_type": "t5"}, "architecture 't5' is not supported"),
])
def test_config_keys_refuse_what_slimjax_cannot_compute(edit, expected):
    from slimjax.errors import SlimjaxError
    from slimjax.interop.hf_config import model_keys

    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 8, "intermediate_size": 96, "max_position_embeddings": 64}
    with pytest.raises(SlimjaxError, match=expected):
        model_keys({**llama, **edit})


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(saved, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    src = _broken(tmp_path, saved, lambda t, c: None)
    vocab = {"</s>": 0, **{f"w{i}": i + 1 for i in range(200)}}
    Tokenizer(models.WordLevel(vocab, unk_token="</s>")).save(os.path.join(src, "tokenizer.json"))
    assert main(["import", f"--hf_dir={src}", f"--workdir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "has 201 ids but config.json's vocab_size is 128" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")


def test_two_processes_import_their_shards_and_export_together(saved, tmp_path):
    """Real jax.distributed processes: each materialises only its devices' shards, the model
    computes the transformers logits across both, and the joint export is the original file."""
    import sys

    from helpers import run_processes

    worker = os.path.join(os.path.dirname(__file__), "interop_worker.py")
    out, prefix = str(tmp_path / "out"), str(tmp_path / "result")
    run_processes(lambda i, port: [sys.executable, worker, str(i), "2", str(port), saved["llama_gqa"], out, prefix], 2)
    results = [json.load(open(f"{prefix}{i}.json")) for i in range(2)]
    assert [r["devices"] for r in results] == [8, 8] and [r["local_devices"] for r in results] == [4, 4]
    # Each process holds (and so read) only its half of the sharded values, not the whole model.
    assert all(r["local_values"] < 0.75 * r["total_values"] for r in results)
    assert results[0]["files"] == ["model.safetensors", "config.json"] and results[1]["files"] == []
    ref = hf_logits(random_model("llama_gqa"), np.random.default_rng(0).integers(0, 128, size=(2, 40)))
    assert rel_err(np.load(prefix + ".npy"), ref) <= 1e-4
    before, after = load_file(os.path.join(saved["llama_gqa"], "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
