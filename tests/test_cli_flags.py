"""The `slimjax` flags: --help for every command, per-command suggestions, one-line errors, and the
declarative flag kinds (repeated, switch, negatable, choice, --config overrides)."""

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import snapshot
from slimjax.cli import COMMANDS, export, keydocs, main, prepare, prune, train
from slimjax.cli.flags import load_config_file
from slimjax.configs import base


def squeeze(text: str) -> str:
    """Text without whitespace: help is re-wrapped (also at hyphens), so compare it unwrapped."""
    return "".join(text.split())


def error_line(capsys, argv) -> str:
    """Runs the command expecting a one-line error with exit status 2; returns that line."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_of_every_command_lists_its_flags_with_help_and_defaults(name, capsys):
    _, command = COMMANDS[name]
    for flag in ("--help", "-h"):
        assert main([name, flag]) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.startswith(f"usage: slimjax {name}"), (out, err)
        assert squeeze(command.summary) in squeeze(out)
        for option in command.option_names():
            assert re.search(rf"{re.escape(option)}(?![\w-])", out), (option, out)
        for f in command.flags:
            assert squeeze(f.help) in squeeze(out), f.name
            if f.default not in (None, False, ""):
                assert squeeze(f"{f.help} (default: {f.default})") in squeeze(out), f.name


def test_help_wins_over_other_flags_and_actions(capsys):
    assert main(["prune", "--sparsty=3", "--help"]) == 0
    assert "--sparsity" in capsys.readouterr().out
    assert main(["tokenizer", "train", "-h"]) == 0
    assert "--out FILE.model" in capsys.readouterr().out


def test_slimjax_help_lists_commands_and_no_arguments_is_usage_on_stderr(capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name, (_, command) in COMMANDS.items():
        assert f"  {name}" in out and command.summary in out
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: slimjax COMMAND")
    assert all(f"  {name}" in err for name in COMMANDS)


def base_line(statement_start: str) -> int:
    """Index of the line of configs/base.py that starts with ``statement_start`` (after indentation)."""
    lines = inspect.getsource(base).splitlines()
    return next(i for i, line in enumerate(lines) if line.strip().startswith(statement_start))


def test_train_help_lists_every_config_key_with_its_value_and_base_py_comment(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    config = load_config_file("tiny")
    for key, value in keydocs.leaves(config):
        assert f"  {key} = {value!r}" in out, key
    lines = inspect.getsource(base).splitlines()
    # A trailing comment, read straight from the source line.
    steps = lines[base_line("t.steps =")].split("# ", 1)[1]
    row = next(line for line in out.splitlines() if line.strip().startswith("train.steps = "))
    assert row.endswith(steps) and "optimizer steps" in steps
    # A key documented by the comment block above it (slim.recipe has no trailing comment).
    i = base_line("slim.recipe =")
    block = []
    while lines[i - 1].strip().startswith("#"):
        i -= 1
        block.insert(0, lines[i].strip().lstrip("# "))
    row = next(line for line in out.splitlines() if line.strip().startswith("slim.recipe = "))
    assert block and row.endswith(" ".join(block))


def test_train_help_shows_the_values_of_the_config_given(capsys):
    assert main(["train", "--config=gpt2_small", "--help"]) == 0
    out = capsys.readouterr().out
    d_model = load_config_file("gpt2_small").model.d_model
    assert d_model != base.get_config().model.d_model and f"  model.d_model = {d_model} " in out
    assert "values of --config=gpt2_small" in out


def test_keydocs_reads_trailing_comments_blocks_and_nested_sections():
    source = '''
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.a = a = ml_collections.ConfigDict()
    a.x = 1  # the x
    # first line
    # second line
    a.y = (1,
           2)
    a.inner = inner = ml_collections.ConfigDict()
    inner.z = "z"  # deep
    c.plain = 3
    return c
'''
    assert keydocs.config_docs(source) == {"a": "", "a.x": "the x", "a.y": "first line second line", "a.inner": "",
                                           "a.inner.z": "deep", "plain": ""}


@pytest.mark.parametrize("argv,typed,meant", [
    (["generate", "--workdir=w", "--temp=1"], "--temp", "--temperature"),
    (["prune", "--workdir=w", "--out=o", "--sparsty=0.5"], "--sparsty", "--sparsity"),
    (["quantize", "--workdir=w", "--out=o", "--group=32"], "--group", "--group_size"),
    (["eval", "--workdir=w", "--max_doc=3"], "--max_doc", "--max_docs"),
    (["prepare", "--source=stdlib", "--out=o", "--no-dedupe"], "--no-dedupe", "--no-dedup"),
    (["train", "--workdri=w"], "--workdri", "--workdir"),
])
def test_a_misspelled_flag_names_the_nearest_flag_of_that_command(argv, typed, meant, capsys, tmp_path):
    os.chdir(tmp_path)  # relative --out/--workdir names: nothing may appear here
    line = error_line(capsys, argv)
    assert f"unknown flag {typed} (did you mean '{meant}'?)" in line and f"slimjax {argv[0]} --help" in line
    assert os.listdir(tmp_path) == []


def test_suggestions_come_from_the_commands_own_flags(capsys):
    line = error_line(capsys, ["eval", "--workdir=w", "--temperature=1"])  # a generate flag, not an eval one
    assert "unknown flag --temperature" in line and "did you mean" not in line


@pytest.mark.parametrize("argv,expected", [
    (["tokenizer", "fit", "--out=x.model"], "unknown action 'fit' for slimjax tokenizer; actions: train"),
    (["tokenizer", "--out=x.model"], "slimjax tokenizer needs an action first: train"),
    (["tokenizer", "train"], "slimjax tokenizer needs --out=FILE.model"),
    (["generate", "--workdir"], "flag --workdir needs a value (--workdir=VALUE)"),
    (["train", "--config.train.steps"], "flag --config.train.steps needs a value"),
    (["train", "stray"], "unexpected argument 'stray' to slimjax train"),
    (["export", "--workdir=w", "--adapters=maybe"], "--adapters='maybe' must be true or false"),
    (["export", "--workdir=w", "--architecture=BertModel"], "--architecture='BertModel' is not one of"),
    (["export", "--workdir=w", "--sparse", "--out=o"], "--sparse writes a sparse store alone"),
    (["report", "--workdir=w", "--repeats=0"], "--repeats=0 must be >= 1"),
    (["prepare", "--out=o"], "slimjax prepare needs --source=SPEC"),
    (["prepare", "--source=stdlib", "--out=o", "--verify=perhaps"], "--verify='perhaps' must be true or false"),
    (["quantize", "--workdir=w", "--out=o", "--candidates=2,x"], "--candidates='x' must be an integer"),
])
def test_bad_flags_are_one_line_naming_the_flag_or_action(argv, expected, capsys, tmp_path):
    os.chdir(tmp_path)
    assert expected in error_line(capsys, argv)
    assert os.listdir(tmp_path) == []


def test_flag_kinds_parse_as_declared(tmp_path):
    config, workdir = train.parse(["--config.train.steps", "7", "--config.model.d_model=64", "--workdir", "w"])
    assert (config.train.steps, config.model.d_model, workdir) == (7, 64, "w")
    config, workdir = train.parse(["--config=gpt2_small"])
    assert workdir == os.path.join("runs", "gpt2_small") and config.model.d_model == 768
    out = str(tmp_path / "new")
    v = prune.parse(["--workdir=w", f"--out={out}", "--target=a", "--target", "b", "--nm=2:4", "--sequential=false"])
    assert v.target == ["a", "b"] and v.nm == (2, 4) and v.sequential is False
    assert (v.method, v.sparsity, v.scope, v.calibration_samples) == ("magnitude", 0.5, "layer", 128)
    assert prune.parse(["--workdir=w", f"--out={out}"]).target == []
    assert export.COMMAND.parse(["--workdir=w", "--sparse"]).sparse == ""
    assert export.COMMAND.parse(["--workdir=w", "--sparse=d"]).sparse == "d"
    assert export.COMMAND.parse(["--workdir=w"]).sparse is None
    assert export.COMMAND.parse(["--workdir=w", "--adapters"]).adapters is True
    opts = prepare.parse(["--source=stdlib", "--source=shakespeare", "--out=o", "--no-dedup", "--verify",
                          "--threshold=0.7", "--workers=1"])
    assert [s.kind for s in opts.sources] == ["stdlib", "shakespeare"]
    assert (opts.dedup, opts.verify, opts.strict, opts.threshold, opts.workers) == (False, True, False, 0.7, 1)
    assert prepare.parse(["--source=stdlib", "--out=o", "--dedup=false", "--no_verify"]).dedup is False


def test_absl_script_prints_the_same_help(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "train.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == train.COMMAND.help(["--help"]) + "\n"
    assert os.listdir(tmp_path) == []


def test_export_refuses_an_architecture_of_another_family_and_writes_nothing(tmp_path, capsys):
    from hf_models import save

    run = str(tmp_path / "run")
    assert main(["import", f"--hf_dir={save('gpt2', str(tmp_path / 'hf'))}", f"--workdir={run}"]) == 0
    capsys.readouterr()
    before = snapshot(run)
    out = tmp_path / "out"
    line = error_line(capsys, ["export", f"--workdir={run}", f"--out={out}", "--architecture=LlamaForCausalLM"])
    assert "--architecture=LlamaForCausalLM is a llama model" in line and "is a gpt2 model" in line
    assert "--architecture=GPT2LMHeadModel" in line  # what to give instead
    assert not out.exists() and snapshot(run) == before
    # The run's own family is accepted and written as asked.
    assert main(["export", f"--workdir={run}", f"--out={out}", "--architecture=GPT2LMHeadModel"]) == 0
    with open(out / "config.json") as f:
        assert json.load(f)["architectures"] == ["GPT2LMHeadModel"]


def test_import_sets_the_runs_compute_dtype(tmp_path, capsys):
    from hf_models import save

    import slimjax

    hf = save("llama_gqa", str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    assert main(["import", f"--hf_dir={hf}", f"--workdir={run}", "--dtype=bfloat16"]) == 0
    loaded = slimjax.load_run(run)
    assert loaded.config.model.dtype == "bfloat16" and loaded.spec.model.dtype == "bfloat16"
    from slimjax.cli.flags import load_config_file

    assert load_config_file(os.path.join(run, "config.py")).model.dtype == "bfloat16"  # fine-tuning keeps it
    capsys.readouterr()
    line = error_line(capsys, ["import", f"--hf_dir={hf}", f"--workdir={tmp_path / 'other'}", "--dtype=fp8"])
    assert "--dtype='fp8' is not one of auto, float32, bfloat16, float16" in line
    assert not (tmp_path / "other").exists()
