"""The Colab notebooks in colab/: each runs top to bottom on CPU, each .ipynb is in sync with its
jupytext source and carries no outputs, and each has an "Open in Colab" link.

A notebook runs in a fresh kernel (nbclient) in a temporary directory with its cell tagged
``parameters`` replaced by ``PARAMETERS[name]`` (papermill's convention), which keeps it small; a
failing cell fails the test with that cell's error. The kernel inherits the environment that
tests/conftest.py sets: 8 fake CPU devices and the suite's XLA compilation cache.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(COLAB, "*.py")))

# What CI runs instead of each notebook's parameters cell: the same names, tiny values.
PARAMETERS = {
    "quickstart": "STEPS = 12\nLARGER = False\nWORKDIR = 'runs/quickstart'",
    "sharding": "STEPS = 4\nWORKDIR = 'runs/sharding'",
    "data": "DOCUMENTS = 120\nCORPUS, OUT = 'corpus', 'prepared'",
    "slimming": ("STEPS = 8\nDISTILL_STEPS = 2\nCALIBRATION = ['--calibration_samples=8', '--sequential=false']\n"
                 "REPORT = ['--report_docs=2', '--repeats=1']\nBASE, OUT = 'runs/base', 'runs/compressed'"),
    "huggingface": "STEPS = 6\nHF_DIR, RUN, FINETUNED, EXPORTED = 'hf/tiny', 'runs/imported', 'runs/lora', 'hf/lora'",
}


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_has_ci_parameters():
    assert NAMES and sorted(PARAMETERS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync_and_outputs_stripped(name):
    source = jupytext.read(os.path.join(COLAB, f"{name}.py"))
    notebook = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
    assert cells(notebook) == cells(source), (f"colab/{name}.ipynb and colab/{name}.py differ; run "
                                              f"`jupytext --sync colab/{name}.py`")
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"colab/{name}.ipynb has outputs"
    assert sum("parameters" in c.metadata.get("tags", ()) for c in code) == 1


def test_every_notebook_starts_with_the_same_install_cell():
    """.ci/colab_install.py runs quickstart's install cell in a fresh virtualenv; this makes that
    check hold for every notebook."""
    first = {name: next(c.source for c in jupytext.read(os.path.join(COLAB, f"{name}.py")).cells
                        if c.cell_type == "code") for name in NAMES}
    assert len(set(first.values())) == 1, first
    assert "pip" in first["quickstart"] and "SLIMJAX_SOURCE" in first["quickstart"]


@pytest.mark.parametrize("name", NAMES)
def test_open_in_colab_links(name):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        repo = tomllib.load(f)["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repo).group(1)
    link = f"https://colab.research.google.com/github/{owner_repo}/blob/main/colab/{name}.ipynb"
    for doc in ("README.md", "colab/README.md"):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            assert link in f.read(), f"{doc} lacks the Colab link of {name}: {link}"
    with open(os.path.join(COLAB, f"{name}.py"), encoding="utf-8") as f:
        assert f"git+{repo}" in f.read(), f"colab/{name}.py does not install from {repo}"


def execute(name: str, workdir: str) -> nbformat.NotebookNode:
    """Runs colab/NAME in a fresh kernel inside ``workdir`` with the CI parameters; returns it executed."""
    notebook = jupytext.read(os.path.join(COLAB, f"{name}.py"))
    for cell in notebook.cells:
        if "parameters" in cell.metadata.get("tags", ()):
            cell.source = PARAMETERS[name]
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
    nbformat.write(notebook, os.path.join(workdir, f"{name}.ipynb"))  # kept for a look at the figures
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu(name, tmp_path):
    notebook = execute(name, str(tmp_path))
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert outputs(notebook, "image/png"), f"{name} drew no figure"
