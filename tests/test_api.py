"""The Python API: slimjax.configs as an attribute, load_run (sharded params, logits against a float64
NumPy forward), generate and evaluate equal to the CLI commands, restoring onto another mesh."""

import json
import os

import jax
import numpy as np
import pytest
import reference
from hf_models import save, sentences

import slimjax
from slimjax.cli import main
from slimjax.errors import SlimjaxError


FIGURES = []  # what the live loss plot showed while the run_dir fixture trained


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, spm_path):
    """A 3-step run of the bundled tiny config, trained through the notebook entry point with the
    notebook's live loss plot."""
    config = slimjax.configs.tiny.get_config()  # the README's notebook line
    config.train.steps, config.train.global_batch_size, config.data.seq_len = 3, 8, 32
    config.train.eval_batches, config.train.sample_tokens, config.data.tokenizer = 1, 0, spm_path
    config.train.log_every, config.train.eval_every = 1, 2
    workdir = str(tmp_path_factory.mktemp("api") / "run")
    summary = slimjax.train(config, workdir, hooks=[slimjax.live_loss_plot(every=2, show=FIGURES.append)])
    assert summary["final_step"] == 3
    return workdir


def test_live_loss_plot_draws_the_logged_losses_so_far(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(FIGURES) == 2  # every=2 over 3 steps: at step 2 and at the end
    for figure, step in zip(FIGURES, (2, 3)):
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        for key in ("train/loss", "eval/loss"):
            logged = [(r["step"], r[key]) for r in records if key in r and r["step"] <= step]
            assert list(zip(lines[key].get_xdata(), lines[key].get_ydata())) == logged, key
        assert f"step {step}" in figure.axes[0].get_title()


def test_explain_a_config_before_training_equals_the_trained_placement(run_dir):
    run = slimjax.load_run(run_dir)
    before = slimjax.explain(run.config)
    assert before.rows == run.explain().rows and len(before) == len(jax.tree.leaves(run.params))
    frame = before.to_pandas()
    assert list(frame.columns) == list(before.columns) and frame["per-device bytes"].sum() == sum(
        before.column("per-device bytes"))
    assert "<table>" in before._repr_html_() and "blocks/attn/wq/kernel" in str(before)


def test_run_command_runs_a_command_in_process_and_raises_on_a_mistake(run_dir, capsys):
    slimjax.run_command("generate", f"--workdir={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=4")
    assert "ROMEO:" in capsys.readouterr().out
    with pytest.raises(SlimjaxError, match="unknown command 'generat'.*generate"):
        slimjax.run_command("generat", f"--workdir={run_dir}")
    with pytest.raises(SlimjaxError, match="max_new_tokens"):
        slimjax.run_command("generate", f"--workdir={run_dir}", "--max_new_tokens=many")


def test_configs_are_attributes_of_the_package():
    assert slimjax.configs.tiny.get_config().model.d_model > 0
    assert slimjax.configs.gpt2_small.get_config().model.n_layers == 12
    with pytest.raises(AttributeError, match="no_such_config"):
        slimjax.configs.no_such_config  # noqa: B018


def float64_logits(run, ids):
    """One unpadded row's logits from the float64 NumPy decoder (tests/reference.py)."""
    n = len(ids)
    return reference.forward(jax.device_get(run.params), run.config.model, np.asarray([ids]), np.arange(n)[None],
                             np.ones((1, n), np.int32))[0]


def test_load_run_shards_params_by_the_rules_and_logits_match_float64(run_dir):
    run = slimjax.load_run(run_dir)
    assert run.step == 3 and run.config.train.steps == 3 and run.spec.family == "decoder"
    expected = run.rules.tree_shardings(run.rundir.built.axes, run.rundir.built.shapes, run.mesh)
    for leaf, sharding in zip(jax.tree.leaves(run.params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    text, other = "ROMEO: what light", "To be"
    ids = run.encode(text)
    assert ids[0] == run.tokenizer.bos_id
    single = run.logits(text)
    assert single.shape == (len(ids), run.config.model.vocab_size) and single.dtype == np.float32
    np.testing.assert_allclose(single, float64_logits(run, ids), rtol=1e-4, atol=1e-5)
    # A batch of different lengths (padded inside) gives each row what it gets alone.
    both = run.logits([text, run.encode(other)])
    np.testing.assert_allclose(both[0], single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], run.logits(other), rtol=1e-5, atol=1e-5)
    table = run.explain()
    assert len(table) == len(jax.tree.leaves(run.params))
    assert set(slimjax.sharding.device_bytes(run.params).values()) == {sum(table.column("per-device bytes"))}
    with pytest.raises(SlimjaxError, match="max_seq_len"):
        run.logits([[1] * (run.config.model.max_seq_len + 1)])


def test_load_run_onto_another_mesh(run_dir):
    one = slimjax.sharding.build_mesh(devices=jax.devices()[:1])
    run = slimjax.load_run(run_dir, mesh=one)
    assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(run.params))
    np.testing.assert_allclose(run.logits("ROMEO:"), slimjax.load_run(run_dir).logits("ROMEO:"), rtol=1e-5, atol=1e-5)


def test_generate_equals_the_cli(run_dir, capsys):
    run = slimjax.load_run(run_dir)
    texts = slimjax.generate(run, ["ROMEO:", "To be, or not"], max_new_tokens=6)
    assert main(["generate", f"--workdir={run_dir}", "--prompt=ROMEO:", "--prompt=To be, or not",
                 "--max_new_tokens=6"]) == 0
    printed = capsys.readouterr().out
    assert f"ROMEO:{texts[0]}" in printed and f"To be, or not{texts[1]}" in printed
    # Greedy continuation = argmax of the logits, token by token (first new token).
    assert int(np.argmax(run.logits("ROMEO:")[-1])) == run.generator.generate([run.encode("ROMEO:")], 1).tokens[0][0]


def test_evaluate_equals_the_cli(run_dir, tmp_path, capsys):
    run = slimjax.load_run(run_dir)
    result = slimjax.evaluate(run, max_docs=2, batch_size=8)
    out = tmp_path / "eval.json"
    assert main(["eval", f"--workdir={run_dir}", "--max_docs=2", "--batch_size=8", f"--out={out}"]) == 0
    cli = json.loads(out.read_text())
    assert result["documents"] == 2 and result["tokens"] > 0
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        assert result[key] == pytest.approx(cli[key], rel=1e-6)
    with pytest.raises(SlimjaxError, match="batch_size=12 must be a multiple of the 8"):
        slimjax.evaluate(run, batch_size=12)
    with pytest.raises(SlimjaxError, match="split='test'"):
        slimjax.evaluate(run, split="test")


def test_load_run_names_a_missing_run(tmp_path):
    with pytest.raises(SlimjaxError, match="has no checkpoints/ directory"):
        slimjax.load_run(str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """A random Llama imported with a word-level tokenizer.json that adds no special tokens itself."""
    root = tmp_path_factory.mktemp("imported")
    hf_dir = save("llama_gqa", str(root / "hf"))
    assert main(["import", f"--hf_dir={hf_dir}", f"--workdir={root / 'run'}"]) == 0
    return str(root / "run")


@pytest.mark.parametrize("which", ["sentencepiece", "huggingface"])
def test_exported_tokenizer_and_model_generate_under_transformers_as_in_slimjax(which, run_dir, imported_run,
                                                                                tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = run_dir if which == "sentencepiece" else imported_run
    out = tmp_path / "hf"
    assert main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
    run = slimjax.load_run(workdir)
    assert run.config.data.tokenizer_kind == which
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    eos = run.tokenizer.eos_id
    assert model.generation_config.eos_token_id == eos and hf_tok.bos_token_id == run.tokenizer.bos_id
    prompts = ["ROMEO: what light", "To be , or not"] if which == "sentencepiece" else sentences(2, seed=5)
    for prompt in prompts:
        ids = hf_tok(prompt)["input_ids"]
        assert ids == run.encode(prompt)  # BOS first, as slimjax encodes a prompt
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        ref = ref[:ref.index(eos)] if eos in ref else ref  # slimjax stops at EOS and drops it
        assert run.generator.generate([ids], 8, stop_tokens=(eos,)).tokens[0] == ref
