# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Data: clean and near-deduplicate a corpus the way SlimPajama was made
#
# SlimPajama is RedPajama after cleaning and MinHash near-deduplication (627B of 1.2T tokens
# kept). `slimjax prepare` runs that recipe on any corpus: NFC normalisation and a short-document
# filter, MinHash signatures over character 13-grams, LSH bands to find candidate pairs (optionally
# checked by exact Jaccard), clusters, one document kept per cluster, a held-out split and
# decontamination, then SlimPajama-layout `jsonl.zst` shards and a `report.json`.
#
# This notebook builds a small corpus in RedPajama's directory layout with duplicates planted in
# it, runs `prepare`, and checks that what it removed is what was planted.

# %%
# Install slimjax into this runtime: from GitHub on Colab, or from SLIMJAX_SOURCE (a local checkout)
# when that is set; nothing happens where slimjax is already installed.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("slimjax") is None:
    source = os.environ.get("SLIMJAX_SOURCE", "git+https://github.com/slimjax/slimjax")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", source], check=True)

# %%
import glob
import json
import random

import slimjax

# %% tags=["parameters"]
DOCUMENTS = 600  # original documents before duplicates are planted
CORPUS, OUT = "corpus", "prepared"

# %% [markdown]
# ## A corpus with known duplicates
#
# The documents are Python's own standard-library modules (every runtime has them), cut into
# pieces of a few thousand characters and spread over four RedPajama sets. Then we plant
# duplicates the way the web makes them: exact copies, copies with a few words changed, and copies
# with a paragraph appended, one to three of them per copied document, in other files.

# %%
rng = random.Random(0)
pieces = []
for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
    text = open(path, encoding="utf-8", errors="replace").read()
    pieces += [text[i:i + 3000] for i in range(0, len(text), 3000) if len(text[i:i + 3000]) > 1000]
originals = rng.sample(pieces, min(DOCUMENTS, len(pieces)))


def edited(text: str, words: int) -> str:
    """``text`` with ``words`` of its words replaced: a near-duplicate."""
    tokens = text.split(" ")
    for i in rng.sample(range(len(tokens)), words):
        tokens[i] = "changed"
    return " ".join(tokens)


planted = {}  # index of an original -> indices of its copies
copies = []
for i in rng.sample(range(len(originals)), len(originals) // 6):
    planted[i] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):  # some documents are copied more than once
        kind = rng.choice(["exact", "words", "appended"])
        copies.append({"exact": originals[i], "words": edited(originals[i], 5),
                       "appended": originals[i] + "\n# A note added by someone else.\n"}[kind])
        planted[i].append(len(originals) + len(copies) - 1)

SETS = ["arxiv", "book", "c4", "github"]
docs = originals + copies
rng.shuffle(order := list(range(len(docs))))
for n, k in enumerate(order):
    folder = os.path.join(CORPUS, SETS[n % len(SETS)])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"part_{n % 3}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[k], "meta": {"doc": k}}) + "\n")
print(f"{len(originals)} documents + {len(copies)} planted copies of {len(planted)} of them in "
      f"{len(glob.glob(CORPUS + '/*/*.jsonl'))} files")

# %% [markdown]
# ## Prepare
#
# `--threshold=0.7 --verify` merges documents whose 13-gram sets overlap by 70% or more, with every
# candidate pair from LSH re-checked by exact Jaccard (SlimPajama used 0.8 without the check).
# Each record's set comes from its RedPajama directory.

# %%
slimjax.run_command("prepare", f"--source=slimpajama:{CORPUS}/**/*.jsonl", f"--out={OUT}", "--threshold=0.7",
                    "--verify", "--heldout=0.05", "--workers=2")
report = json.load(open(os.path.join(OUT, "report.json")))
print(sorted(os.listdir(OUT)))

# %% [markdown]
# `prepare` printed the report per RedPajama set: documents in, removed as too short, as
# near-duplicates and as contaminated (a training document equal to a held-out one), and what was
# written to train and held-out. Every record keeps its `meta`, so we can check the result
# document by document: of each planted cluster exactly one document survives, and every original
# that was not copied survives (the standard library repeats itself in a few places, which would
# show up here as extra removals).

# %%
import io

import zstandard

kept = set()
for path in glob.glob(os.path.join(OUT, "**", "*.jsonl.zst"), recursive=True):
    with open(path, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            kept.add(json.loads(line)["meta"]["doc"])
clusters_kept_once = sum(sum(d in kept for d in (i, *c)) == 1 for i, c in planted.items())
lost_originals = [i for i in range(len(originals)) if i not in planted and i not in kept]
print(f"planted clusters with exactly one survivor: {clusters_kept_once} of {len(planted)}")
print(f"originals never copied but removed anyway: {len(lost_originals)}")
print(f"clusters: {report['clusters']['count']}, largest {report['clusters']['largest']} documents; LSH",
      {k: report["lsh"][k] for k in ("bands", "rows", "threshold", "verify")})
assert clusters_kept_once == len(planted)

# %% [markdown]
# ## Cluster sizes
#
# An original and its copies make one cluster of two to four documents; the histogram should match
# what was planted (a text the standard library itself repeats would add to it).

# %%
import matplotlib.pyplot as plt

histogram = {int(size): count for size, count in report["clusters"]["size_histogram"].items()}
fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
ax.bar([str(s) for s in sorted(histogram)], [histogram[s] for s in sorted(histogram)])
ax.set_xlabel("documents in the cluster")
ax.set_ylabel("clusters")
ax.set_title("Near-duplicate clusters found by prepare")
plt.show()
print("planted:", {n: sum(len(c) + 1 == n for c in planted.values()) for n in sorted({len(c) + 1 for c in planted.values()})})

# %% [markdown]
# ## Train on the output
#
# The output is SlimPajama's own layout, so the `slimpajama` source kind (with its 7-set mixture
# weights; the sets present here get them renormalised) or plain `jsonl` trains on it:
#
# ```
# slimjax train --config.data.sources="({'kind': 'jsonl', 'path': 'prepared/train/**/*.jsonl.zst',
#                                        'eval_path': 'prepared/validation/**/*.jsonl.zst'},)"
# ```
#
# Time per stage and the peak memory of each process are in the report too:

# %%
print({stage: f"{seconds:.2f} s" for stage, seconds in report["stages_s"].items()})
print(f"{report['input_mb']:.1f} MB in at {report['mb_per_s']:.1f} MB/s; peak RSS {report['peak_rss_mb']}")
