"""Generation: the KV cache against full recomputation, batching, samplers, sharding, the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_model, small_config, with_mesh
from slimjax import config as C
from slimjax.cli import main as cli_main
from slimjax.configs import base
from slimjax.infer import sampling as S
from slimjax.infer.generate import Generator, bucket_length
from slimjax.models.cache import KVCache
from slimjax.sharding import Rules, make_mesh

FAMILIES = [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)]


def family_config(family, scan):
    return small_config(family, scan_layers=scan)


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=n).tolist() for n in lengths]


def greedy_by_recompute(model, prompt, n, width=32):
    """The reference: the full forward pass over the whole sequence at every step, argmax. The
    sequence is right-padded to a fixed width so one compiled forward serves every step; under
    the causal mask tokens to the right of a position cannot change its logits."""
    forward = jax.jit(lambda t: model(t))
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(padded))[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("family,scan", FAMILIES)
def test_cached_logits_equal_full_forward(family, scan):
    cfg = family_config(family, scan)
    graphdef, params = random_model(cfg)
    model = nnx.merge(graphdef, params)
    tokens = np.random.default_rng(1).integers(4, cfg.model.vocab_size, size=(2, 14)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(tokens)))  # [2, 14, vocab]
    prefill, decode = jax.jit(lambda c, t, p, s: model.prefill(t, p, s, c)), jax.jit(model.decode)
    cache = KVCache.init(cfg.model, 2, 16, jnp.float32)
    positions = np.broadcast_to(np.arange(8), (2, 8))
    logits, cache = prefill(cache, tokens[:, :8], positions, np.ones((2, 8), np.int32))
    got = [np.asarray(logits)]
    for t in range(8, 14):
        logits, cache = decode(jnp.asarray(tokens[:, t]), jnp.full((2,), t), cache)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    want = full[:, 7:]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-5, rel
    assert int(cache.index) == 14 and len(cache.k) == 2
    assert cache.k[0].shape == (2, cfg.model.n_kv_heads, 16, 8)  # kv heads, not query heads


@pytest.mark.parametrize("family,scan", FAMILIES)
def test_cached_greedy_equals_recompute(family, scan):
    cfg = family_config(family, scan)
    graphdef, params = random_model(cfg)
    model = nnx.merge(graphdef, params)
    prompts = prompts_of([5, 11], cfg.model.vocab_size)
    out = Generator(cfg.model, params).generate(prompts, 8)
    assert out.tokens == [greedy_by_recompute(model, p, 8) for p in prompts]


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    cfg = family_config("llama", True)
    _, params = random_model(cfg)
    gen = Generator(cfg.model, params)
    prompts = prompts_of([3, 12, 7, 1], cfg.model.vocab_size, seed=3)
    batched = gen.generate(prompts, 10).tokens
    assert batched == [gen.generate([p], 10).tokens[0] for p in prompts]
    # Sampled too: each row's stream depends on the key, so compare a batch against itself re-run.
    s = S.Sampling(temperature=0.9, top_k=20)
    assert gen.generate(prompts, 10, s, seed=5).tokens == gen.generate(prompts, 10, s, seed=5).tokens


def test_programs_are_compiled_once_per_bucket():
    cfg = family_config("gpt2", False)
    _, params = random_model(cfg)
    gen = Generator(cfg.model, params)
    gen.generate(prompts_of([3], 256), 4)
    gen.generate(prompts_of([6], 256, seed=1), 4)  # same bucket (8): same program
    assert len(gen.compiled) == 1
    gen.generate(prompts_of([9], 256), 4)  # bucket 16
    assert len(gen.compiled) == 2
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]


def test_stop_tokens_end_rows_early():
    cfg = family_config("llama", False)
    graphdef, params = random_model(cfg)
    prompts = prompts_of([4, 6], cfg.model.vocab_size)
    free = Generator(cfg.model, params).generate(prompts, 8).tokens
    stop = free[0][3]  # the 4th token of row 0 becomes a stop token
    out = Generator(cfg.model, params).generate(prompts, 8, stop_tokens=[stop])
    assert out.tokens[0] == free[0][:free[0].index(stop)] and out.stopped[0]
    row1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert out.tokens[1] == row1 and out.stopped[1] == (stop in free[1])


def test_sampling_with_a_seed_is_reproducible():
    cfg = family_config("llama", True)
    _, params = random_model(cfg)
    gen = Generator(cfg.model, params)
    prompts = prompts_of([5, 9], cfg.model.vocab_size)
    s = S.Sampling(temperature=1.5, top_p=0.95, repetition_penalty=1.3)
    a = gen.generate(prompts, 12, s, seed=7).tokens
    assert a == gen.generate(prompts, 12, s, seed=7).tokens
    assert a != gen.generate(prompts, 12, s, seed=8).tokens


def test_greedy_choice_is_numpys_argmax_including_ties():
    """The first index of each row's maximum, as ``np.argmax``: random rows, ties (the first of the
    tied indices wins), a maximum at the last index and all-equal rows."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    logits[1, [7, 300, 999]] = 9.0
    logits[2, 999] = 9.0
    logits[3] = -2.0
    logits[4, [0, 1]] = 9.0
    logits[5] = np.round(logits[5])  # many ties at the top value
    got = np.asarray(jax.jit(S.first_argmax)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got.dtype == np.int32 and list(got[1:5]) == [7, 999, 0, 0]


def test_top_k_masks_exactly_the_k_largest():
    logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0, 2.0], [0.5, -1.0, 2.5, 0.0, 9.0]])
    out = np.asarray(S.top_k_mask(logits, 2))
    keep = np.isfinite(out)
    np.testing.assert_array_equal(keep, [[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]])
    np.testing.assert_array_equal(out[keep], np.asarray(logits)[keep])
    np.testing.assert_array_equal(S.top_k_mask(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.asarray([0.1, 0.5, 0.05, 0.2, 0.15])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = jnp.asarray(np.log(probs))[None]
    cases = {0.4: [0, 1, 0, 0, 0], 0.5: [0, 1, 0, 0, 0], 0.6: [0, 1, 0, 1, 0], 0.8: [0, 1, 0, 1, 1],
             0.9: [1, 1, 0, 1, 1], 0.96: [1, 1, 1, 1, 1]}
    for p, want in cases.items():
        np.testing.assert_array_equal(np.isfinite(np.asarray(S.top_p_mask(logits, p)))[0], want, err_msg=str(p))


def test_repetition_penalty_follows_ctrl():
    logits = jnp.asarray([[2.0, -2.0, 3.0, -1.0]])
    seen = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(S.repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 3.0, -1.0]])


def test_temperature_and_top_k_sample_the_right_distribution():
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    s = S.Sampling(temperature=0.7, top_k=3)
    draws = np.asarray(S.sample(jnp.broadcast_to(logits, (n, 5)), jax.random.key(0), s))
    freq = np.bincount(draws, minlength=5) / n
    want = np.asarray(jax.nn.softmax(logits[:3] / 0.7))
    np.testing.assert_allclose(freq[:3], want, atol=0.01)
    assert freq[3:].sum() == 0  # masked tokens are never drawn
    greedy = S.sample(jnp.broadcast_to(logits, (4, 5)), jax.random.key(0), S.Sampling())
    np.testing.assert_array_equal(greedy, 0)


@pytest.mark.parametrize("shape", [(2, 1, 4), (1, 2, 2)])
def test_sharded_generation_equals_single_device(shape):
    cfg = with_mesh(family_config("llama", True), *shape)
    _, params = random_model(cfg)
    prompts = prompts_of([3, 10, 6], cfg.model.vocab_size, seed=2)
    mesh = make_mesh(cfg.mesh, jax.devices()[: int(np.prod(shape))])
    sharded = Generator(cfg.model, params, mesh, Rules.from_config(cfg.mesh))
    single = Generator(cfg.model, params)
    assert sharded.params["blocks"][0]["attn"]["wk"]["kernel"].sharding.mesh.shape == {
        "data": shape[0], "stage": 1, "fsdp": shape[1], "sequence": 1, "tensor": shape[2]}
    assert sharded.generate(prompts, 8).tokens == single.generate(prompts, 8).tokens
    s = S.Sampling(temperature=0.8, top_p=0.9)
    assert sharded.generate(prompts, 8, s, seed=3).tokens == single.generate(prompts, 8, s, seed=3).tokens


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_tied_llama3", "gpt2"])
def test_imported_hf_model_generates_what_transformers_generates(variant, tmp_path):
    """KV-cache generation with an imported Hugging Face model (a batch of prompts of different
    lengths, on a (1, 2, 2) mesh) equals transformers' greedy ``generate``, prompt by prompt."""
    import torch

    from hf_models import random_model as hf_random_model
    from hf_models import save
    from slimjax.interop.hf import import_hf

    c = base.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
    mesh_cfg = C.validate(c).mesh
    mesh, rules = make_mesh(mesh_cfg, jax.devices()[:4]), Rules.from_config(mesh_cfg)
    cfg, params = import_hf(save(variant, str(tmp_path / variant)), mesh, rules, dtype="float32")
    prompts = prompts_of([8, 3, 13], cfg.vocab_size, seed=4)
    ours = Generator(cfg, params, mesh, rules).generate(prompts, 12).tokens
    hf = hf_random_model(variant)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


# --- the command ------------------------------------------------------------------------------

def slimjax(*args):
    return subprocess.run([sys.executable, "-m", "slimjax.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spm_path):
    """A workdir with a 4-step run of the default model (checkpoint at step 4) and its output."""
    workdir = str(tmp_path_factory.mktemp("gen_run"))
    result = slimjax("train", "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4",
                     "--config.train.eval_batches=1", "--config.train.global_batch_size=8",
                     "--config.data.seq_len=32", "--config.train.sample_tokens=8",
                     f"--config.data.tokenizer={spm_path}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_prints_a_sample_and_generate_continues_prompts(trained, tmp_path):
    workdir, train_result = trained
    assert "sample: ROMEO:" in train_result.stdout
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("To be, or not\n\nSo shaken as we are\n")
    args = ["generate", f"--workdir={workdir}", "--prompt=ROMEO:", f"--prompts_file={prompts_file}",
            "--max_new_tokens=8"]
    result = slimjax(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = result.stdout.split("--- ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["1/3 (step 4)", "2/3 (step 4)", "3/3 (step 4)"]
    texts = ["\n".join(b.splitlines()[1:]) for b in blocks]
    for text, prompt in zip(texts, ["ROMEO:", "To be, or not", "So shaken as we are"]):
        assert text.startswith(prompt) and len(text) > len(prompt)
    # Greedy generation at the end of training and from the checkpoint agree (same model, same prompt).
    sample = train_result.stdout.split("sample: ")[1].split("\ndone: ")[0]
    assert texts[0] == sample


@pytest.mark.parametrize("case", ["no checkpoint", "missing prompts file", "no prompt", "bad flag value"])
def test_generate_bad_input_is_one_line_exit_2(case, tmp_path, capsys, trained):
    empty = tmp_path / "empty"
    empty.mkdir()
    args, expected = {
        "no checkpoint": ([f"--workdir={empty}", "--prompt=hi"], "has no checkpoint"),
        "missing prompts file": ([f"--workdir={trained[0]}", f"--prompts_file={tmp_path}/nope.txt"],
                                 "--prompts_file"),
        "no prompt": ([f"--workdir={trained[0]}"], "needs --prompt"),
        "bad flag value": ([f"--workdir={trained[0]}", "--prompt=hi", "--top_p=2"], "--top_p must lie in (0, 1]"),
    }[case]
    assert cli_main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimjax: error: ") and expected in err[0], err
    assert os.listdir(empty) == []  # nothing created in a workdir that had no run
