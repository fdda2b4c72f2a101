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
# # slimjax quickstart: train a small language model, sample it, evaluate it
#
# This notebook trains a Llama-style decoder on Shakespeare's plays (they ship with slimjax, so
# nothing is downloaded), draws the loss while it trains, samples text from it and measures it on
# three plays it never saw. It runs on whatever this runtime has: a CPU, one GPU or a TPU.

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

# %% [markdown]
# JAX finds the accelerator by itself. `jax.devices()` lists what this runtime offers; on a Colab
# CPU runtime that is one CPU device, on a GPU runtime one GPU, on a TPU runtime its TPU cores.

# %%
import jax

import slimjax

BACKEND = jax.default_backend()
print(f"backend: {BACKEND}; {jax.device_count()} device(s): {jax.devices()}")

# %% [markdown]
# The sizes follow the backend: the bundled `tiny` model (about 1M parameters) on a CPU, a model
# about twenty times larger with longer rows on a GPU or TPU. The next cell is the only one to
# edit for a longer or shorter run.

# %% tags=["parameters"]
STEPS = 300 if BACKEND == "cpu" else 1500
LARGER = BACKEND != "cpu"
WORKDIR = "runs/quickstart"

# %% [markdown]
# ## Configure
#
# A run is described by one config (an `ml_collections.ConfigDict`; every key is documented in
# `configs/base.py`). We start from the bundled `tiny` config and change what we need. The mesh
# uses every device for data parallelism (`mesh.data = -1`), so the same config fits one CPU or
# eight TPU cores.

# %%
config = slimjax.configs.tiny.get_config()
config.train.steps = STEPS
config.train.eval_every = max(STEPS // 4, 1)
config.train.log_every = max(STEPS // 30, 1)
config.train.sample_tokens = 0  # we sample below instead
config.train.progress = False  # the live plot is the progress display
config.mesh.data = -1
if LARGER:
    config.model.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=1536, max_seq_len=512)
    config.data.seq_len = 256
    config.train.global_batch_size = 16 * jax.device_count()
print(f"{config.model.n_layers} layers, d_model {config.model.d_model}, "
      f"batch {config.train.global_batch_size} x {config.data.seq_len} tokens, {STEPS} steps")

# %% [markdown]
# Before anything is compiled, `slimjax.explain` shows where each parameter will live on the mesh:
# its logical axis names, the partition spec the rules give it, and what each device holds.

# %%
slimjax.explain(config)

# %% [markdown]
# ## Train
#
# `slimjax.train` is the same function the `slimjax train` command calls. Hooks add periodic work
# to its loop; `slimjax.live_loss_plot` redraws the training and held-out loss in this cell's
# output as the run goes. Checkpoints, TensorBoard event files and `metrics.jsonl` go to `WORKDIR`
# (re-running this cell resumes from the last checkpoint).

# %%
summary = slimjax.train(config, WORKDIR, hooks=[slimjax.live_loss_plot(every=max(STEPS // 10, 1))])
print({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items() if "loss" in k or "step" in k})

# %% [markdown]
# The same curves are in TensorBoard; in Colab, a cell with these two lines opens it inline:
#
# ```
# %load_ext tensorboard
# %tensorboard --logdir runs/quickstart/tensorboard
# ```

# %% [markdown]
# ## Sample
#
# `slimjax.load_run` reads the latest checkpoint back (sharded by the run's rules on its mesh) with
# the run's own tokenizer. `slimjax.generate` decodes with a KV cache; greedy unless a
# temperature is given.

# %%
run = slimjax.load_run(WORKDIR)
for text in slimjax.generate(run, ["ROMEO:", "KING HENRY:"], max_new_tokens=40, temperature=0.8, top_k=40):
    print(text, end="\n---\n")

# %% [markdown]
# ## Evaluate
#
# Loss, perplexity and bits per byte on the held-out plays (*Hamlet*, *The Tempest*, *Twelfth
# Night*), every token scored once. Bits per byte divides by the text's UTF-8 bytes rather than
# tokens, so it compares across tokenizers; a uniform guess over 256 byte values would score 8.

# %%
scores = slimjax.evaluate(run, max_docs=8)
print(f"held-out loss {scores['loss']:.3f} nats/token, perplexity {scores['perplexity']:.1f}, "
      f"{scores['bits_per_byte']:.3f} bits per byte over {scores['tokens']:.0f} tokens")
assert scores["bits_per_byte"] < 8, "the model should beat a uniform guess over bytes"

# %% [markdown]
# Next: `sharding.ipynb` lays the same model out over meshes of other shapes,
# `huggingface.ipynb` brings a Llama checkpoint in and out, `data.ipynb` deduplicates a corpus,
# and `slimming.ipynb` makes this model smaller and says what really got smaller.
