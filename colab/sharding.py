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
# # Sharding: logical axis names, one rules table, meshes of any shape
#
# slimjax models never mention devices. Every parameter and activation dimension carries a
# *logical* name (`embed`, `heads`, `mlp`, `vocab`, `batch`, ...), and one rules table maps those
# names onto the axes of a device mesh (`data`, `fsdp`, `tensor`). Change the mesh and the same
# model lays itself out differently, with the same numbers coming out. This notebook shows that on
# eight devices: a TPU's cores when the runtime has eight, otherwise eight CPU devices that XLA
# fakes on the host (the way slimjax's own tests run).

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
# The host platform only splits into eight devices if XLA is told so before JAX starts, hence this
# cell comes before `import jax`. It changes nothing on a GPU or TPU: those keep their own devices.

# %%
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax
import numpy as np

import slimjax
from slimjax.sharding import DEFAULT_RULES, build_mesh, device_bytes

DEVICES = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")[:8]
print(f"laying out on {len(DEVICES)} {DEVICES[0].platform} devices")

# %% tags=["parameters"]
STEPS = 100
WORKDIR = "runs/sharding"

# %% [markdown]
# ## The rules table
#
# Each logical name maps to zero or more mesh axes. `embed` on `fsdp` shards every weight's model
# dimension over the FSDP axis (ZeRO-3 style); `heads`, `mlp` and `vocab` on `tensor` are
# Megatron-style tensor parallelism; `batch` on `data` and `fsdp` splits the rows of every batch.
# A config overrides entries (`mesh.rules`), never restates the table.

# %%
for name, axes in DEFAULT_RULES.items():
    print(f"{name:>14} -> {', '.join(axes) if axes else 'replicated'}")

# %% [markdown]
# ## One model, three layouts, before anything runs
#
# `slimjax.explain(config, devices)` builds the model abstractly (shapes only, nothing allocated)
# and applies the rules to the mesh the config asks for. Here is the tiny config on three meshes
# of eight devices: pure data parallelism, FSDP, and a 2 x 2 x 2 mix.

# %%
LAYOUTS = {"data=8": dict(data=8, fsdp=1, tensor=1),
           "fsdp=8": dict(data=1, fsdp=8, tensor=1),
           "data=2 fsdp=2 tensor=2": dict(data=2, fsdp=2, tensor=2)}
config = slimjax.configs.tiny.get_config()
tables = {}
for layout, sizes in LAYOUTS.items():
    config.mesh.update(sizes)
    tables[layout] = slimjax.explain(config, DEVICES)
    print(f"{layout:>24}: {tables[layout].notes[0]}")

# %% [markdown]
# The whole table for the mixed layout: the partition spec says which mesh axis splits which
# dimension, the per-device shape is what each device really holds.

# %%
tables["data=2 fsdp=2 tensor=2"]

# %% [markdown]
# ## Train once, then restore onto each layout
#
# We train the tiny model for a few steps on the default mesh, then read its checkpoint back onto
# each layout: Orbax restores every parameter straight into the sharding the rules give it on the
# new mesh.

# %%
config = slimjax.configs.tiny.get_config()
config.train.update(steps=STEPS, sample_tokens=0, progress=False, eval_every=STEPS)
summary = slimjax.train(config, WORKDIR)
print(f"trained {summary['final_step']} steps, train loss {summary['final_train_loss']:.3f}")

# %%
runs = {layout: slimjax.load_run(WORKDIR, mesh=build_mesh(**sizes, devices=DEVICES))
        for layout, sizes in LAYOUTS.items()}

# %% [markdown]
# `jax.debug.visualize_array_sharding` draws which device holds which block of a 2-D array. The
# token embedding table (`vocab` x `embed`) is replicated over `data`, split by columns over
# `fsdp`, and by rows over `tensor`:

# %%
for layout, run in runs.items():
    print(layout)
    jax.debug.visualize_array_sharding(run.params["embed"]["embedding"])

# %% [markdown]
# ## The same loss on every layout
#
# Sharding changes where the arithmetic happens, not what it computes: the held-out loss agrees
# across layouts to float32 rounding (summation order differs when a reduction is split).

# %%
losses = {layout: slimjax.evaluate(run, max_docs=4, batch_size=16)["loss"] for layout, run in runs.items()}
for layout, loss in losses.items():
    print(f"{layout:>24}: held-out loss {loss:.6f}")
spread = max(losses.values()) - min(losses.values())
print(f"largest difference: {spread:.2e}")
assert spread < 1e-4, losses

# %% [markdown]
# ## Memory per device
#
# What each device holds of the parameters, measured on the restored arrays themselves. Data
# parallelism keeps a whole copy on every device; FSDP divides the weights by eight (the small
# norm scales stay replicated); the mixed layout sits in between.

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
for k, (layout, run) in enumerate(runs.items()):
    per_device = np.array(list(device_bytes(run.params).values())) / 2**20
    ax.bar(np.arange(len(per_device)) + 0.27 * (k - 1), per_device, 0.27, label=layout)
    assert per_device.sum() > 0
ax.set_xlabel("device")
ax.set_ylabel("parameter MiB on the device")
ax.set_title("Parameters held per device, by layout")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown]
# Optimizer moments take their parameter's sharding, so under FSDP they shrink by the same
# factor; activations split along `batch` over `data` and `fsdp`. The `slimjax train` flags
# `--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` select the same layouts for
# a training run.
