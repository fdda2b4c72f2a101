"""PEFT LoRA adapters in and out, checked against the real ``peft`` library: merged kernels equal
``merge_and_unload``, exported adapters load in ``PeftModel`` with the same logits and file, both
parameter layouts, and one-line errors naming what is wrong."""

import json
import os
import shutil

import numpy as np
import pytest

from hf_models import hf_config, hf_logits, random_model, save
from safetensors.numpy import load_file, save_file

from slimjax.config import validate
from slimjax.errors import SlimjaxError
from slimjax.interop import mapping
from slimjax.interop.hf import base_config, import_hf
from slimjax.interop.peft import LoraOptions, export_adapter, import_adapter, merge_kernel
from test_interop import TOKENS, mesh_and_rules, rel_err

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


def make_peft(variant, target_modules=tuple(SEVEN), rslora=False):
    """A peft LoRA model on the random ``variant`` (same weights every call), every lora_B nonzero
    (peft initialises B to zero, which would make every check below pass trivially)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    model = get_peft_model(random_model(variant), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             lora_dropout=0.0, use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def model_cfg(variant, scan_layers=True):
    """slimjax model config of a test variant, without importing weights."""
    c = base_config(hf_config(variant).to_dict())
    c.model.scan_layers = scan_layers
    return validate(c).model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {v: save(v, str(root / v), tokenizer=False) for v in ("llama_gqa", "mistral")}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(variant, target_modules, rslora) -> directory of that peft adapter (saved once)."""
    root, made = tmp_path_factory.mktemp("adapters"), {}

    def get(variant, target_modules=tuple(SEVEN), rslora=False):
        key = (variant, target_modules, rslora)
        if key not in made:
            made[key] = str(root / f"a{len(made)}")
            make_peft(*key).save_pretrained(made[key])
        return made[key]

    return get


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def kernel_links(cfg, targets):
    return [link for link in mapping.llama_links(cfg) if link.path[-1] == "kernel" and link.path[-2] in targets]


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("variant", ["llama_gqa", "mistral"])
def test_merged_kernels_equal_peft_merge_and_unload(bases, adapter, variant, rslora, scan_layers):
    cfg, params = import_hf(bases[variant], *mesh_and_rules(), scan_layers=scan_layers, dtype="float32")
    options, adapters = import_adapter(adapter(variant, rslora=rslora), cfg)
    assert options == LoraOptions(4, 8.0, rslora, 0.0, ("wq", "wk", "wv", "wo", "gate", "up", "down"))
    assert options.scale == (8 / 2 if rslora else 8 / 4)
    merged = {k: v.numpy() for k, v in make_peft(variant, rslora=rslora).merge_and_unload().state_dict().items()}
    links = kernel_links(cfg, options.targets)
    assert len(links) == 7
    for link in links:
        if scan_layers:  # merge all layers at once (the stacked form of merge_kernel)
            kernel = np.asarray(_at(params, link.path))
            whole = merge_kernel(kernel, *(_at(adapters, link.path[:-1] + ("tap", w)) for w in "ab"), options.scale)
        for layer in range(cfg.n_layers):
            path = mapping.slim_path(link, layer, scan_layers)
            if scan_layers:
                base, got = kernel[layer], whole[layer]
            else:
                lora = path[:-1] + ("tap",)
                base = np.asarray(_at(params, path))
                got = merge_kernel(base, _at(adapters, lora + ("a",)), _at(adapters, lora + ("b",)), options.scale)
            want = merged[link.hf_name(layer)]
            np.testing.assert_allclose(link.to_hf(got), want, rtol=1e-5, atol=1e-6, err_msg=link.hf_name(layer))
            assert np.abs(link.to_hf(base) - want).max() > 1e-3  # the adapter really changes this kernel


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("variant,targets", [("llama_gqa", (*SEVEN, "lm_head")), ("mistral", tuple(SEVEN))])
def test_export_round_trip_loads_in_peft_with_same_logits_and_file(adapter, variant, targets, scan_layers, tmp_path):
    from peft import PeftModel

    src = adapter(variant, targets)
    cfg = model_cfg(variant, scan_layers)
    options, adapters = import_adapter(src, cfg)
    assert ("lm_head" in options.targets) == ("lm_head" in targets)
    out = str(tmp_path / "out")
    assert sorted(export_adapter(cfg, adapters, options, out, base_model="tiny")) == sorted(
        [WEIGHTS, "adapter_config.json"])
    theirs, ours = load_file(os.path.join(src, WEIGHTS)), load_file(os.path.join(out, WEIGHTS))
    # peft also saves a copy of lm_head's base weight when it is a target; an adapter needs none.
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".base_layer.weight")}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    written = json.load(open(os.path.join(out, "adapter_config.json")))
    assert sorted(written["target_modules"]) == sorted(targets)
    assert written["base_model_name_or_path"] == "tiny"
    reloaded = PeftModel.from_pretrained(random_model(variant), out).eval()
    want = hf_logits(make_peft(variant, targets), TOKENS)
    assert rel_err(hf_logits(reloaded, TOKENS), want) <= 1e-4
    assert rel_err(hf_logits(random_model(variant), TOKENS), want) > 1e-3  # the adapter matters


def test_regex_target_modules_select_by_full_module_name(adapter, tmp_path):
    from peft import PeftModel

    regex = r".*\.(q_proj|down_proj)"
    cfg = model_cfg("llama_gqa", scan_layers=False)
    options, adapters = import_adapter(adapter("llama_gqa", regex), cfg)
    assert options.targets == ("wq", "down")
    assert set(adapters["blocks"][1]) == {"attn", "mlp"} and set(adapters["blocks"][1]["attn"]) == {"wq"}
    export_adapter(cfg, adapters, options, str(tmp_path / "out"))
    reloaded = PeftModel.from_pretrained(random_model("llama_gqa"), str(tmp_path / "out")).eval()
    assert rel_err(hf_logits(reloaded, TOKENS), hf_logits(make_peft("llama_gqa", regex), TOKENS)) <= 1e-4


def test_merge_kernel_is_kernel_plus_scaled_product():
    rng = np.random.default_rng(0)
    kernel, a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 2)), rng.normal(size=(2, 4, 5))
    got = merge_kernel(kernel, a, b, 0.5)
    for i in range(3):
        np.testing.assert_allclose(got[i], kernel[i] + 0.5 * np.tensordot(a[i], b, 1), rtol=1e-12)
    stacked = merge_kernel(np.stack([kernel, 2 * kernel]), np.stack([a, a]), np.stack([b, -b]), 0.5)
    np.testing.assert_allclose(stacked[0], got, rtol=1e-12)
    np.testing.assert_allclose(stacked[1], 2 * kernel - (got - kernel), rtol=1e-12)


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture
def copy(adapter, tmp_path):
    """A writable copy of the llama_gqa adapter."""
    return shutil.copytree(adapter("llama_gqa"), str(tmp_path / "copy"))


def _edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    raw = json.load(open(path))
    raw.update(changes)
    json.dump(raw, open(path, "w"))


def _edit_tensors(directory, edit):
    path = os.path.join(directory, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("key,value,named", [
    ("use_dora", True, "use_dora"),
    ("bias", "all", "bias"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": 16}, "alpha_pattern"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("layers_to_transform", [0], "layers_to_transform"),
    ("peft_type", "LOHA", "LOHA"),
    ("target_modules", ["q_proj", "embed_tokens"], "embed_tokens"),
    ("target_modules", r"model\.layers\.0\.self_attn\.q_proj", "only some layers"),
])
def test_unsupported_config_is_refused_by_name(copy, key, value, named):
    _edit_config(copy, **{key: value})
    with pytest.raises(SlimjaxError, match=named):
        import_adapter(copy, model_cfg("llama_gqa"))


def test_adapter_for_a_different_base_model_names_the_tensor_and_both_shapes(adapter):
    # llama_linear has hidden size 32; the adapter was made for llama_gqa (hidden size 64).
    with pytest.raises(SlimjaxError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 64\).*\(4, 32\).*"
                                           "different base model"):
        import_adapter(adapter("llama_gqa"), model_cfg("llama_linear"))


@pytest.mark.parametrize("missing", ["adapter_config.json", WEIGHTS])
def test_missing_files_are_named(copy, missing):
    os.remove(os.path.join(copy, missing))
    with pytest.raises(SlimjaxError, match=missing):
        import_adapter(copy, model_cfg("llama_gqa"))


def test_missing_tensor_of_one_layer_is_named(copy):
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    _edit_tensors(copy, lambda t: t.pop(key))
    with pytest.raises(SlimjaxError, match=key.replace(".", r"\.") + ".* is missing"):
        import_adapter(copy, model_cfg("llama_gqa"))


def test_non_float_tensor_is_refused(copy):
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    _edit_tensors(copy, lambda t: t.update({key: t[key].astype(np.int32)}))
    with pytest.raises(SlimjaxError, match=key.replace(".", r"\.") + ".* is I32"):
        import_adapter(copy, model_cfg("llama_gqa"))


def test_tensor_with_no_place_is_named(copy):
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    _edit_tensors(copy, lambda t: t.update({key: np.zeros((4, 128), np.float32)}))
    with pytest.raises(SlimjaxError, match=key.replace(".", r"\.")):
        import_adapter(copy, model_cfg("llama_gqa"))


def test_gpt2_export_says_to_export_the_merged_model(tmp_path):
    options = LoraOptions(4, 8.0, False, 0.0, ("wq",))
    with pytest.raises(SlimjaxError, match="only for Llama/Mistral.*merged model"):
        export_adapter(model_cfg("gpt2"), {}, options, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_export_refuses_a_non_empty_directory_and_wrong_shapes(adapter, tmp_path):
    cfg = model_cfg("llama_gqa")
    options, adapters = import_adapter(adapter("llama_gqa"), cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SlimjaxError, match="not an empty directory"):
        export_adapter(cfg, adapters, options, str(tmp_path / "full"))
    adapters["blocks"]["attn"]["wo"]["tap"]["b"] = np.zeros((2, 4, 32), np.float32)
    with pytest.raises(SlimjaxError, match=r"blocks/attn/wo/tap/b.*\(2, 4, 32\).*\(2, 4, 64\)"):
        export_adapter(cfg, adapters, options, str(tmp_path / "out"))
    with pytest.raises(SlimjaxError, match="lm_head"):  # not in this adapter tree
        export_adapter(cfg, adapters, LoraOptions(4, 8.0, False, 0.0, ("lm_head",)), str(tmp_path / "out"))


def test_cli_import_adapter_then_export_merged_and_adapters_match_peft(bases, adapter, tmp_path):
    """`slimjax import --adapter` builds the LoRA model spec on the imported base: its logits equal
    peft's (the adapter applied in the Dense seam, not merged); `slimjax export` writes the merged
    model and `slimjax export --adapters` a PEFT directory that peft loads, both with peft's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimjax.cli import main
    from slimjax.cli.rundir import open_run
    from slimjax.infer.scoring import forward

    want = hf_logits(make_peft("llama_gqa"), TOKENS)
    run = str(tmp_path / "run")
    assert main(["import", f"--hf_dir={bases['llama_gqa']}", f"--adapter={adapter('llama_gqa')}",
                 f"--workdir={run}"]) == 0
    rd = open_run(run)
    assert [name for name, _ in rd.spec.recipe] == ["lora"]
    batch = {"inputs": TOKENS, "positions": np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape),
             "segment_ids": np.ones_like(TOKENS)}
    got = np.asarray(forward(rd.built.graphdef, rd.restore_params(), batch))
    assert rel_err(got, want) < 1e-4

    merged, adapters = str(tmp_path / "merged"), str(tmp_path / "adapters")
    assert main(["export", f"--workdir={run}", f"--out={merged}"]) == 0
    assert rel_err(hf_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), TOKENS),
                   want) < 1e-4
    assert main(["export", "--adapters", f"--workdir={run}", f"--out={adapters}"]) == 0
    base = AutoModelForCausalLM.from_pretrained(bases["llama_gqa"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, adapters).eval()
    assert rel_err(hf_logits(loaded, TOKENS), want) < 1e-4


def test_cli_import_adapter_for_another_base_fails_in_one_line_and_writes_nothing(bases, adapter, tmp_path, capsys):
    """An adapter whose shapes do not match the base model: one line, exit 2, no workdir."""
    from slimjax.cli import main

    run = tmp_path / "run"
    assert main(["import", f"--hf_dir={bases['llama_gqa']}", f"--adapter={adapter('mistral')}",
                 f"--workdir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different base model" in err[0]
    assert not run.exists()
