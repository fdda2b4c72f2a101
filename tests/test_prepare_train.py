"""The documented path `slimjax prepare` -> `slimjax train` with the slimpajama preset, through the
CLI: a RedPajama-layout corpus (set directories, records without a set name) is prepared, its
output names every record's set, and training reads it; a prepared corpus with no RedPajama set
is refused in one line that says so."""

import glob
import json
import os

import numpy as np
import zstandard

from data_helpers import TINY_TRAIN, cli, one_line_error
from helpers import snapshot
from slimjax.data import sources

# RedPajama-Data-1T's directories, one per set (common_crawl has a snapshot level below it).
SET_DIRS = {"arxiv": "arxiv", "book": "book", "c4": "c4", "common_crawl": "common_crawl/2019-30",
            "github": "github", "stackexchange": "stackexchange", "wikipedia": "wikipedia"}


def write_redpajama(root, docs_per_set=12):
    """Per set a JSON Lines file of pseudo-random documents; records carry meta, not the set name,
    except one file in the SlimPajama form (meta.redpajama_set_name) that must win over its directory."""
    rng = np.random.default_rng(11)
    words = [f"w{i}" for i in range(150)]
    for d, sub in SET_DIRS.items():
        rows = [{"text": " ".join(rng.choice(words, 90)), "meta": {"source": d}} for _ in range(docs_per_set)]
        path = root / sub / f"{d}_part0.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    named = [{"text": " ".join(rng.choice(words, 90)), "meta": {sources.SET_NAME_KEY: "RedPajamaGithub"}}
             for _ in range(3)]
    (root / "c4" / "slim.jsonl").write_text("".join(json.dumps(r) + "\n" for r in named))


def set_names(out):
    """{split: {set name: records}} of a prepared output."""
    found = {}
    for f in glob.glob(f"{out}/*/**/*.jsonl.zst", recursive=True):
        split = os.path.relpath(f, out).split(os.sep)[0]
        with open(f, "rb") as fh:
            lines = zstandard.ZstdDecompressor().stream_reader(fh).read().decode().splitlines()
        for line in lines:
            name = json.loads(line)["meta"][sources.SET_NAME_KEY]
            found.setdefault(split, {}).setdefault(name, 0)
            found[split][name] += 1
    return found


def test_prepare_then_train_with_the_slimpajama_preset(tmp_path, capsys):
    write_redpajama(tmp_path / "RedPajama")
    out, workdir = tmp_path / "sp", tmp_path / "run"
    status, _, err = cli(capsys, "prepare", f"--source=slimpajama:{tmp_path}/RedPajama/**/*.jsonl",
                         f"--out={out}", "--heldout=0.1", "--workers=1")
    assert status == 0, err[-2000:]
    names = set_names(out)
    assert set(names["train"]) == set(sources.SLIMPAJAMA_MIXTURE) and names["validation"]
    # 12 per set directory, 3 more for GitHub from the file that names its set (under c4/).
    assert sum(n for split in names.values() for n in split.values()) == 7 * 12 + 3
    assert sum(split.get("RedPajamaGithub", 0) for split in names.values()) == 15
    preset = {"kind": "slimpajama", "path": f"{out}/train/**/*.jsonl.zst",
              "eval_path": f"{out}/validation/**/*.jsonl.zst"}
    status, _, err = cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320",
                         f"--config.data.sources=({preset!r},)", f"--workdir={workdir}")
    assert status == 0, err[-2000:]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["final_step"] == 2 and np.isfinite(summary["final_eval_loss"])
    per_set = summary["data"]["sources"]
    assert set(per_set) == set(sources.SLIMPAJAMA_MIXTURE)
    # Every set read as many training documents as the prepared output holds for it.
    assert {k: v["documents"] for k, v in per_set.items()} == names["train"]


def test_the_preset_on_a_corpus_without_redpajama_sets_says_so(tmp_path, capsys):
    rng = np.random.default_rng(12)
    (tmp_path / "txt").mkdir()
    for i in range(20):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(" ".join(rng.choice([f"w{i}" for i in range(99)], 80)))
    out, workdir = tmp_path / "prepared", tmp_path / "run"
    status, _, err = cli(capsys, "prepare", f"--source=text:{tmp_path}/txt", f"--out={out}", "--heldout=0.2",
                         "--workers=1")
    assert status == 0, err[-2000:]
    preset = {"kind": "slimpajama", "path": f"{out}/train/**/*.zst", "eval_path": f"{out}/validation/**/*.zst"}
    line = one_line_error(cli(capsys, "train", *TINY_TRAIN, "--config.model.vocab_size=320",
                              f"--config.data.sources=({preset!r},)", f"--workdir={workdir}"))
    assert f"data source 'slimpajama:{out}/train/**/*.zst': no documents with a RedPajama set name" in line
    assert "set names found: text (" in line and "use kind 'jsonl'" in line
    assert "held-out" not in line and snapshot(str(workdir)) == {}
