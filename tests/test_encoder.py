"""The encoder family: float64 reference forward, the pre-training step's terms, loss parity across
meshes, scan/remat, and the bert_base parameter count (shapes only)."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from helpers import random_model, run_steps, small_config, synthetic_encoder_batch, with_mesh, with_train
from slimjax import config as C
from slimjax.configs import bert_base
from slimjax.data import pipeline
from slimjax.models import abstract_params
from slimjax.train.run import build_fresh
from slimjax.sharding import make_mesh

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


# --- a float64 NumPy BERT written from the paper's equations -------------------------------------

def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(x, p):
    k = p["kernel"]
    n_in = x.shape[-1]
    return (x @ k.reshape(n_in, -1)).reshape(*x.shape[:-1], *k.shape[1:]) + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def reference(params, cfg, tokens, types, segment_ids):
    """(MLM logits, pair logits) of a BERT (post-LN, or pre-LN with a final norm) in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, t = tokens.shape
    x = p["embed"]["embedding"][tokens] + p["pos_embed"][np.arange(t)][None] + p["type_embed"][types]
    x = _ln(x, p["embed_norm"], cfg.norm_eps)
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]

    def attend(x, lp):
        q, k, v = (_lin(x, lp["attn"][n]) for n in ("wq", "wk", "wv"))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(mask[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v).reshape(b, t, -1)
        return o @ lp["attn"]["wo"]["kernel"].reshape(-1, cfg.d_model) + lp["attn"]["wo"]["bias"]

    def mlp(x, lp):
        return _lin(_gelu(_lin(x, lp["mlp"]["up"])), lp["mlp"]["down"])

    for i in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[i], p["blocks"])
        if cfg.norm_position == "post":  # BERT: norm(x + f(x))
            x = _ln(x + attend(x, lp), lp["attn_norm"], cfg.norm_eps)
            x = _ln(x + mlp(x, lp), lp["mlp_norm"], cfg.norm_eps)
        else:  # x + f(norm(x)), then a final norm
            x = x + attend(_ln(x, lp["attn_norm"], cfg.norm_eps), lp)
            x = x + mlp(_ln(x, lp["mlp_norm"], cfg.norm_eps), lp)
    if cfg.norm_position == "pre":
        x = _ln(x, p["final_norm"], cfg.norm_eps)
    h = _ln(_gelu(_lin(x, p["mlm"]["dense"])), p["mlm"]["norm"], cfg.norm_eps)
    mlm = h @ p["embed"]["embedding"].T + p["mlm"]["bias"]
    pair = _lin(np.tanh(_lin(x[:, 0], p["pooler"])), p["nsp"])
    return mlm, pair


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_forward_matches_a_float64_reference_with_padding_and_token_types(norm_position):
    full = small_config("bert", norm_position=norm_position)
    cfg = full.model
    graphdef, params = random_model(full)
    assert ("final_norm" in params) == (norm_position == "pre")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24))
    types = (np.arange(24) >= 11).astype(np.int32)[None].repeat(2, 0)
    segment_ids = np.ones((2, 24), np.int32)
    segment_ids[1, 17:] = 0  # padding
    mlm, pair = nnx.merge(graphdef, params)(tokens, types, None, segment_ids)
    want_mlm, want_pair = reference(params, cfg, tokens, types, segment_ids)
    real = segment_ids.astype(bool)
    for got, want in ((np.asarray(mlm)[real], want_mlm[real]), (np.asarray(pair), want_pair)):
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_padding_does_not_change_the_real_tokens():
    graphdef, params = random_model(small_config("bert"))
    model = nnx.merge(graphdef, params)
    tokens = np.random.default_rng(1).integers(4, 200, (1, 16))
    short = np.asarray(model(tokens[:, :10])[0])
    padded_tokens = np.concatenate([tokens[:, :10], np.zeros((1, 6), np.int64)], 1)
    seg = (np.arange(16) < 10).astype(np.int32)[None]
    padded = np.asarray(model(padded_tokens, None, None, seg)[0])[:, :10]
    np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-5)


def test_step_logs_each_term_and_accuracy_and_the_objective_is_their_weighted_sum():
    cfg = small_config("bert")
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, mlm=1.0, nsp=0.7))
    mesh = make_mesh(cfg.mesh)
    setup, state, train_step, _, sharding = build_fresh(cfg, mesh)
    batch = synthetic_encoder_batch(cfg)
    params = jax.device_get(state.model_params())
    _, metrics = train_step(state, pipeline.to_global(batch, sharding))
    m = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
    mlm, pair = reference(params, cfg.model, batch["inputs"], batch["token_types"], batch["segment_ids"])

    def nll(logits, labels):
        z = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - z).sum(-1)) + z[..., 0]
        return log_z - np.take_along_axis(logits, labels[..., None], -1)[..., 0]

    w = batch["mlm_weights"]
    want = {"terms/mlm": (nll(mlm, batch["mlm_targets"]) * w).sum() / w.sum(),
            "terms/nsp": nll(pair, batch["nsp_labels"]).mean(),
            "mlm_accuracy": ((mlm.argmax(-1) == batch["mlm_targets"]) * w).sum() / w.sum(),
            "nsp_accuracy": (pair.argmax(-1) == batch["nsp_labels"]).mean()}
    for key, value in want.items():
        np.testing.assert_allclose(m[key], value, rtol=1e-4, err_msg=key)
    assert m["loss"] == m["terms/mlm"]
    np.testing.assert_allclose(m["objective"], m["terms/mlm"] + 0.7 * m["terms/nsp"], rtol=1e-6)
    assert m["tokens"] == batch["segment_ids"].sum()


@pytest.fixture(scope="module")
def single_device_losses():
    return run_steps(small_config("bert"), 2, devices=jax.devices()[:1])


@pytest.mark.parametrize("shape", MESHES)
def test_training_gives_the_same_losses_on_every_mesh(shape, single_device_losses):
    np.testing.assert_allclose(run_steps(with_mesh(small_config("bert"), *shape), 2), single_device_losses, rtol=2e-5)


def test_unrolled_remat_and_microbatches_match_the_scanned_run(single_device_losses):
    cfg = small_config("bert", scan_layers=False, remat="full")
    np.testing.assert_allclose(run_steps(with_train(cfg, microbatches=2), 2, devices=jax.devices()[:1]),
                               single_device_losses, rtol=2e-5)


def test_bert_base_has_the_bert_base_parameter_count():
    cfg = C.validate(bert_base.get_config()).model
    _, _, shapes = abstract_params(cfg)  # shapes only: nothing is allocated
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    v, d, f, layers, p, t = 30522, 768, 3072, 12, 512, 2
    embeddings = (v + p + t) * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    heads = (d * d + d) + (d * 2 + 2) + (d * d + d + 2 * d + v)  # pooler, NSP, MLM transform + bias
    assert n == embeddings + layers * layer + heads
    assert 109e6 < n < 111e6  # "110M" (Devlin et al. 2019, Table: BERT-base)
