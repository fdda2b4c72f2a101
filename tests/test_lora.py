"""LoRA end to end: exact first forward, frozen base and adapter-only optimizer state, merge/unmerge,
sharding of adapters, layer-selective targets on scanned layers, dropout, kill -9 and resume, the
model spec in checkpoints, fine-tuning with checkpoint.init_from, bad input through the CLI, and
eval/generate/export (HF and PEFT adapters) of a LoRA run."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from helpers import (build as build_run_parts, build_state, flat, small_config, snapshot, synthetic_batch, with_lora,
                     with_mesh)
from slimjax.data import pipeline
from slimjax.infer.scoring import forward
from slimjax.sharding import Rules, path_str
from slimjax.slim.lora import is_adapter, unmerge_adapters
from slimjax.slim.spec import ModelSpec, build, export_fn, export_spec, init_fn, spec_from_config
from slimjax.train.state import make_setup, params_of
from slimjax.train.step import tree_bytes
from test_sharding import expected_spec


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def with_random_b(params, key, scale=0.05, only=lambda path: True):
    """``params`` with every selected adapter ``b`` (zero at init) set to N(0, scale^2)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(key, len(leaves)))

    def fill(path, x):
        name = path_str(path)
        k = next(keys)
        if is_adapter(name) and name.endswith("/b") and only(name):
            return scale * jax.random.normal(k, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, params)


# ---------------------------------------------------------------------------------------------------
# In-process: the model, the train step and the sharded state.


def test_first_forward_with_zero_b_equals_the_base_model_bit_for_bit():
    """Same seed: the LoRA model's base weights are the plain model's, B starts at 0, logits are bit-equal."""
    cfg = small_config()
    plain, adapted = build(spec_from_config(cfg)), build(spec_from_config(with_lora(cfg)))
    key = jax.random.key(7)
    p0, p1 = init_fn(plain)(key), init_fn(adapted)(key)
    adapters, base = adapted.split(p1)
    assert flat(adapters) and all(is_adapter(p) for p in flat(adapters))
    assert flat(base).keys() == flat(p0).keys()
    for name, leaf in flat(p0).items():
        np.testing.assert_array_equal(flat(base)[name], leaf, err_msg=name)
    for name, leaf in flat(adapters).items():
        assert (np.asarray(leaf) == 0).all() == name.endswith("/b"), name  # B zero, A random
    batch = synthetic_batch(cfg)
    np.testing.assert_array_equal(np.asarray(forward(adapted.graphdef, p1, batch)),
                                  np.asarray(forward(plain.graphdef, p0, batch)))


def test_training_changes_only_adapters_and_the_optimizer_holds_only_adapter_moments():
    """A few LoRA steps: frozen base bit-identical, adapters moved, AdamW moments exactly the adapters',
    and the optimizer state a small fraction of full fine-tuning's."""
    cfg = with_mesh(with_lora(small_config()), 2, 2, 2)
    mesh, setup, state, train_step, _, sharding = build_run_parts(cfg)
    adapter_shapes = {n: tuple(x.shape) for n, x in flat(setup.built.shapes).items() if is_adapter(n)}
    assert adapter_shapes and {n: tuple(x.shape) for n, x in flat(state.params).items()} == adapter_shapes
    frozen0, adapters0 = host(state.frozen), host(state.params)
    assert not any(is_adapter(n) for n in flat(frozen0))
    for i in range(3):
        state, metrics = train_step(state, pipeline.to_global(synthetic_batch(cfg, i), sharding))
        assert np.isfinite(float(metrics["loss"]))
    frozen1, adapters1 = host(state.frozen), host(state.params)
    assert flat(frozen1).keys() == flat(frozen0).keys()
    for name, leaf in flat(frozen0).items():
        np.testing.assert_array_equal(flat(frozen1)[name], leaf, err_msg=name)
    for name, leaf in flat(adapters0).items():
        assert not np.array_equal(flat(adapters1)[name], leaf), f"adapter {name} did not change"
    # Every non-scalar optimizer leaf is a moment of one adapter, with its shape: mu and nu of each.
    seen = {}
    for path, leaf in flat(state.opt_state).items():
        if leaf.ndim == 0:
            continue
        parts = path.split("/")
        cut = max(i for i, p in enumerate(parts) if p in ("mu", "nu")) + 1
        pname = "/".join(parts[cut:])
        assert pname in adapter_shapes and tuple(leaf.shape) == adapter_shapes[pname], path
        seen[pname] = seen.get(pname, 0) + 1
    assert seen == {n: 2 for n in adapter_shapes}
    rules = Rules.from_config(cfg.mesh)
    full = make_setup(ModelSpec("decoder", cfg.model), jnp.float32, setup.tx, rules, mesh)
    lora_bytes, full_bytes = tree_bytes(setup.abstract.opt_state), tree_bytes(full.abstract.opt_state)
    assert 0 < lora_bytes <= 0.1 * full_bytes, (lora_bytes, full_bytes)


def test_merged_export_equals_the_adapter_model_and_unmerge_restores_the_kernels():
    """export_fn folds nonzero adapters into the plain decoder's kernels with the same logits;
    unmerge_adapters subtracts them again."""
    cfg = small_config()
    spec = spec_from_config(with_lora(cfg))
    built = build(spec)
    params = with_random_b(init_fn(built)(jax.random.key(1)), jax.random.key(2))
    batch = synthetic_batch(cfg)
    adapted = np.asarray(forward(built.graphdef, params, batch))
    _, base = built.split(params)
    assert rel_err(np.asarray(forward(build(spec_from_config(cfg)).graphdef, base, batch)), adapted) > 1e-3

    out_spec = export_spec(spec)
    assert out_spec.recipe == () and out_spec.model == spec.model
    plain = build(out_spec)
    merged = export_fn(built)(params)
    assert jax.tree.structure(merged) == jax.tree.structure(plain.shapes)
    assert rel_err(np.asarray(forward(plain.graphdef, merged, batch)), adapted) <= 1e-5

    model = nnx.merge(plain.graphdef, merged)
    unmerge_adapters(model, nnx.merge(built.graphdef, params))
    back = params_of(model)
    assert flat(back).keys() == flat(params).keys()
    changed = 0
    for name, leaf in flat(params).items():
        np.testing.assert_allclose(flat(back)[name], leaf, rtol=0, atol=1e-6, err_msg=name)
        if name.endswith("/kernel") and not np.array_equal(flat(merged)[name], leaf):
            changed += 1
    assert changed == len([n for n in flat(params) if n.endswith("/tap/a")])  # every adapted kernel was merged


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_adapter_merges_exactly_and_reaches_the_tied_output_layer(tied):
    """``^embed$`` puts an adapter on the table (a [vocab, r], b [r, embed], sharded like the table):
    zero B leaves the logits bit-equal; nonzero B changes lookups (and, when tied, the output layer)
    and merging it into the table gives the same logits."""
    cfg = small_config(tie_embeddings=tied)
    lcfg = with_lora(cfg, targets=("attn/wq$", "^embed$"))
    spec = spec_from_config(lcfg)
    built, plain = build(spec), build(spec_from_config(cfg))
    assert built.axes["embed"]["tap"] == {"a": ("vocab", "lora_rank"), "b": ("lora_rank", "embed")}
    key = jax.random.key(3)
    params, base = init_fn(built)(key), init_fn(plain)(key)
    batch = synthetic_batch(cfg)
    want = np.asarray(forward(plain.graphdef, base, batch))
    np.testing.assert_array_equal(np.asarray(forward(built.graphdef, params, batch)), want)
    params = with_random_b(params, jax.random.key(4), only=lambda n: n.startswith("embed/"))
    adapted = np.asarray(forward(built.graphdef, params, batch))
    assert rel_err(adapted, want) > 1e-3
    merged = export_fn(built)(params)
    assert rel_err(np.asarray(forward(build(export_spec(spec)).graphdef, merged, batch)), adapted) <= 1e-5
    delta = np.asarray(merged["embed"]["embedding"]) - np.asarray(base["embed"]["embedding"])
    a, b = (np.asarray(params["embed"]["tap"][k]) for k in "ab")
    np.testing.assert_allclose(delta, (lcfg.slim.lora.alpha / lcfg.slim.lora.rank) * a @ b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
@pytest.mark.parametrize("rank_rule", [None, "data"])
def test_adapters_are_sharded_like_their_kernel_with_the_rank_by_its_rule(shape, rank_rule):
    """Each adapter leaf (and its moments) follows the rules; A's input dims carry the kernel's
    input specs, B's output dims the kernel's output specs, the rank replicated or per mesh.rules."""
    cfg = with_mesh(with_lora(small_config()), *shape)
    if rank_rule:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=(("lora_rank", (rank_rule,)),)))
    mesh, _, setup, state = build_state(cfg)
    axes = {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        setup.axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    kernels = {**flat(state.frozen)}
    adapters = flat(state.params)
    assert adapters
    for name, leaf in adapters.items():
        want = NamedSharding(mesh, expected_spec(axes[name], cfg.mesh.rules))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding.spec, want.spec)
        dense, which = name.rsplit("/tap/", 1)
        kernel = kernels[f"{dense}/kernel"]
        kspec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
        spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        lead = 1  # the stacked-layer dim (scanned layers)
        if which == "a":  # [layers, *in, r]
            assert spec[:-1] == kspec[:leaf.ndim - 1], (name, spec, kspec)
            rank = spec[-1]
        else:  # [layers, r, *out]
            n_out = leaf.ndim - lead - 1
            assert spec[:lead] == kspec[:lead] and spec[lead + 1:] == kspec[kernel.ndim - n_out:], (name, spec, kspec)
            rank = spec[lead]
        assert rank == rank_rule, (name, spec)
    for path, leaf in flat(state.opt_state).items():
        if leaf.ndim:
            pname = path[path.index("blocks/"):]
            assert leaf.sharding.is_equivalent_to(adapters[pname].sharding, leaf.ndim), path


def test_layer_selective_targets_on_scanned_layers_match_the_unrolled_model():
    """``blocks/(0|1)/attn/wq$`` on 4 scanned layers = the unrolled model with adapters on layers 0, 1;
    the stacked adapters of layers 2, 3 have no effect, those of layer 0 do."""
    targets = ("blocks/(0|1)/attn/wq$",)
    cfg = with_lora(small_config(n_layers=4), targets=targets)
    unrolled_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    scanned, unrolled = build(spec_from_config(cfg)), build(spec_from_config(unrolled_cfg))
    params = with_random_b(init_fn(scanned)(jax.random.key(4)), jax.random.key(5), scale=0.2)
    assert [n for n in flat(params) if is_adapter(n)] == ["blocks/attn/wq/tap/a", "blocks/attn/wq/tap/b"]
    assert sorted(n for n in flat(unrolled.shapes) if is_adapter(n)) == [
        f"blocks/{i}/attn/wq/tap/{m}" for i in (0, 1) for m in ("a", "b")]
    stacked = flat(params)

    def per_layer(path, _):
        parts = path_str(path).split("/")
        return stacked["/".join([parts[0], *parts[2:]])][int(parts[1])] if parts[0] == "blocks" else \
            stacked[path_str(path)]

    copied = jax.tree_util.tree_map_with_path(per_layer, unrolled.shapes)
    batch = synthetic_batch(cfg)
    logits = np.asarray(forward(scanned.graphdef, params, batch))
    assert rel_err(np.asarray(forward(unrolled.graphdef, copied, batch)), logits) <= 1e-5

    def perturb(layers):
        def f(path, x):
            if path_str(path) == "blocks/attn/wq/tap/b":
                return x.at[np.array(layers)].add(1.0)
            return x
        return jax.tree_util.tree_map_with_path(f, params)

    np.testing.assert_array_equal(np.asarray(forward(scanned.graphdef, perturb([2, 3]), batch)), logits)
    assert rel_err(np.asarray(forward(scanned.graphdef, perturb([0]), batch)), logits) > 1e-3


def test_dropout_is_deterministic_active_in_training_and_off_in_eval():
    """dropout=0.5: three steps from one state repeat bit for bit; the third step's loss differs from
    dropout=0 (B is nonzero once the warm-up's zero first learning rate has passed); eval of the same
    state is identical under either rate."""
    base = with_mesh(small_config(), 2, 2, 2)
    batches = [synthetic_batch(base, i) for i in range(3)]

    def two_steps(rate):
        _, _, state, train_step, eval_step, sharding = build_run_parts(with_lora(base, dropout=rate))
        start = host(state)
        runs = []
        for _ in range(2):
            s = jax.device_put(start, jax.tree.map(lambda x: x.sharding, state))
            losses = []
            for b in batches:
                s, m = train_step(s, pipeline.to_global(b, sharding))
                losses.append(float(m["loss"]))
            runs.append((losses, host(s.params)))
        return runs, start, eval_step, sharding, state

    runs, start, eval_half, sharding, like = two_steps(0.5)
    (l1, p1), (l2, p2) = runs
    assert l1 == l2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    runs0, start0, eval_zero, _, _ = two_steps(0.0)
    jax.tree.map(np.testing.assert_array_equal, start, start0)  # same initial state either way
    assert l1[0] == runs0[0][0][0]  # B = 0 at the first step: the adapter path contributes nothing
    assert l1[2] != runs0[0][0][2]
    trained = jax.device_put(dataclasses.replace(
        host(like), params=p1), jax.tree.map(lambda x: x.sharding, like))
    batch = pipeline.to_global(batches[0], sharding)
    e_half, e_zero = host(eval_half(trained, batch)), host(eval_zero(trained, batch))
    assert jax.tree.map(np.array_equal, e_half, e_zero) == jax.tree.map(lambda _: True, e_half)


# ---------------------------------------------------------------------------------------------------
# Real runs: the CLI (through tests/train_driver.py, as tests/test_fault.py does) on Shakespeare.

from test_fault import DRIVER, FLAGS, fingerprints, one_line_error, steps_on_disk, wait_for  # noqa: E402

LORA_FLAGS = ["--config.slim.recipe=('lora',)", "--config.slim.lora.rank=4"]
STEPS, EVERY = 40, 4


def train_argv(workdir, *extra, steps=STEPS, every=EVERY, lora=True):
    return [sys.executable, DRIVER, "train", *FLAGS, *(LORA_FLAGS if lora else []), f"--config.train.steps={steps}",
            f"--config.checkpoint.every_steps={every}", "--config.train.sample_tokens=0", f"--workdir={workdir}",
            *extra]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def cli(*args):
    """The CLI in a subprocess, as a user runs it."""
    return run([sys.executable, "-m", "slimjax.cli", *args])


def cli_here(capsys, *args):
    """The CLI's entry point in this process (no interpreter and JAX start-up): a CompletedProcess."""
    from slimjax.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def meta(workdir, step):
    return json.load(open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")))


def config_dict(flags):
    """The ConfigDict the CLI builds from ``--config.KEY=VALUE`` flags (Python literals, else strings)."""
    import ast

    from slimjax.configs import base

    c = base.get_config()
    for flag in flags:
        key, value = flag[len("--config."):].split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def restore_model(workdir):
    """(built, full host params, config) of a run's latest checkpoint, through the spec it records."""
    from slimjax.checkpoint import Checkpointer
    from slimjax.config import from_saved
    from slimjax.sharding import make_mesh
    from slimjax.train import optimizer as optim
    from slimjax.train.run import spec_of
    from slimjax.train.state import TrainState

    step = max(steps_on_disk(workdir))
    m = meta(workdir, step)
    cfg = from_saved(m["config"])
    mesh = make_mesh(cfg.mesh)
    setup = make_setup(spec_of(m), jnp.float32, optim.make_optimizer(cfg.optimizer, cfg.train.steps),
                       Rules.from_config(cfg.mesh), mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint, read_only=True)
    try:
        restored, _, _ = ckpt.restore(step, setup.abstract.as_dict())
    finally:
        ckpt.close()
    return setup.built, host(TrainState(**restored).model_params()), cfg


def model_logits(built, params, tokens):
    return np.asarray(nnx.merge(built.graphdef, params)(tokens))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """An uninterrupted 40-step LoRA run (rank 4) with checkpoints every 4 steps."""
    workdir = str(tmp_path_factory.mktemp("lora"))
    result = run(train_argv(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_kill9_then_resume_of_a_lora_run_is_bit_identical(lora_run, tmp_path):
    """kill -9 mid-run, resume: every item (adapters, frozen base, optimizer, RNG) ends bit-equal."""
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(train_argv(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: any(s >= 8 for s in steps_on_disk(workdir)), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(steps_on_disk(workdir))
    assert killed_at < STEPS
    result = run(train_argv(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["start_step"] == killed_at and summary["final_step"] == STEPS
    got, want = fingerprints(workdir, STEPS), fingerprints(lora_run, STEPS)
    assert {"params", "frozen", "opt_state"} <= set(want) and got == want


def test_the_checkpoint_records_the_spec_and_a_different_recipe_is_refused(lora_run, tmp_path, capsys):
    """meta holds the LoRA recipe; resuming with no LoRA or another rank raises one SlimjaxError line
    naming slim.recipe (in process), and through the CLI prints one line, exits 2, changes nothing."""
    import slimjax
    from slimjax.errors import SlimjaxError

    spec = meta(lora_run, STEPS)["spec"]
    assert [name for name, _ in spec["recipe"]] == ["lora"] and spec["recipe"][0][1]["rank"] == 4
    workdir = str(tmp_path / "resume")
    shutil.copytree(lora_run, workdir)
    before = snapshot(workdir)
    common = [*FLAGS, f"--config.train.steps={STEPS + 4}", "--config.train.sample_tokens=0"]
    for recipe in ([], [*LORA_FLAGS, "--config.slim.lora.rank=8"]):
        with pytest.raises(SlimjaxError) as e:
            slimjax.train(config_dict([*common, *recipe]), workdir)
        assert "slim.recipe" in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert snapshot(workdir) == before
    for recipe in ([], [*LORA_FLAGS, "--config.slim.lora.rank=8"]):
        line = one_line_error(cli_here(capsys, "train", *common, *recipe, f"--workdir={workdir}"))
        assert "slim.recipe" in line, line
        assert snapshot(workdir) == before


def test_init_from_a_plain_run_starts_from_its_params_and_its_eval_loss(tmp_path):
    """A LoRA run with checkpoint.init_from=<plain run>: the frozen base is the plain run's params bit
    for bit at step 0, and its first eval loss is the plain run's final eval loss."""
    from slimjax.checkpoint import fingerprints as fingerprints_of
    from slimjax.config import validate
    from slimjax.train.loop import evaluate_loss
    from slimjax.train.run import build_run

    plain = str(tmp_path / "plain")
    result = run(train_argv(plain, steps=6, every=6, lora=False))
    assert result.returncode == 0, result.stderr[-3000:]
    plain_loss = json.load(open(os.path.join(plain, "summary.json")))["final_eval_loss"]
    assert plain_loss is not None
    cfg = validate(config_dict([*FLAGS, *LORA_FLAGS, "--config.train.steps=4", f"--config.checkpoint.init_from={plain}"]))
    r = build_run(cfg, str(tmp_path / "lora"))
    try:
        assert r.start_step == 0 and int(r.state.step) == 0
        frozen, want = fingerprints_of(r.state.frozen), fingerprints(plain, 6)["params"]
        assert frozen and set(frozen) == set(want) - {k for k in want if is_adapter(k)}
        assert all(frozen[k] == want[k] for k in frozen)
        assert set(flat(r.state.params)) and all(is_adapter(k) for k in flat(r.state.params))
        assert evaluate_loss(r) == plain_loss
    finally:
        r.checkpointer.close()


BAD = [
    ("--config.slim.lora.targets=('attn/wz$',)", "attn/wz"),
    ("--config.slim.lora.rank=0", "slim.lora.rank"),
    ("--config.slim.lora.rank=1000", "slim.lora.rank=1000"),
    ("--config.objective.next_token=-1", "objective.next_token"),
    ("--config.objective.kd=1.0", "objective.kd"),
    ("--config.slim.recipe=('lora','sparsify')", "sparsify"),
]


@pytest.mark.parametrize("flag,named", BAD, ids=[b[1] for b in BAD])
def test_bad_lora_and_objective_input_is_one_line_exit_2_and_writes_nothing(flag, named, tmp_path, capsys):
    """Each bad value: one line on stderr naming it, exit 2, nothing written in the fresh workdir."""
    workdir = str(tmp_path / "fresh")
    line = one_line_error(cli_here(capsys, "train", *FLAGS, *LORA_FLAGS, flag, f"--workdir={workdir}"))
    assert named in line, line
    assert not os.path.exists(workdir) or snapshot(workdir) == {}


# ---------------------------------------------------------------------------------------------------
# eval / generate / export of a LoRA run (depends on the CLI reading the model spec).

TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 24))


def test_eval_generate_and_export_of_a_lora_run_need_no_extra_flags(lora_run, tmp_path, capsys):
    """eval, generate and export read the run's spec; the exported HF Llama gives the LoRA model's logits."""
    from transformers import LlamaForCausalLM

    from hf_models import hf_logits

    for args in (["eval", f"--workdir={lora_run}"], ["generate", f"--workdir={lora_run}", "--prompt=ROMEO:"]):
        result = cli_here(capsys, *args)
        assert result.returncode == 0, (args, result.stderr[-3000:])
    out = str(tmp_path / "hf")
    result = cli_here(capsys, "export", f"--workdir={lora_run}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    built, params, _ = restore_model(lora_run)
    want = model_logits(built, params, TOKENS)
    _, base = built.split(params)
    assert rel_err(model_logits(build(export_spec(built.spec)), base, TOKENS), want) > 1e-4  # adapters matter
    got = hf_logits(LlamaForCausalLM.from_pretrained(out).eval(), TOKENS)
    assert rel_err(got, want) <= 1e-4


@pytest.fixture(scope="module")
def hf_lora_run(tmp_path_factory):
    """(HF base dir, LoRA run): a tiny HF Llama imported, then LoRA-fine-tuned with init_from."""
    import hf_models

    root = tmp_path_factory.mktemp("hf_lora")
    hf_dir = hf_models.save("llama_gqa", str(root / "hf"))
    imported, workdir = str(root / "imported"), str(root / "lora")
    result = cli("import", f"--hf_dir={hf_dir}", f"--workdir={imported}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli("train", f"--config={imported}/config.py", f"--config.checkpoint.init_from={imported}", *LORA_FLAGS,
                 "--config.train.steps=4", "--config.checkpoint.every_steps=4", "--config.optimizer.warmup_steps=1",
                 "--config.train.global_batch_size=8", "--config.data.seq_len=32", "--config.train.eval_batches=1",
                 "--config.train.sample_tokens=0", "--config.train.progress=False", "--config.mesh.data=2",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return hf_dir, workdir


def test_exported_adapters_load_in_peft_on_the_hf_base_with_the_same_logits(hf_lora_run, tmp_path, capsys):
    """export --adapters writes a PEFT adapter that PeftModel puts on the HF base with the LoRA model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_models import hf_logits

    hf_dir, workdir = hf_lora_run
    out = str(tmp_path / "adapters")
    result = cli_here(capsys, "export", "--adapters", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out))
    built, params, _ = restore_model(workdir)
    want = model_logits(built, params, TOKENS)
    base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert rel_err(hf_logits(base, TOKENS), want) > 1e-4  # the trained adapters change the logits
    got = hf_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), out).eval(), TOKENS)
    assert rel_err(got, want) <= 1e-4
