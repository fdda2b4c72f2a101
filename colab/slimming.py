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
# # Slimming: prune, distil, quantize, and what really got smaller
#
# slimjax's slimming methods are transforms on a trained run, each writing a new run directory.
# `slimjax compress` chains them: here Wanda pruning to 50% sparsity, a short distillation that
# retrains the pruned model against the original as its teacher, then 4-bit GPTQ quantization.
# Every stage is reported against the original: parameters, bytes in memory and on disk,
# held-out perplexity and latency, and which savings are real on this backend and which are
# size-only.

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
import json

import jax

import slimjax

print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s)")

# %% tags=["parameters"]
STEPS = 300  # training steps of the model we slim
DISTILL_STEPS = 100
CALIBRATION = ["--calibration_samples=64"]  # rows of the training stream that prune and quantize calibrate on
REPORT = ["--report_docs=16", "--repeats=3"]
BASE, OUT = "runs/base", "runs/compressed"

# %% [markdown]
# ## The model to slim
#
# The bundled tiny Llama-style model, trained on the plays (on a CPU this takes a few minutes;
# re-running the cell resumes instead of retraining).

# %%
config = slimjax.configs.tiny.get_config()
config.train.update(steps=STEPS, sample_tokens=0, progress=False, eval_every=STEPS)
summary = slimjax.train(config, BASE)
print(f"{summary['final_step']} steps, held-out loss {summary['final_eval_loss']:.3f}")

# %% [markdown]
# ## Prune, distil, quantize
#
# One command, three stages; each reads the previous stage's run and writes `OUT/stages/K-NAME`.
# A stage's flags are the flags of the command of the same name (`slimjax prune --help`, ...).
# Killed anywhere, the same command resumes where it stopped.

# %%
stages = "; ".join([
    " ".join(["prune --method=wanda --sparsity=0.5", *CALIBRATION]),
    f"distill --steps={DISTILL_STEPS} --alpha=0.5 --temperature=2",
    " ".join(["quantize --bits=4 --group_size=64 --method=gptq", *CALIBRATION]),
])
slimjax.run_command("compress", f"--workdir={BASE}", f"--out={OUT}", f"--stages={stages}", *REPORT)

# %% [markdown]
# The table above is also `OUT/compress.json`. The verdicts matter as much as the ratios: 50%
# unstructured sparsity keeps every matrix at its shape, so XLA still multiplies the zeros (the
# saving is bytes on disk once stored sparse, not speed), and 4-bit codes are dequantized before
# each product on this backend (a saving in bytes, not in time).

# %%
result = json.load(open(os.path.join(OUT, "compress.json")))
for stage in result["stages"]:
    for verdict in stage["verdicts"]:
        print(f"{stage['stage']:>12}  {verdict['saving']}: {verdict['verdict']}")

# %% [markdown]
# ## Perplexity against size
#
# Each point is a run: held-out perplexity against the bytes of its smallest stored copy (dense
# parameters for the original; the sparse store after pruning; packed codes and scales after
# quantization). Down and to the left is better.

# %%
import matplotlib.pyplot as plt

original = result["original"]
base_bytes = original["disk"]["checkpoint_param_bytes"]
points = [("original", base_bytes, original["quality"]["perplexity"])]
points += [(stage["stage"], stage["ratios"]["smallest_copy_bytes"] * base_bytes,
            stage["report"]["quality"]["perplexity"]) for stage in result["stages"]]

fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
ax.plot([p[1] / 2**20 for p in points], [p[2] for p in points], "o-")
for name, size, ppl in points:
    ax.annotate(name, (size / 2**20, ppl), textcoords="offset points", xytext=(6, 6), fontsize=9)
ax.set_xlabel("bytes of the smallest stored copy (MiB)")
ax.set_ylabel("held-out perplexity")
ax.set_title("Slimming the tiny model: quality against size")
ax.grid(alpha=0.3)
ax.margins(x=0.2, y=0.15)
plt.show()
for name, size, ppl in points:
    print(f"{name:>12}: {size / 2**20:6.2f} MiB, perplexity {ppl:.1f}")
assert points[-1][1] < points[0][1], "the quantized model must be smaller than the original"

# %% [markdown]
# ## Use the result
#
# The last stage is an ordinary run: generate from it, evaluate it, or export it to Hugging Face
# (dequantized) with `slimjax export`.

# %%
final = slimjax.load_run(os.path.join(OUT, "stages", result["stages"][-1]["stage"]))
print(final.spec.recipe[-1][0], "->", slimjax.generate(final, ["ROMEO:"], max_new_tokens=24)[0])
