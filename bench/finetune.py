"""Sequence classification on the bundled genre task: from scratch vs pre-trained, full fine-tuning vs LoRA.

    python bench/finetune.py                  # ~5 min on a quiet 2-core CPU

The task: passages of ``--seq_len`` tokens of Shakespeare's plays labelled by their play's genre
folder (comedies, histories, problems, roman, romances, tragedies), split by play (no play on
both sides; ``slimjax.data.records.genre_plays``). Every score stands beside the majority-class
baseline on the same held-out examples.

1. Pre-training, per family: the decoder (a 2-layer, 64-wide Llama-style model, SentencePiece BPE
   vocabulary of 1024 trained on the training plays) trained ``--pre_steps`` on next-token
   prediction over the plays of the genre task's training split only (``data.eval_plays`` = its
   held-out plays), so no held-out passage was ever seen.
2. Fine-tunes (``VARIANTS``), each in its own subprocess (peak RSS per variant) for ``--ft_steps`` on
   the same batches: from scratch (full), from the pre-trained run (``checkpoint.init_from``) with
   every parameter trained, and with LoRA (r=8 on every projection, base frozen; the classifier head
   trained). Accuracy and macro-F1 over the first ``--eval_batches`` batches of the held-out
   examples (a fixed shuffle of them), trainable and total parameters, median step time (slimjax's
   summary) and process peak RSS.
3. Scale: the share of parameters LoRA r=8 trains (with the head) at gpt2_small's shape, abstractly.

A family is one entry of ``FAMILIES`` (its model flags and pre-training recipe) and its rows the
entries of ``VARIANTS`` naming it. Writes ``bench/results/finetune.json`` with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import finish  # noqa: E402

# Model flags per family (on top of configs/base.py), and how a family is pre-trained.
FAMILIES = {
    "decoder": {"model": {"vocab_size": 1024, "d_model": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4,
                          "head_dim": 8, "d_ff": 128, "max_seq_len": 256, "dtype": "float32",
                          "tie_embeddings": False},
                "pretrain": "next-token prediction on the training plays"},
}
# (name, family, start: "scratch" | "pretrained", recipe, learning rate)
VARIANTS = (
    ("decoder, from scratch, full", "decoder", "scratch", ("classify",), 3e-3),
    ("decoder, pre-trained, full", "decoder", "pretrained", ("classify",), 3e-3),
    ("decoder, pre-trained, LoRA r=8", "decoder", "pretrained", ("lora", "classify"), 1e-2),
)


def _config(args: dict, family: str, steps: int, lr: float):
    from slimjax.configs import base
    from slimjax.data import records

    c = base.get_config()
    for key, value in FAMILIES[family]["model"].items():
        setattr(c.model, key, value)
    c.data.seq_len = args["seq_len"]
    c.data.eval_plays = tuple(records.genre_plays("eval"))
    c.train.global_batch_size = args["batch"]
    c.train.steps, c.train.eval_every, c.train.eval_batches = steps, steps, args["eval_batches"]
    c.train.progress, c.train.sample_tokens = False, 0
    c.optimizer.learning_rate, c.optimizer.warmup_steps = lr, 10
    c.checkpoint.every_steps, c.checkpoint.async_save = steps, False
    return c


def child(job: dict) -> dict:
    import jax

    import slimjax
    from slimjax.config import validate
    from slimjax.data import records, tokenizer
    from slimjax.slim.spec import build, spec_from_config

    args, family = job["args"], job["family"]
    pre_dir = os.path.join(args["workdir"], f"pre-{family}")
    if job["kind"] == "pretrain":
        c = _config(args, family, args["pre_steps"], 3e-3)
        s = slimjax.train(c, pre_dir)
        return {"eval_loss": s["final_eval_loss"], "step_time_s": s["step_time_s"], "wall_time_s": s["wall_time_s"]}
    c = _config(args, family, args["ft_steps"], job["lr"])
    c.data.sources = ({"kind": "genre"},)
    c.data.tokenizer = str(tokenizer.cached_model_path(pre_dir))  # every variant reads the same tokens
    c.slim.recipe = tuple(job["recipe"])
    c.slim.classify.classes = records.genre_classes()
    if job["start"] == "pretrained":
        c.checkpoint.init_from = pre_dir
    s = slimjax.train(c, job["workdir"])
    built = build(spec_from_config(validate(c)))
    flags = jax.tree.leaves(built.trainable)
    sizes = [int(x.size) for x in jax.tree.leaves(built.shapes)]
    trainable = sum(n for n, f in zip(sizes, flags) if f)
    e = s["final_eval"]
    return {"accuracy": e["accuracy"], "macro_f1": e["macro_f1"], "majority_accuracy": e["majority_accuracy"],
            "majority_macro_f1": e["majority_macro_f1"], "majority_class": e["majority_class"],
            "eval_examples": int(e["examples"]), "trainable_params": trainable, "total_params": sum(sizes),
            "trainable_share": trainable / sum(sizes), "step_time_s": s["step_time_s"],
            "wall_time_s": s["wall_time_s"], "train_examples": s["data"]["train_examples"]}


def scale_share() -> dict:
    """LoRA r=8 (every projection) + the head at gpt2_small's shape: the share of parameters trained."""
    import jax

    from slimjax.config import validate
    from slimjax.configs import gpt2_small
    from slimjax.data import records
    from slimjax.slim.spec import build, spec_from_config

    c = gpt2_small.get_config()
    c.slim.recipe = ("lora", "classify")
    c.slim.classify.classes = records.genre_classes()
    built = build(spec_from_config(validate(c)))
    sizes = [int(x.size) for x in jax.tree.leaves(built.shapes)]
    trainable = sum(n for n, f in zip(sizes, jax.tree.leaves(built.trainable)) if f)
    return {"config": "gpt2_small", "trainable_params": trainable, "total_params": sum(sizes),
            "trainable_share": trainable / sum(sizes)}


def _run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {job['kind']} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pre_steps", type=int, default=200)
    p.add_argument("--ft_steps", type=int, default=300)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval_batches", type=int, default=64)
    p.add_argument("--workdir", default="")
    p.add_argument("--child", default="")
    a = p.parse_args()
    if a.child:
        job = json.loads(a.child)
        result = child(job)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    workdir = a.workdir or tempfile.mkdtemp(prefix="slimjax-finetune-")
    args = {k: v for k, v in vars(a).items() if k != "child"} | {"workdir": workdir}
    t0 = time.perf_counter()
    pretrain = {}
    for family in sorted({v[1] for v in VARIANTS if v[2] == "pretrained"}):
        pretrain[family] = _run_child({"kind": "pretrain", "family": family, "args": args})
        print(f"pre-trained {family}: held-out next-token loss {pretrain[family]['eval_loss']:.3f}", flush=True)
    rows = []
    for i, (name, family, start, recipe, lr) in enumerate(VARIANTS):
        r = _run_child({"kind": "finetune", "family": family, "start": start, "recipe": list(recipe), "lr": lr,
                        "args": args, "workdir": os.path.join(workdir, f"ft-{i}")})
        rows.append({"variant": name, "family": family, "start": start, "recipe": "+".join(recipe),
                     "learning_rate": lr, **r})
        print(f"{name}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f} (majority "
              f"{r['majority_accuracy']:.3f} / {r['majority_macro_f1']:.3f})", flush=True)
    scale = scale_share()
    by = {r["variant"]: r for r in rows}
    scratch, full, lora = (by[v[0]] for v in VARIANTS)
    margin = min(min(r["accuracy"] - r["majority_accuracy"], r["macro_f1"] - r["majority_macro_f1"]) for r in rows)
    gain, gap = full["accuracy"] - scratch["accuracy"], lora["accuracy"] - full["accuracy"]
    targets = [
        {"name": "beats_majority_min_margin", "value": margin, "target": "> 0 (every row, accuracy and macro-F1)",
         "met": margin > 0},
        {"name": "pretrained_minus_scratch_accuracy", "value": gain, "target": "> 0 (equal fine-tuning steps)",
         "met": gain > 0},
        {"name": "lora_minus_full_accuracy", "value": gap, "target": ">= -0.01", "met": gap >= -0.01},
        {"name": "lora_trainable_share", "value": lora["trainable_share"], "target": "<= 0.01",
         "met": lora["trainable_share"] <= 0.01},
        {"name": "lora_trainable_share_gpt2_small", "value": scale["trainable_share"],
         "target": "<= 0.01 (shape only)", "met": scale["trainable_share"] <= 0.01},
    ]
    columns = ["variant", "accuracy", "macro_f1", "majority_accuracy", "majority_macro_f1", "trainable_params",
               "trainable_share", "step_time_s", "peak_rss_bytes"]
    finish("finetune", rows, columns, targets, {
        "task": "genre classification of Shakespeare passages, split by play",
        "args": {k: v for k, v in args.items() if k != "workdir"}, "pretrain": pretrain, "scale": scale,
        "wall_time_s": time.perf_counter() - t0})
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
