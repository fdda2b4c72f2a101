"""Every ```python and ```bash block of README.md runs, so the README cannot drift from the code.

How a block runs (new blocks are picked up automatically):

- All blocks share one temporary directory as the working directory, holding links to the
  checkout's ``configs/`` and ``scripts/``, a tiny trained ``runs/tiny`` (what the README's
  commands default to; ``runs/base`` is the same run) and the inputs README commands name
  (``prompts.txt``; ``path/to/Llama-3.2-1B``: a random tiny Llama with a tokenizer). Paths under
  ``/data/`` and ``/shared/`` are redirected into the directory.
- Shell blocks are split into commands (``\\`` continuations joined, comments dropped). A
  ``slimjax CMD ...`` command runs in this process (``slimjax.cli.main``) with ``OVERRIDES[CMD]``
  replacing or adding flags, so a documented 1000-step run takes two tiny steps; any other
  command runs under ``bash`` with the same overrides applied by ``slimjax`` and ``python
  scripts/train.py`` shims on ``PATH``.
- Python blocks run in this process with ``slimjax.configs.<name>.get_config`` returning the
  config with the ``train`` overrides applied.
- A block that cannot run here is preceded by ``<!-- readme-test: skip (reason) -->``; the
  reason is required, and every other block is a test of its own that must pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest
from hf_models import save

import slimjax
from slimjax.cli import main
from slimjax.cli.flags import apply_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")

# Flags each command gets (replacing the README's value of the same flag): tiny runs, few docs.
TRAIN = ["--config.train.steps=2", "--config.train.global_batch_size=32", "--config.data.seq_len=32",
         "--config.train.eval_batches=1", "--config.train.sample_tokens=4", "--config.train.progress=false",
         "--config.train.log_every=1", "--config.checkpoint.every_steps=2"]
OVERRIDES: dict[str, list[str]] = {
    "train": TRAIN,
    "tokenize": [f for f in TRAIN if f.startswith(("--config.train.global_batch_size", "--config.data.seq_len"))],
    "eval": ["--max_docs=2", "--batch_size=8"],
    "generate": ["--max_new_tokens=4"],
    "prune": ["--calibration_samples=8", "--sequential=false"],  # one calibration pass, not one per block
    "quantize": ["--calibration_samples=8", "--sequential=false"],
    "lowrank": ["--calibration_samples=8"],
    "report": ["--max_docs=2", "--batch_size=8", "--repeats=1"],
    "distill": ["--steps=2"],
    "compress": ["--report_docs=2", "--repeats=1"],
}
REDIRECT = ("/data/", "/shared/")  # absolute paths in examples, moved into the test directory


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the marker's reason


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order; the skip marker is the last non-blank line before a fence."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(before)
        out.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]), marker and marker.group("reason")))
        i = end + 1
    return out


BLOCKS = [b for b in readme_blocks(open(README, encoding="utf-8").read()) if b.lang in ("python", "bash")]


def shell_commands(code: str) -> list[str]:
    """Logical commands of a shell block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with each ``--name=value`` of ``extra`` replacing the same flag (or added)."""
    names = {flag.split("=", 1)[0] for flag in extra}
    return [a for a in argv if a.split("=", 1)[0] not in names] + extra


def redirect(text: str, root: str) -> str:
    for prefix in REDIRECT:
        text = text.replace(prefix, os.path.join(root, prefix.strip("/")) + "/")
    return text


SHIM = '''#!{python}
import os, sys
sys.path.insert(0, {tests!r})
from test_readme import OVERRIDES, TRAIN, with_overrides
argv = sys.argv[1:]
if {kind!r} == "slimjax":
    argv = ["-m", "slimjax.cli", argv[0], *with_overrides(argv[1:], OVERRIDES.get(argv[0], []))]
elif argv[:1] == ["scripts/train.py"]:
    argv = [argv[0], *with_overrides(argv[1:], TRAIN)]
os.execv({python!r}, [{python!r}, *argv])
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, spm_path):
    """The shared working directory: links to configs/ and scripts/, runs/tiny (2 steps), inputs."""
    root = str(tmp_path_factory.mktemp("readme"))
    for name in ("configs", "scripts"):
        os.symlink(os.path.join(ROOT, name), os.path.join(root, name))
    bin_dir = os.path.join(root, ".bin")
    os.makedirs(bin_dir)
    for kind in ("slimjax", "python"):
        path = os.path.join(bin_dir, kind)
        with open(path, "w") as f:
            f.write(SHIM.format(python=sys.executable, tests=os.path.dirname(__file__), kind=kind))
        os.chmod(path, 0o755)
    with open(os.path.join(root, "prompts.txt"), "w") as f:
        f.write("ROMEO:\nTo be, or not\n")
    save("llama_gqa", os.path.join(root, "path", "to", "Llama-3.2-1B"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", *TRAIN, f"--config.data.tokenizer={spm_path}", "--workdir=runs/tiny"]) == 0
        os.symlink("tiny", os.path.join("runs", "base"))
        yield root
    finally:
        os.chdir(cwd)


def small_stages(stages: str) -> str:
    """A ``slimjax compress`` recipe with each stage's command overrides applied."""
    out = []
    for stage in stages.split(";"):
        name, *flags = shlex.split(stage)
        out.append(shlex.join([name, *with_overrides(flags, OVERRIDES.get(name, []))]))
    return "; ".join(out)


def in_process(argv: list[str]) -> int:
    """``slimjax ARGV`` with the overrides, in this process; compress recipes (given or preset) get
    the overrides of each of their stages."""
    command, flags = argv[0], with_overrides(argv[1:], OVERRIDES.get(argv[0], []))
    if command != "compress":
        return main([command, *flags])
    from slimjax.cli import compress

    flags = [f"--stages={small_stages(f.split('=', 1)[1])}" if f.startswith("--stages=") else f for f in flags]
    presets = dict(compress.PRESETS)
    compress.PRESETS.update({name: small_stages(stages) for name, stages in presets.items()})
    try:
        return main([command, *flags])
    finally:
        compress.PRESETS.update(presets)


def simple(command: str) -> bool:
    """Whether ``command`` is one program call (no ``;``, ``&&``, pipes or background jobs outside quotes)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return not any(set(token) <= set(";&|") for token in lexer)


def run_shell(command: str, root: str) -> None:
    argv = shlex.split(command, comments=True)
    if argv[0] == "slimjax" and simple(command):
        status = in_process(argv[1:])
        assert status == 0, f"`{command}` exited {status}"
        return
    env = dict(os.environ, PATH=os.path.join(root, ".bin") + os.pathsep + os.environ["PATH"])
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"`{command}` exited {done.returncode}: {done.stderr[-3000:]}"


@contextlib.contextmanager
def small_configs():
    """``slimjax.configs.<name>.get_config()`` with the train overrides applied, while a Python block runs."""
    originals = {}
    for name in ("tiny", "gpt2_small", "llama_1b"):
        module = getattr(slimjax.configs, name)
        originals[module] = module.get_config

        def patched(get=module.get_config):
            config = get()
            for flag in TRAIN:
                dotted, value = flag[len("--config."):].split("=", 1)
                apply_override(config, dotted, value)
            return config

        module.get_config = patched
    try:
        yield
    finally:
        for module, get in originals.items():
            module.get_config = get


RUNNABLE = [b for b in BLOCKS if not b.skip]


def test_every_block_runs_or_is_marked_with_a_reason():
    """The harness sees the README's blocks; markers sit on blocks (none dangles) and give reasons."""
    text = open(README, encoding="utf-8").read()
    assert len(RUNNABLE) >= 8 and len(BLOCKS) == len(re.findall(r"^```(?:python|bash)\s*$", text, re.M))
    assert len(SKIP.findall(text)) == len(BLOCKS) - len(RUNNABLE)
    assert all(b.skip.strip() for b in BLOCKS if b.skip)


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"L{b.line}-{b.lang}" for b in RUNNABLE])
def test_readme_block_runs(block, workspace):
    code = redirect(block.code, workspace)
    if block.lang == "bash":
        for command in shell_commands(code):
            run_shell(command, workspace)
    else:
        with small_configs():
            exec(compile(code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
