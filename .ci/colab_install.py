"""CI step: the notebooks' install cell, run in a fresh virtualenv that has nothing but Python,
installs slimjax from this checkout (as Colab installs it from GitHub) and the result works.

Run by .ci/run with the test environment's Python (it has jupytext); the new virtualenv gets only
what the install cell's ``pip install`` pulls from the package registry.
"""

import os
import subprocess
import sys
import tempfile
import venv

import jupytext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = """
import os, sys, slimjax
assert os.path.realpath(slimjax.__file__).startswith(os.path.realpath(sys.prefix)), slimjax.__file__
config = slimjax.configs.tiny.get_config()
config.train.update(steps=2, global_batch_size=4, eval_batches=1, sample_tokens=0, progress=False)
config.data.seq_len = 32
print(slimjax.explain(config).notes[0])
print(slimjax.train(config, os.path.join(sys.argv[1], "run"))["final_step"], "steps trained from the installed package")
"""


def install_cell() -> str:
    """The first code cell of the quickstart notebook (tests/test_notebooks.py checks that every
    notebook starts with the same one)."""
    notebook = jupytext.read(os.path.join(ROOT, "colab", "quickstart.py"))
    return next(c.source for c in notebook.cells if c.cell_type == "code")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = os.path.join(tmp, "venv")
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = os.path.join(env_dir, "bin", "python")
        env = {**os.environ, "SLIMJAX_SOURCE": ROOT}
        env.pop("PYTHONPATH", None)
        subprocess.run([python, "-c", install_cell()], check=True, env=env, cwd=tmp)
        subprocess.run([python, "-c", SMOKE, tmp], check=True, env=env, cwd=tmp)
    print("the notebooks' install cell works in a fresh virtualenv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
