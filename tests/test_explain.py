"""slimjax explain: the layout table against the real sharded state, the activation estimate
against the compiler's memory analysis, collectives counted from HLO (loops included), warnings,
the verdict and the CLI."""

import dataclasses

import jax
import pytest
from helpers import small_config, with_mesh

from slimjax.cli import main
from slimjax.config import validate
from slimjax.errors import SlimjaxError
from slimjax.sharding import Rules, device_bytes, make_mesh
from slimjax.train import explain
from slimjax.train.run import fresh_state
import slimjax

HLO = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %all-reduce.1 = f32[4,8]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  %ag-start = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%y), dimensions={0}
  %ag-done = f32[8,8]{1,0} all-gather-done(%ag-start)
}

%add (x: f32[], y: f32[]) -> f32[] {
  %s = f32[] add(%x, %y)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %combined = (f32[16]{0}, /*index=1*/bf16[2,3]{1,0}) all-reduce(%a, %b), to_apply=%add
  %w = (s32[], f32[4,8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %cp = bf16[16]{0} collective-permute(%a), source_target_pairs={{0,1}}
}
"""


def test_collectives_count_loop_bodies_per_iteration_and_async_pairs_once():
    moved = explain.collective_bytes(HLO)
    # entry: one combined all-reduce (16 f32 + 6 bf16); loop x3: one all-reduce of 32 f32 and one gather of 64 f32.
    assert moved["all-reduce"] == {"ops": 1 + 3, "bytes": 16 * 4 + 6 * 2 + 3 * 32 * 4}
    assert moved["all-gather"] == {"ops": 3, "bytes": 3 * 64 * 4}
    assert moved["collective-permute"] == {"ops": 1, "bytes": 16 * 2}
    assert moved["reduce-scatter"] == moved["all-to-all"] == {"ops": 0, "bytes": 0}


def test_layout_matches_the_real_sharded_state_leaf_for_leaf():
    cfg = with_mesh(small_config("llama"), 2, 2, 2)
    plan = explain.layout(cfg)
    mesh = make_mesh(cfg.mesh)
    _, setup, state = fresh_state(cfg, mesh)
    device0 = jax.devices()[0]
    real = {"parameters": device_bytes(state.params)[device0] + device_bytes(state.frozen).get(device0, 0),
            "optimizer state": device_bytes(state.opt_state)[device0],
            "gradients (trainable)": device_bytes(state.params)[device0]}
    memory = {r["kind"]: r["bytes"] for r in plan.memory.records()}
    for kind, value in real.items():
        assert memory[kind] == value, kind
    row = plan.params.where("parameter", "blocks/mlp/up/kernel")
    assert row["rules"] == "embed->fsdp(2) mlp->tensor(2)"
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert plan.mesh == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 2} and plan.fits is None  # CPU: memory unknown


@pytest.mark.parametrize("remat,stage", [("none", 1), ("full", 1), ("none", 2)])
def test_estimated_total_is_within_2x_of_the_compilers_peak(remat, stage):
    cfg = with_mesh(small_config("llama", remat=remat, n_layers=4), 8 // stage, 1, 1)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, stage=stage, pipeline_microbatches=4 * (stage > 1)))
    estimate = {r["kind"]: r["bytes"] for r in explain.layout(cfg).memory.records()}["total"]
    memory, _, _ = explain.compiled(cfg)
    peak = {r["kind"]: r["bytes"] for r in memory.records()}["peak"]
    assert 0.5 < peak / estimate < 2.0, (peak, estimate)


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_compiled_collectives_are_within_10_percent_of_the_theory(layout):
    cfg = with_mesh(small_config("llama"), *((8, 1, 1) if layout == "data" else (1, 8, 1)))
    _, collectives, expected = explain.compiled(cfg)
    moved = {r["collective"]: r for r in collectives.records()}
    setup = explain.abstract_setup(cfg, Rules.from_config(cfg.mesh), make_mesh(cfg.mesh))
    grads = explain.per_device_bytes(setup.abstract.params)
    if layout == "data":  # the gradients all-reduced once, nothing else moves
        assert list(expected) == ["all-reduce (data)"] and expected["all-reduce (data)"][0] == grads
        kinds = ["all-reduce"]
    else:  # every weight gathered forward, the scanned layers again backward; gradients reduced
        assert list(expected) == ["all-gather (fsdp)", "all-reduce (fsdp)"]
        kinds = ["all-gather", "all-reduce"]
    for kind in kinds:
        assert 0.9 <= moved[kind]["compiled / theory"] <= 1.1, moved[kind]
    # Nothing else of any size: FSDP's embedding lookup moves token ids and the activation gradient.
    total = sum(nbytes for nbytes, _ in expected.values())
    assert all(moved[k]["bytes per device"] < 0.01 * total for k in moved if k not in kinds)


def test_remat_lowers_the_estimate():
    sizes = {}
    for remat in ("none", "dots", "full"):  # at 4+ layers: with fewer, full remat's one recomputed block dominates
        cfg = with_mesh(small_config("llama", remat=remat, n_layers=6), 8, 1, 1)
        sizes[remat] = {r["kind"]: r["bytes"] for r in explain.layout(cfg).memory.records()}["activations (estimate)"]
    assert sizes["none"] > sizes["dots"] > sizes["full"]


def test_warnings_name_idle_rules_replicated_parameters_and_idle_axes():
    raw = slimjax.configs.tiny.get_config()
    raw.mesh.update(data=2, fsdp=1, tensor=4)
    raw.mesh.rules = (("positions", ("fsdp",)), ("heads", None), ("kv_heads", None), ("mlp", None), ("vocab", None))
    plan = explain.layout(validate(raw), replicated_warn_bytes=100_000)
    text = "\n".join(plan.warnings)
    assert "mesh.rules entry 'positions'" in text and "matches no parameter" in text  # a RoPE model
    assert "parameter 'blocks/mlp/up/kernel'" in text and "replicated on all 8 devices" in text
    assert "mesh axis 'tensor' (size 4) splits no parameter" in text
    assert "final_norm" not in text  # small: under the threshold


def test_cli_verdict_exit_status_and_bad_size(capsys):
    argv = ["explain", "--config.mesh.fsdp=2"]
    assert main(argv + ["--device_memory=1GiB"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "blocks/attn/wq/kernel" in out and "attention scores" in out
    assert main(argv + ["--device_memory=1MB"]) == 1
    assert "verdict: does NOT fit" in capsys.readouterr().out
    assert main(argv + ["--device_memory=lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slimjax: error: --device_memory='lots' is not a size; write e.g. 16GiB, 80GB or 17179869184"]


def test_cli_compiled_prints_the_compilers_figures(capsys):
    assert main(["explain", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.global_batch_size=8",
                 "--config.data.seq_len=32", "--compiled"]) == 0
    out = capsys.readouterr().out
    assert "compiled train step: memory per device" in out and "temporaries" in out
    assert "all-gather (fsdp)" in out and "all-reduce (tensor)" in out
    gathered = next(line for line in out.splitlines() if line.startswith("all-gather "))
    assert int(gathered.split()[1]) > 0  # FSDP gathers parameters


def test_targets_parse_slice_names_and_reject_bad_ones():
    assert explain.Target.parse("v5p-64") == explain.Target(32, "tpu", 95 * 2**30)  # 64 TensorCores
    assert explain.Target.parse("v5e-16").devices == 16 and explain.Target.parse("H100-8").platform == "gpu"
    assert explain.Target.parse("cpu-8") == explain.Target(8, "cpu", None)
    for bad in ("v5p", "v9-8", "h100-0", "v5p-7"):
        with pytest.raises(SlimjaxError, match="--target"):
            explain.Target.parse(bad)


@pytest.mark.parametrize("name,target", [("llama_7b_fsdp_tensor", "v5p-64"), ("llama_70b_pipeline", "v5p-512"),
                                         ("llama_1b_long_context", "v5p-64")])
def test_layout_configs_fit_their_slice_with_every_axis_used(name, target):
    """The shipped layouts, planned on an abstract mesh of their slice (shapes only)."""
    cfg = validate(getattr(slimjax.configs, name).get_config())
    plan = explain.layout(cfg, target=explain.Target.parse(target))
    assert plan.fits, str(plan.memory)
    assert not plan.warnings, plan.warnings
    used = {a for spec in plan.params.column("partition spec") + plan.activations.column("partition spec")
            for a in ("data", "stage", "fsdp", "sequence", "tensor") if f"'{a}'" in spec}
    assert {a for a, s in plan.mesh.items() if s > 1} <= used


def test_pipeline_permutes_match_the_theory_exactly():
    """GPipe over 4 stages: every iteration passes one microbatch's hidden state on, forward and back."""
    cfg = with_mesh(small_config("llama", n_layers=4), 2, 1, 1)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, stage=4, pipeline_microbatches=4))
    step = explain.compile_step(cfg)
    _, collectives, expected = explain.compiled(cfg, step=step)
    moved = {r["collective"]: r["bytes per device"] for r in collectives.records()}
    rows, length, width = 16 // 2 // 4, 32, 64  # per data shard and microbatch
    assert expected["collective-permute (stage)"][0] == 2 * (4 + 4 - 1 + 1) * rows * length * width * 4
    assert moved["collective-permute"] == expected["collective-permute (stage)"][0]
    assert explain.permute_loop_trips(step[0].as_text()) == [4 + 4 - 1] * 2  # forward and backward loops


def test_cli_target_errors_are_one_line(capsys):
    assert main(["explain", "--target=v5p-64", "--compiled"]) == 2
    assert "--compiled needs the devices themselves" in capsys.readouterr().err
    assert main(["explain", "--target=tpu-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target='tpu-8' is not a known slice" in err[0]
