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
# # Hugging Face in and out: import a Llama, check it, fine-tune it with LoRA, export it
#
# slimjax reads and writes Hugging Face `safetensors` checkpoints (Llama, Mistral, GPT-2). This
# notebook builds a small `LlamaForCausalLM` right here with `transformers`, so nothing is
# downloaded, imports it, shows that slimjax computes the same logits and the same greedy text,
# fine-tunes it on Python source code with LoRA adapters, and exports the result back to a
# directory that `transformers` loads.

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

import jax
import numpy as np
import torch
import transformers

import slimjax

print(f"jax {jax.__version__} on {jax.default_backend()}, transformers {transformers.__version__}, torch {torch.__version__}")

# %% tags=["parameters"]
STEPS = 200
HF_DIR, RUN, FINETUNED, EXPORTED = "hf/tiny-llama", "runs/imported", "runs/lora", "hf/tiny-llama-lora"

# %% [markdown]
# ## A model to import
#
# A real checkpoint is a directory (`config.json`, `*.safetensors`, `tokenizer.json`) downloaded
# from the Hub or copied to the runtime; uncomment the next cell's lines to import one. Everything
# below works the same with its path as `HF_DIR`.

# %%
# from huggingface_hub import snapshot_download
# path = snapshot_download("meta-llama/Llama-3.2-1B", allow_patterns=["*.json", "*.safetensors"])
# slimjax.run_command("import", f"--hf_dir={path}", "--workdir=runs/llama1b")

# %% [markdown]
# Here we make one: a byte-level BPE tokenizer trained on Python's own standard library sources,
# and a 4-layer Llama with grouped-query attention and random weights, saved the way the Hub
# stores models.

# %%
from tokenizers import ByteLevelBPETokenizer

os.makedirs(HF_DIR, exist_ok=True)
stdlib = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
tokenizer = ByteLevelBPETokenizer()
tokenizer.train(stdlib, vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
tokenizer.save(os.path.join(HF_DIR, "tokenizer.json"))

torch.manual_seed(0)
hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)).eval()
hf_model.save_pretrained(HF_DIR)
print(sorted(os.listdir(HF_DIR)), f"{hf_model.num_parameters():,} parameters")

# %% [markdown]
# ## Import
#
# `slimjax import` checks every tensor's name and shape against `config.json` before reading any
# data, then places each parameter straight into its sharding on the mesh. `--dtype=float32` makes
# the run compute in float32 on every backend (the default, `auto`, is bfloat16 on a GPU or TPU),
# so the comparisons below hold to float32 rounding there too.

# %%
slimjax.run_command("import", f"--hf_dir={HF_DIR}", f"--workdir={RUN}", "--dtype=float32")
run = slimjax.load_run(RUN)
print(run.spec.family, run.config.model)

# %% [markdown]
# ## Same logits
#
# Both models score the same text; each dot is one (position, vocabulary entry) pair. They lie on
# the diagonal: the largest difference is at float32 rounding level.

# %%
import matplotlib.pyplot as plt

text = "def main(argv):\n    for name in sorted(argv):\n        print(name)\n"
ids = run.encode(text)
ours = run.logits(ids)
with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
diff = np.abs(ours - theirs).max()
print(f"{len(ids)} tokens; largest |slimjax - transformers| = {diff:.2e} (logits span {np.ptp(theirs):.1f})")
assert diff < 1e-3 * np.abs(theirs).max()

fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
ax.plot(theirs.ravel(), ours.ravel(), ".", markersize=1, alpha=0.3)
ax.set_xlabel("transformers logit")
ax.set_ylabel("slimjax logit")
ax.set_title("Imported model: every logit of one text")
plt.show()

# %% [markdown]
# ## Same greedy text
#
# slimjax decodes with its KV cache, `transformers` with its own; greedy decoding of a random model
# is gibberish, but it must be the same gibberish token for token.

# %%
prompt = "import "
ours_text = slimjax.generate(run, [prompt], max_new_tokens=16)[0]
prompt_ids = torch.tensor([run.encode(prompt)])
with torch.no_grad():
    out = hf_model.generate(prompt_ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
theirs_text = run.tokenizer.decode(out[0, prompt_ids.shape[1]:].tolist())
print(repr(ours_text), repr(theirs_text), sep="\n")
assert ours_text == theirs_text

# %% [markdown]
# ## Fine-tune with LoRA
#
# The import wrote `RUN/config.py`, the config of the imported model. Training from it with
# `checkpoint.init_from` pointing at the import and the `lora` transform in `slim.recipe` freezes
# the imported weights and trains rank-8 adapters beside every attention and MLP projection, here
# on the standard library itself (the `stdlib` source, read through the model's tokenizer).

# %%
slimjax.run_command(
    "train", f"--config={RUN}/config.py", f"--workdir={FINETUNED}", f"--config.checkpoint.init_from={RUN}",
    "--config.slim.recipe=('lora',)", "--config.data.sources=('stdlib',)", f"--config.train.steps={STEPS}",
    "--config.optimizer.learning_rate=0.01", "--config.optimizer.warmup_steps=10",
    f"--config.train.eval_every={max(STEPS // 4, 1)}", "--config.train.eval_batches=4", "--config.train.sample_tokens=0",
    "--config.train.progress=false", "--config.train.global_batch_size=8", "--config.data.seq_len=128")
tuned = slimjax.load_run(FINETUNED)
print("recipe:", tuned.spec.recipe)

# %% [markdown]
# The run's own loss curve (also in TensorBoard), and the held-out loss before and after:

# %%
from IPython.display import Image, display

display(Image(os.path.join(FINETUNED, "loss_curve.png")))
before = slimjax.evaluate(run, sources=["stdlib"], max_docs=8, batch_size=8)["loss"]
after = slimjax.evaluate(tuned, sources=["stdlib"], max_docs=8, batch_size=8)["loss"]
print(f"held-out stdlib loss: imported {before:.3f} -> LoRA fine-tuned {after:.3f} nats/token")
assert after < before

# %% [markdown]
# ## Export
#
# `slimjax export` merges the adapters into their kernels and writes a Hugging Face directory;
# `transformers` loads it as an ordinary `LlamaForCausalLM` and computes what slimjax computes.
# (`--adapters=true` would write the adapters alone, in the PEFT format.)

# %%
slimjax.run_command("export", f"--workdir={FINETUNED}", f"--out={EXPORTED}")
exported = transformers.AutoModelForCausalLM.from_pretrained(EXPORTED).eval()
with torch.no_grad():
    theirs = exported(torch.tensor([ids])).logits[0].numpy()
ours = tuned.logits(ids)
print(sorted(os.listdir(EXPORTED)))
print(f"largest |slimjax - transformers| after export: {np.abs(ours - theirs).max():.2e}")
assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
