"""Config validation: every bundled config validates; bad keys and values name themselves."""

import jax
import pytest

from slimjax import config as C
from slimjax.configs import base, gpt2_small, llama_1b, llama_7b, tiny
from slimjax.errors import SlimjaxError
from slimjax.models import compute_dtype
from slimjax.sharding import Rules, make_mesh
from slimjax.train import optimizer as optim
from slimjax.train.state import make_setup

# Parameter counts of the reference models (GPT-2 with its vocabulary padded to 50304).
EXPECTED_PARAMS = {
    "gpt2_small": 124_475_904,
    "llama_1b": None,  # computed below from the shape formula
    "llama_7b": 6_738_415_616,  # Llama-2-7B exactly
}


def test_every_bundled_config_validates():
    for module in (base, tiny, gpt2_small, llama_1b, llama_7b):
        C.validate(module.get_config())


@pytest.mark.parametrize("name,module", [("gpt2_small", gpt2_small), ("llama_1b", llama_1b), ("llama_7b", llama_7b)])
def test_large_configs_shape_evaluate_on_the_8_device_mesh(name, module):
    cfg = C.validate(module.get_config())
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
    setup = make_setup(cfg.model, compute_dtype("bfloat16", "gpu"), optim.make_optimizer(cfg.optimizer, 10),
                       Rules.from_config(cfg.mesh), mesh)
    n = sum(x.size for x in jax.tree.leaves(setup.abstract.params))
    m = cfg.model
    expected = EXPECTED_PARAMS[name] or (
        2 * m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) // 2
        + m.n_layers * (m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim + m.n_heads * m.head_dim * m.d_model
                        + 3 * m.d_model * m.d_ff + 2 * m.d_model) + m.d_model)
    assert n == expected
    embed = setup.shardings.params["embed"]["embedding"]
    assert embed.spec[1] == "fsdp"  # FSDP shards the residual dimension of every big matrix


def test_unknown_and_mistyped_keys_are_named():
    c = base.get_config()
    c.model.unlisted = 3
    with pytest.raises(SlimjaxError, match=r"unknown config key 'model.unlisted'"):
        C.validate(c)
    c = base.get_config()
    c.train.unlisted_stepz = 3
    with pytest.raises(SlimjaxError, match=r"train.unlisted_stepz"):
        C.validate(c)
    c = base.get_config().to_dict()
    c["model"]["n_layers"] = "four"
    with pytest.raises(SlimjaxError, match=r"'model.n_layers' must be int, got 'four'"):
        C.validate(c)
    c = base.get_config().to_dict()
    c["model"]["remat"] = "some"
    with pytest.raises(SlimjaxError, match=r"'model.remat' is 'some'; choose one of 'none', 'dots', 'full'"):
        C.validate(c)
    c = base.get_config().to_dict()
    del c["optimizer"]["b1"]
    with pytest.raises(SlimjaxError, match=r"missing 'optimizer.b1'"):
        C.validate(c)


def test_cross_field_checks():
    c = base.get_config()
    c.model.n_kv_heads = 3
    with pytest.raises(SlimjaxError, match="not a multiple of model.n_kv_heads=3"):
        C.validate(c)
    c = base.get_config()
    c.train.microbatches = 3
    with pytest.raises(SlimjaxError, match="not divisible by train.microbatches=3"):
        C.validate(c)
    c = base.get_config()
    c.mesh.rules = (("batch", "data"), ("batch", None))
    with pytest.raises(SlimjaxError, match="two rules for 'batch'"):
        C.validate(c)


def test_rules_reject_unknown_axes_unknown_names_and_reused_mesh_axes():
    c = base.get_config()
    c.mesh.rules = (("batch", "pipeline"),)
    with pytest.raises(SlimjaxError, match="unknown mesh axis 'pipeline'"):
        Rules.from_config(C.validate(c).mesh)
    c.mesh.rules = (("embedd", None),)
    with pytest.raises(SlimjaxError) as e:
        Rules.from_config(C.validate(c).mesh)
    msg = str(e.value)
    assert "unknown logical axis name 'embedd' (did you mean 'embed'?)" in msg
    assert "DEFAULT_RULES in slimjax/sharding.py" in msg
    with pytest.raises(SlimjaxError, match="'lora_a' used by the model have no rule"):
        Rules.from_config(C.validate(base.get_config()).mesh).require(("embed", "lora_a"))
    rules = Rules({"a": ("fsdp",), "b": ("fsdp",)})
    with pytest.raises(SlimjaxError, match="onto mesh axis 'fsdp'"):
        rules.spec(("a", "b"))


def test_mesh_fill_and_errors():
    from slimjax.sharding import mesh_shape

    c = C.validate(base.get_config()).mesh
    assert mesh_shape(c, 8) == {"data": 8, "stage": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
    import dataclasses

    assert mesh_shape(dataclasses.replace(c, data=2, fsdp=-1, tensor=2), 8) == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
    with pytest.raises(SlimjaxError, match="does not divide the 8 available devices"):
        mesh_shape(dataclasses.replace(c, data=-1, tensor=3), 8)
    with pytest.raises(SlimjaxError, match="only one mesh axis may be -1"):
        mesh_shape(dataclasses.replace(c, data=-1, fsdp=-1), 8)
