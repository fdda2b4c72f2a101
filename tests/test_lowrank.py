"""Low-rank factorisation: the full-rank SVD reproduces every layer and the logits; truncated and
whitened factors equal a float64 NumPy reference; energy and budget ranks match independent
recomputations (the budget met as closely as integer ranks allow, counted on the rebuilt spec);
whitened SVD has the lower output error on the calibration inputs; a factored run trains through
``slimjax.train`` from ``checkpoint.init_from`` and restores bit-exactly; factors are sharded like
their kernels on a (2, 2, 2) mesh; export multiplies them back; bad input is a one-line error."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from helpers import build_state, flat, random_model, small_config, synthetic_batch, with_mesh
from slimjax.errors import SlimjaxError
from slimjax.infer.scoring import forward
from slimjax.sharding import Rules, make_mesh, path_str
from slimjax.slim import lowrank as L
from slimjax.slim.calibrate import collect_stats
from slimjax.slim.factorize import FactorizeOptions, count_params, factorize, matrices_of, write_factors
from slimjax.slim.spec import build, export_fn, export_spec, rewrite_fn, spec_from_config
from test_sharding import expected_spec

F64 = np.float64


def with_lowrank(cfg, rank=0, ranks=(), **lowrank):
    """``cfg`` with ``slim.recipe=("lowrank",)`` and these ``slim.lowrank`` options."""
    section = dataclasses.replace(cfg.slim.lowrank, rank=rank, ranks=tuple(ranks), **lowrank)
    return dataclasses.replace(cfg, slim=dataclasses.replace(cfg.slim, recipe=("lowrank",), lowrank=section))


def env(cfg):
    return make_mesh(cfg.mesh), Rules.from_config(cfg.mesh)


def matrix(params, lm):
    """One layer's ``[d_in, d_out]`` kernel (float64) from a host parameter tree."""
    w = np.asarray(flat(params)[lm.target.path], F64)
    return (w if lm.index is None else w[lm.index]).reshape(lm.target.matrix)


def factored(params, lm):
    """One layer's ``u @ v`` (float64) from a factored host parameter tree."""
    p = flat(params)
    module = lm.target.path.rsplit("/", 1)[0]
    u, v = (np.asarray(p[f"{module}/tap/{k}"], F64) for k in ("u", "v"))
    if lm.index is not None:
        u, v = u[lm.index], v[lm.index]
    return u.reshape(lm.target.matrix[0], -1) @ v.reshape(-1, lm.target.matrix[1])


def svd_reference(w, r):
    big, s, vt = np.linalg.svd(w, full_matrices=False)
    return (big[:, :r] * s[:r]) @ vt[:r]


def whitened_reference(w, gram, r, damp):
    """SVD-LLM in float64: truncate L^T W (L L^T the damped gram), map back with L^-T."""
    g = gram + damp * np.mean(np.diag(gram)) * np.eye(len(gram))
    chol = np.linalg.cholesky(g)
    return np.linalg.solve(chol.T, svd_reference(chol.T @ w, r))


def output_error(w, w_r, gram):
    d = w - w_r
    return float(np.sum(d * (gram @ d)))


def energy_rank(w, energy):
    sq = np.linalg.svd(w, compute_uv=False) ** 2
    return next(r for r in range(1, len(sq) + 1) if sq[:r].sum() >= energy * sq.sum())


def saves(r, d_in, d_out):
    return r < min(d_in, d_out) and r * (d_in + d_out) < d_in * d_out


@pytest.mark.parametrize("scan", [True, False])
def test_full_rank_svd_reproduces_every_layer_and_the_logits(scan):
    cfg = small_config(scan_layers=scan)
    graphdef, params = random_model(cfg)
    spec = spec_from_config(cfg)
    matrices = matrices_of(spec, ("^blocks/",))
    full = spec_from_config(with_lowrank(cfg, ranks=[f"{lm.name}={min(lm.target.matrix)}" for lm in matrices]))
    source, target = build(spec), build(full)
    shaped = jax.jit(rewrite_fn(source, target))(params, jax.random.key(0))
    paths = flat(shaped)
    for lm in matrices:  # the SVD of each layer at its full rank, written into the factored tree
        write_factors(lm, paths, *L.svd_factors(np.float32(matrix(params, lm)), min(lm.target.matrix)))
    new = jax.tree.unflatten(jax.tree.structure(shaped), [paths[p] for p in flat(shaped)])
    assert not any(p.startswith("blocks/") and p.endswith("/kernel") for p in paths)  # dense kernels removed
    assert all(L.is_factor(p) for p in paths if "/tap/" in p)
    x = np.random.default_rng(0).normal(size=(32, 128))
    for lm in matrices:
        w = matrix(params, lm)
        y, y_r = x[:, :w.shape[0]] @ w, x[:, :w.shape[0]] @ factored(new, lm)
        assert np.abs(y - y_r).max() <= 1e-5 * np.abs(y).max(), lm.name
    batch = synthetic_batch(cfg)
    dense = np.asarray(forward(graphdef, params, batch))
    low = np.asarray(forward(target.graphdef, new, batch))
    # float32 rounding of two products instead of one, carried through both blocks' norms and residuals
    assert np.abs(dense - low).max() <= 1e-4 * np.abs(dense).max()


def test_truncated_and_whitened_factors_equal_a_float64_reference():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 40)) * np.linspace(2.0, 0.1, 40)  # a decaying spectrum
    x = rng.normal(size=(300, 48)) * np.linspace(3.0, 0.2, 48)  # anisotropic inputs
    gram, r, damp = x.T @ x, 12, 0.01
    u, v = L.svd_factors(np.float32(w), r)
    assert u.shape == (48, r) and v.shape == (r, 40)
    want = svd_reference(w, r)
    np.testing.assert_allclose(np.asarray(u, F64) @ np.asarray(v, F64), want, atol=1e-5 * np.abs(w).max())
    u, v = L.whitened_factors(np.float32(w), L.whitening(np.float32(gram), damp), r)
    white = whitened_reference(w, gram, r, damp)
    np.testing.assert_allclose(np.asarray(u, F64) @ np.asarray(v, F64), white, atol=1e-4 * np.abs(w).max())
    assert output_error(w, white, gram) < output_error(w, want, gram)
    np.testing.assert_allclose(np.asarray(L.spectrum(np.float32(w))), np.linalg.svd(w, compute_uv=False), rtol=1e-5)


@pytest.mark.parametrize("energy", [0.5, 0.95])
def test_energy_ranks_match_a_float64_numpy_reference(energy):
    cfg = small_config()
    _, params = random_model(cfg)
    spec = spec_from_config(cfg)
    new_spec, new, report = factorize(spec, params, FactorizeOptions(energy=energy), *env(cfg))
    matrices = matrices_of(spec, ("^blocks/",))
    stacks = {}
    for lm in matrices:  # scanned: one rank per stack, the largest its layers need
        stacks.setdefault(lm.target.path, []).append(energy_rank(matrix(params, lm), energy))
    got = {line["layer"]: line["rank"] for line in report["layers"]}
    for lm in matrices:
        d_in, d_out = lm.target.matrix
        r = max(stacks[lm.target.path])
        assert got[lm.name] == (r if saves(r, d_in, d_out) else None), lm.name
    assert any(r is not None for r in got.values()) == (energy == 0.5)  # flat random spectra: 0.95 keeps all dense
    if energy == 0.5:
        shapes = flat(build(new_spec).shapes)
        for lm in matrices:
            module = lm.target.path.rsplit("/", 1)[0]
            assert shapes[f"{module}/tap/u"].shape[-1] == got[lm.name], lm.name
        for line in report["layers"]:
            w = next(matrix(params, lm) for lm in matrices if lm.name == line["layer"])
            sq = np.linalg.svd(w, compute_uv=False) ** 2
            assert line["retained_energy"] == pytest.approx(sq[:line["rank"]].sum() / sq.sum(), rel=1e-5)
            assert line["retained_energy"] >= energy
    else:
        assert new_spec == spec and new is params


@pytest.mark.parametrize("scan", [True, False])
def test_budget_is_met_as_closely_as_integer_ranks_allow(scan):
    cfg = small_config(scan_layers=scan)
    _, params = random_model(cfg)
    spec = spec_from_config(cfg)
    new_spec, _, report = factorize(spec, params, FactorizeOptions(budget=0.5), *env(cfg))
    matrices = matrices_of(spec, ("^blocks/",))
    targeted = sum(math.prod(lm.target.matrix) for lm in matrices)
    budget = math.floor(0.5 * targeted)
    ranks = {line["layer"]: line["rank"] for line in report["layers"]}
    used = sum(math.prod(lm.target.matrix) if ranks[lm.name] is None else ranks[lm.name] * sum(lm.target.matrix)
               for lm in matrices)
    # Counted on the rebuilt spec's abstract shapes: the dense model less the targets plus what they now hold.
    assert count_params(build(new_spec).shapes) == count_params(build(spec).shapes) - targeted + used
    assert used <= budget
    groups = {}
    for lm in matrices:
        groups.setdefault(lm.target.path if scan else lm.name, []).append(lm)
    for members in groups.values():  # no group's next step fits in what is left
        r, (d_in, d_out) = ranks[members[0].name], members[0].target.matrix
        if r is None:
            continue
        step = (d_in + d_out) if saves(r + 1, d_in, d_out) else d_in * d_out - r * (d_in + d_out)
        assert len(members) * step > budget - used, members[0].name
    assert report["budget_params"] == budget and report["targeted_params_after"] == used


@pytest.fixture(scope="module")
def calibrated():
    """A random model sharded on a (2, 2, 2) mesh, two calibration batches, and factorize at rank 16
    plain and whitened."""
    cfg = with_mesh(small_config(vocab_size=260), 2, 2, 2)  # vocab: the byte tokenizer's (the training test)
    _, params = random_model(cfg)
    spec = spec_from_config(cfg)
    built, (mesh, rules) = build(spec), env(cfg)
    params = jax.device_put(params, rules.tree_shardings(built.axes, built.shapes, mesh))
    batches = [synthetic_batch(cfg, 0), synthetic_batch(cfg, 1)]
    out = {m: factorize(spec, params, FactorizeOptions(method=m, rank=16), *env(cfg), batches) for m in ("svd", "whitened")}
    return cfg, spec, params, batches, out


def test_whitened_svd_has_a_lower_output_error_on_the_calibration_inputs(calibrated):
    cfg, spec, params, batches, out = calibrated
    matrices = matrices_of(spec, ("^blocks/",))
    stats = collect_stats(spec, params, batches, *env(cfg), ["^blocks/"], gram=True)
    for lm in matrices:
        w, gram = matrix(params, lm), np.asarray(stats[lm.name].gram, F64)
        errors = {}
        for method, (_, new, report) in out.items():
            w_r = factored(jax.device_get(new), lm)
            errors[method] = output_error(w, w_r, gram)
            line = next(line for line in report["layers"] if line["layer"] == lm.name)
            assert line["rank"] == 16 and line["relative_error"] == pytest.approx(
                errors[method] / output_error(w, 0 * w, gram), rel=1e-3)
        np.testing.assert_allclose(w_r, whitened_reference(w, gram, 16, 0.01), atol=1e-4 * np.abs(w).max())
        assert errors["whitened"] < errors["svd"], (lm.name, errors)


def test_export_multiplies_the_factors_back_into_plain_kernels(calibrated):
    _, spec, params, _, out = calibrated
    new_spec, new, _ = out["whitened"]
    assert [name for name, _ in new_spec.recipe] == ["lowrank"] and export_spec(new_spec).recipe == ()
    exported = flat(jax.device_get(jax.jit(export_fn(build(new_spec)))(new)))
    dense = flat(params)
    assert exported.keys() == dense.keys()
    host_new = jax.device_get(new)
    matrices = {lm.target.path: lm for lm in matrices_of(spec, ("^blocks/",))}
    for path, x in exported.items():
        assert x.shape == dense[path].shape, path
        if path in matrices:
            lm = matrices[path]
            layers = [dataclasses.replace(lm, index=i) for i in range(x.shape[0])]
            want = np.stack([factored(host_new, one).reshape(x.shape[1:]) for one in layers])
            np.testing.assert_allclose(x, want, atol=1e-6, err_msg=path)
            assert not np.array_equal(x, dense[path])
        else:
            np.testing.assert_array_equal(x, dense[path], err_msg=path)


@pytest.mark.parametrize("rank_rule", [None, "data"])
def test_factors_are_sharded_like_their_kernel_with_the_rank_by_its_rule(rank_rule):
    plain = with_mesh(small_config(), 2, 2, 2)
    cfg = with_lowrank(plain, rank=8)
    if rank_rule:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=(("lowrank_rank", (rank_rule,)),)))
    _, _, _, dense_state = build_state(plain)
    mesh, _, setup, state = build_state(cfg)
    axes = {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        setup.axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    kernels = flat(dense_state.params)
    params = flat(state.params)
    factors = {p: x for p, x in params.items() if L.is_factor(p)}
    assert len(factors) == 2 * 7 and not any(p.startswith("blocks/") and p.endswith("kernel") for p in params)
    for name, leaf in factors.items():
        want = NamedSharding(mesh, expected_spec(axes[name], cfg.mesh.rules))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding.spec, want.spec)
        dense, which = name.rsplit("/tap/", 1)
        kernel = kernels[f"{dense}/kernel"]
        kspec = tuple(kernel.sharding.spec) + (None,) * (kernel.ndim - len(kernel.sharding.spec))
        spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        if which == "u":  # [layers, *in, r]
            assert spec[:-1] == kspec[:leaf.ndim - 1], (name, spec, kspec)
            rank = spec[-1]
        else:  # [layers, r, *out]
            n_out = leaf.ndim - 2
            assert spec[:1] == kspec[:1] and spec[2:] == kspec[kernel.ndim - n_out:], (name, spec, kspec)
            rank = spec[1]
        assert rank == rank_rule, (name, spec)
    for path, leaf in flat(state.opt_state).items():
        if leaf.ndim and "/tap/" in path:
            assert leaf.sharding.is_equivalent_to(factors[path[path.index("blocks/"):]].sharding, leaf.ndim), path


def test_factored_parameters_come_back_sharded_by_the_rules(calibrated):
    cfg, _, _, _, out = calibrated
    new_spec, new, _ = out["whitened"]
    built, (mesh, _) = build(new_spec), env(cfg)
    axes = {path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        built.axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    leaves = flat(new)
    assert any(L.is_factor(p) for p in leaves)
    for name, leaf in leaves.items():
        want = NamedSharding(mesh, expected_spec(axes[name], cfg.mesh.rules))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding.spec, want.spec)


def test_a_factored_run_trains_from_init_from_and_its_checkpoint_restores_bit_exactly(calibrated, tmp_path):
    from slimjax.checkpoint import Checkpointer, fingerprints
    from slimjax.config import validate
    from slimjax.configs import base
    from slimjax import train

    cfg, _, _, _, out = calibrated
    new_spec, new, _ = out["whitened"]
    opts = dict(new_spec.recipe[0][1])
    c = base.get_config()
    for key, value in dataclasses.asdict(cfg.model).items():
        c.model[key] = value
    c.data.tokenizer_kind, c.data.seq_len = "byte", 32
    c.train.global_batch_size, c.train.steps, c.train.eval_every, c.train.sample_tokens = 16, 2, 1000, 0
    c.train.progress, c.checkpoint.every_steps = False, 2
    c.slim.recipe, c.slim.lowrank.targets, c.slim.lowrank.ranks = ("lowrank",), opts["targets"], opts["ranks"]
    factored_cfg = validate(c)
    spec = spec_from_config(factored_cfg)
    assert spec == new_spec  # the config's recipe is the factoriser's, ranks and all
    # The factored parameters as a run of their own (what the CLI's run writer will do).
    source = str(tmp_path / "factored")
    built = build(spec)
    mesh, rules = env(factored_cfg)
    shardings = rules.tree_shardings(built.axes, built.shapes, mesh)
    ck = Checkpointer(f"{source}/checkpoints", factored_cfg.checkpoint)
    ck.save_params(0, jax.device_put(new, shardings), {"config": factored_cfg.to_dict(), "spec": spec.to_json(),
                                                        "step": 0})
    ck.wait()
    ck.close()
    start = flat(jax.device_get(new))

    c.checkpoint.init_from = source
    workdir = str(tmp_path / "tuned")
    summary = train(c, workdir)
    assert summary["final_step"] == 2 and np.isfinite(summary["final_train_loss"])
    reader = Checkpointer(f"{workdir}/checkpoints", factored_cfg.checkpoint, read_only=True)
    try:
        step = reader.latest_step()
        assert step == 2
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), built.shapes, shardings)
        restored = reader.restore_params(step, abstract)
        recorded = reader.read_meta(step)["fingerprints"]
    finally:
        reader.close()
    got = fingerprints(restored)
    saved = {k: v for item in recorded.values() for k, v in item.items()}
    assert got and all(saved[k] == v for k, v in got.items())
    tuned = flat(jax.device_get(restored))
    for p in start:
        if L.is_factor(p):  # the factors trained (and are what init_from gave at step 0, moved by two steps)
            assert tuned[p].shape == start[p].shape and not np.array_equal(tuned[p], start[p]), p
            assert np.abs(tuned[p] - start[p]).max() < 0.1 * np.abs(start[p]).max(), p


BAD_CONFIG = [
    (dict(rank=-1), "slim.lowrank.rank"),
    (dict(ranks=("blocks/0/attn/wq",)), "blocks/0/attn/wq"),
    (dict(ranks=("blocks/0/attn/wq=0",)), "blocks/0/attn/wq=0"),
    (dict(rank=0), "slim.lowrank.rank is 0"),
    (dict(rank=8, targets=("^blocks/.*zz",)), "^blocks/.*zz"),
]


@pytest.mark.parametrize("kw,named", BAD_CONFIG, ids=[b[1] for b in BAD_CONFIG])
def test_bad_config_is_a_one_line_error_naming_the_value(kw, named):
    from slimjax.config import validate
    from slimjax.configs import base

    c = base.get_config()
    c.slim.recipe = ("lowrank",)
    for k, v in kw.items():
        c.slim.lowrank[k] = v
    with pytest.raises(SlimjaxError) as e:
        build(spec_from_config(validate(c)))
    assert named in str(e.value) and "\n" not in str(e.value)


BAD_SPEC = [
    (dict(rank=65), "rank 65"),
    (dict(rank=8, ranks=("blocks/0/attn/wq=4",)), "blocks/0/attn/wq=4"),
    (dict(rank=8, ranks=("blocks/0/attn/wz=4",)), "blocks/0/attn/wz"),
    (dict(rank=8, targets=("^embed",)), "embed"),
]


@pytest.mark.parametrize("kw,named", BAD_SPEC, ids=[b[1] for b in BAD_SPEC])
def test_bad_ranks_for_the_model_are_one_line_errors(kw, named):
    cfg = with_lowrank(small_config(), **kw)
    with pytest.raises(SlimjaxError) as e:
        build(spec_from_config(cfg))
    assert named in str(e.value) and "\n" not in str(e.value)


BAD_OPTIONS = [
    (dict(rank=64), "rank=64"),
    (dict(energy=0.0), "energy=0.0"),
    (dict(energy=1.5), "energy=1.5"),
    (dict(budget=1.0), "budget=1.0"),
    (dict(budget=0.001), "cannot be met"),
    (dict(rank=4, energy=0.5), "exactly one"),
    (dict(method="whitened", rank=4), "calibration batches"),
    (dict(method="qr", rank=4), "method='qr'"),
    (dict(rank=4, targets=("^blocks/0/",)), "scanned stack"),
]


@pytest.mark.parametrize("kw,named", BAD_OPTIONS, ids=[b[1] for b in BAD_OPTIONS])
def test_bad_factorize_requests_are_one_line_errors(kw, named):
    cfg = small_config()
    spec = spec_from_config(cfg)
    params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), build(spec).shapes)
    with pytest.raises(SlimjaxError) as e:
        factorize(spec, params, FactorizeOptions(**kw), *env(cfg))
    assert named in str(e.value) and "\n" not in str(e.value)
