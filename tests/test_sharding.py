"""Leaf-by-leaf sharding of parameters and optimizer state, and FSDP memory, on 8 fake devices."""

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import build_state, small_config, with_mesh
from slimjax.sharding import DEFAULT_RULES, Rules, path_str

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]

# What the model must name each parameter (scanned layout: leading 'layers').
EXPECTED_AXES = {
    "llama": {
        "embed/embedding": ("vocab", "embed"),
        "blocks/attn/wq/kernel": ("layers", "embed", "heads", "head_dim"),
        "blocks/attn/wk/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "blocks/attn/wv/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "blocks/attn/wo/kernel": ("layers", "heads", "head_dim", "embed"),
        "blocks/attn_norm/scale": ("layers", "norm"),
        "blocks/mlp_norm/scale": ("layers", "norm"),
        "blocks/mlp/gate/kernel": ("layers", "embed", "mlp"),
        "blocks/mlp/up/kernel": ("layers", "embed", "mlp"),
        "blocks/mlp/down/kernel": ("layers", "mlp", "embed"),
        "final_norm/scale": ("norm",),
        "lm_head/kernel": ("embed", "vocab"),
    },
    "gpt2": {
        "embed/embedding": ("vocab", "embed"),
        "pos_embed": ("positions", "embed"),
        "blocks/attn/wq/kernel": ("layers", "embed", "heads", "head_dim"),
        "blocks/attn/wq/bias": ("layers", "heads", "head_dim"),
        "blocks/attn/wk/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "blocks/attn/wk/bias": ("layers", "kv_heads", "head_dim"),
        "blocks/attn/wv/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "blocks/attn/wv/bias": ("layers", "kv_heads", "head_dim"),
        "blocks/attn/wo/kernel": ("layers", "heads", "head_dim", "embed"),
        "blocks/attn/wo/bias": ("layers", "embed"),
        "blocks/attn_norm/scale": ("layers", "norm"),
        "blocks/attn_norm/bias": ("layers", "norm"),
        "blocks/mlp_norm/scale": ("layers", "norm"),
        "blocks/mlp_norm/bias": ("layers", "norm"),
        "blocks/mlp/up/kernel": ("layers", "embed", "mlp"),
        "blocks/mlp/up/bias": ("layers", "mlp"),
        "blocks/mlp/down/kernel": ("layers", "mlp", "embed"),
        "blocks/mlp/down/bias": ("layers", "embed"),
        "final_norm/scale": ("norm",),
        "final_norm/bias": ("norm",),
    },
}
_BERT_BODY = {k: v for k, v in EXPECTED_AXES["gpt2"].items() if not k.startswith("final_norm")}
EXPECTED_AXES["bert"] = {
    **_BERT_BODY,
    "type_embed": ("types", "embed"),
    "embed_norm/scale": ("norm",),
    "embed_norm/bias": ("norm",),
    "mlm/dense/kernel": ("embed", "embed_out"),
    "mlm/dense/bias": ("embed_out",),
    "mlm/norm/scale": ("norm",),
    "mlm/norm/bias": ("norm",),
    "mlm/bias": ("vocab",),
    "pooler/kernel": ("embed", "embed_out"),
    "pooler/bias": ("embed_out",),
    "nsp/kernel": ("embed_out", "classes"),
    "nsp/bias": ("classes",),
}


def expected_spec(axes, rules):
    """The rules table applied by hand: the defaults with the config's overrides (None/str/tuple)."""
    table = {**DEFAULT_RULES, **dict(rules)}
    out = []
    for name in axes:
        mesh_axes = table[name]
        if mesh_axes is None or mesh_axes == ():
            out.append(None)
        else:
            out.append(mesh_axes if isinstance(mesh_axes, str) or len(mesh_axes) > 1 else mesh_axes[0])
    return P(*out)


def flat(tree):
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("shape", MESHES)
def test_params_and_optimizer_state_follow_the_rules(family, shape):
    cfg = with_mesh(small_config(family), *shape)
    mesh, _, setup, state = build_state(cfg)
    axes = _flat_axes(setup.axes)
    assert axes == EXPECTED_AXES[family]
    params = flat(state.params)
    assert set(params) == set(EXPECTED_AXES[family])
    for name, leaf in params.items():
        want = NamedSharding(mesh, expected_spec(EXPECTED_AXES[family][name], cfg.mesh.rules))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding.spec, want.spec)
    # AdamW moments mirror their parameter; the step counts are replicated scalars.
    n_moments = 0
    for path, leaf in flat(state.opt_state).items():
        parts = path.split("/")
        if "mu" in parts or "nu" in parts:
            cut = max(i for i, p in enumerate(parts) if p in ("mu", "nu")) + 1
            pname = "/".join(parts[cut:])
            want = NamedSharding(mesh, expected_spec(EXPECTED_AXES[family][pname], cfg.mesh.rules))
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding.spec)
            n_moments += 1
        else:
            assert leaf.ndim == 0 and leaf.sharding.is_fully_replicated, path
    assert n_moments == 2 * len(params)
    assert state.step.sharding.is_fully_replicated


def _flat_axes(axes_tree):
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    return {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes)[0]}


def test_hand_written_specs_on_the_2x4_mesh():
    """Spot checks that do not go through any rules code: (data=1, fsdp=2, tensor=4)."""
    cfg = with_mesh(small_config("llama"), 1, 2, 4)
    _, _, _, state = build_state(cfg)
    p = state.params
    assert p["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert p["blocks"]["attn"]["wq"]["kernel"].sharding.spec == P("stage", "fsdp", "tensor")  # stage: size 1 here
    assert p["blocks"]["mlp"]["down"]["kernel"].sharding.spec == P("stage", "tensor", "fsdp")
    assert p["final_norm"]["scale"].sharding.spec == P()
    local = p["blocks"]["attn"]["wq"]["kernel"].addressable_shards[0].data.shape
    assert local == (2, 64 // 2, 8 // 4, 8)


def test_an_override_changes_only_its_entry_and_the_leaves_follow_it():
    import dataclasses

    cfg = with_mesh(small_config("llama"), 1, 2, 4)
    overrides = (("embed", ()), ("mlp", ("fsdp", "tensor")))
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=overrides))
    table = Rules.from_config(cfg.mesh).table
    assert table == {**DEFAULT_RULES, "embed": (), "mlp": ("fsdp", "tensor")}
    mesh, _, _, state = build_state(cfg)
    for name, leaf in flat(state.params).items():
        want = NamedSharding(mesh, expected_spec(EXPECTED_AXES["llama"][name], overrides))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding.spec, want.spec)
    p = state.params
    assert p["blocks"]["mlp"]["up"]["kernel"].sharding.spec == P("stage", None, ("fsdp", "tensor"))
    assert p["blocks"]["attn"]["wq"]["kernel"].sharding.spec == P("stage", None, "tensor")  # defaults elsewhere
    assert p["embed"]["embedding"].sharding.spec == P("tensor")


def test_a_checkpoint_that_saved_the_full_legacy_table_still_opens(tmp_path):
    """Runs written before DEFAULT_RULES recorded every rule; they load with new names defaulted."""
    import dataclasses
    import json

    from slimjax.checkpoint import Checkpointer
    from slimjax.cli.rundir import base_checkpoint_config, open_run

    cfg = with_mesh(small_config("llama"), 1, 2, 4)
    _, _, _, state = build_state(cfg)
    saved = cfg.to_dict()
    saved["mesh"]["rules"] = [[n, a] for n, a in LEGACY_RULES]  # as JSON metadata holds it
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), base_checkpoint_config())
    ckpt.save_params(3, state.params, json.loads(json.dumps({"config": saved, "step": 3})))
    ckpt.wait()
    ckpt.close()
    rd = open_run(str(tmp_path))
    # The legacy table pinned "layers" to replicated (there was no stage axis); it keeps that.
    assert rd.rules.table == {**DEFAULT_RULES, "layers": ()} and rd.rules.table["lora_rank"] == ()
    assert dataclasses.replace(rd.cfg, mesh=cfg.mesh) == cfg
    restored = flat(rd.restore_params())
    for name, leaf in flat(state.params).items():
        assert restored[name].sharding.is_equivalent_to(leaf.sharding, leaf.ndim), name
        assert (jax.device_get(restored[name]) == jax.device_get(leaf)).all(), name


# configs/base.py's mesh.rules before the defaults moved into slimjax/sharding.py.
LEGACY_RULES = (
    ("batch", ("data", "fsdp")), ("length", None), ("act_embed", None), ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"), ("vocab", "tensor"),
    ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"),
    ("layers", None), ("norm", None), ("positions", None),
)


def test_the_full_legacy_table_is_the_defaults_but_for_layers():
    from slimjax import config as C
    from slimjax.configs import base

    c = base.get_config()
    c.mesh.rules = LEGACY_RULES  # every entry but "layers", which now defaults to the stage axis
    assert Rules.from_config(C.validate(c).mesh).table == {**DEFAULT_RULES, "layers": ()}
    assert Rules.from_config(C.validate(base.get_config()).mesh).table == DEFAULT_RULES


def test_adafactor_factored_moments_keep_the_remaining_axes():
    cfg = small_config("llama", d_model=256, d_ff=256)
    cfg = with_mesh(cfg, 1, 2, 4)
    import dataclasses
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, name="adafactor"))
    mesh, _, setup, state = build_state(cfg)
    up = state.params["blocks"]["mlp"]["up"]["kernel"]  # (layers, embed=256, mlp=256): factored
    found = 0
    for path, leaf in flat(state.opt_state).items():
        if path.endswith("mlp/up/kernel") and leaf.ndim == 2:
            dropped = [i for i in range(3) if up.shape[:i] + up.shape[i + 1:] == leaf.shape]
            spec = tuple(up.sharding.spec) + (None,) * (3 - len(up.sharding.spec))
            want = NamedSharding(mesh, P(*(spec[: dropped[0]] + spec[dropped[0] + 1:])))
            assert leaf.sharding.is_equivalent_to(want, 2), (path, leaf.sharding.spec)
            found += 1
    assert found == 2  # v_row and v_col


def test_fsdp_divides_parameter_and_optimizer_memory():
    # A realistic width: norm scales (replicated) are a negligible share, as in real models.
    cfg = with_mesh(small_config("llama", d_model=256, head_dim=32, d_ff=512), 1, 8, 1)
    _, _, _, state = build_state(cfg)
    leaves = jax.tree.leaves(state)
    total = sum(x.nbytes for x in leaves)
    device0 = jax.devices()[0]
    per_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device0)
    assert abs(per_device - total / 8) / (total / 8) < 0.02, (per_device, total / 8)


def test_layout_table_explains_every_parameter():
    from slimjax.sharding import Rules, device_bytes, explain

    cfg = with_mesh(small_config("llama"), 1, 2, 4)
    mesh, _, setup, state = build_state(cfg)
    table = explain(setup.axes, setup.abstract.params, Rules.from_config(cfg.mesh), mesh)
    row = table.where("parameter", "blocks/attn/wq/kernel")
    assert row["logical axes"] == ("layers", "embed", "heads", "head_dim")
    assert row["partition spec"] == str(P("stage", "fsdp", "tensor"))
    layers, embed, heads, head_dim = row["shape"]
    assert row["per-device shape"] == (layers, embed // 2, heads // 4, head_dim)
    assert row["per-device bytes"] == layers * embed // 2 * heads // 4 * head_dim * 4
    assert len(table) == len(jax.tree.leaves(setup.abstract.params))
    assert str(table).splitlines()[0].split() == ["parameter", "shape", "logical", "axes", "partition", "spec",
                                                  "per-device", "shape", "per-device", "bytes"]
    # The table's per-device bytes are what the real sharded parameters occupy on each device.
    placed = device_bytes(state.params)
    assert set(placed.values()) == {sum(table.column("per-device bytes"))}, placed


def test_build_mesh_takes_axis_sizes_and_devices():
    from slimjax.errors import SlimjaxError
    from slimjax.sharding import build_mesh

    mesh = build_mesh(fsdp=2, tensor=2, devices=jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices()[:8])
    assert dict(build_mesh(data=1, fsdp=-1, devices=jax.devices()[:4]).shape) == {"data": 1, "stage": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
    with pytest.raises(SlimjaxError, match="needs 12 devices but 8"):
        build_mesh(data=3, fsdp=4, devices=jax.devices()[:8])
