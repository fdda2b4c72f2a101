"""Sequence classification on the bundled genre task: from scratch vs pre-trained, full fine-tuning vs LoRA,
for the decoder and the encoder.

    python bench/finetune.py                       # 2-core CPU: decoder ~6 min, encoder ~14 min (shared machine)
    python bench/finetune.py --families=encoder    # one family; the other's rows are kept from the last results

The task: passages of ``--seq_len`` tokens of Shakespeare's plays labelled by their play's genre
folder (comedies, histories, problems, roman, romances, tragedies), split by play (no play on
both sides; ``slimjax.data.records.genre_plays``). Every score stands beside the majority-class
baseline on the same held-out examples.

1. Pre-training, per family (``FAMILIES``), on the plays of the genre task's training split only
   (``data.eval_plays`` = its held-out plays), so no held-out passage was ever seen, with a
   SentencePiece BPE vocabulary of 1024 trained on those plays: the decoder (a 2-layer, 64-wide
   Llama-style model) ``--pre_steps`` of next-token prediction; the encoder (``configs/bert_tiny.py``:
   2 post-LN layers, width 128) ``--pre_steps`` of MLM + NSP, then its held-out MLM accuracy beside
   the unigram baseline (``slimjax.evaluate``).
2. Fine-tunes (``VARIANTS``), each in its own subprocess (peak RSS per variant) for ``--ft_steps`` on
   the same batches: from scratch (full), from the pre-trained run (``checkpoint.init_from``) with
   every parameter trained, and with LoRA (r=8 on every projection, base frozen; the classifier head
   trained). The decoder pools its last token, the encoder its [CLS] token through its pooler.
   Accuracy and macro-F1 over the first ``--eval_batches`` batches of the held-out examples (a fixed
   shuffle of them), trainable and total parameters, median step time (slimjax's summary) and
   process peak RSS.
3. Scale: the share of parameters LoRA r=8 trains (with the head) at gpt2_small's shape, abstractly.

A family is one entry of ``FAMILIES`` (its config and pre-training recipe) and its rows the
entries of ``VARIANTS`` naming it; the targets are checked per family. Writes
``bench/results/finetune.json``.
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

# Per family: its config (configs/base.py or a file under configs/), model flags on top, and how it is pre-trained.
FAMILIES = {
    "decoder": {"config": "", "model": {"vocab_size": 1024, "d_model": 64, "n_layers": 2, "n_heads": 8,
                                        "n_kv_heads": 4, "head_dim": 8, "d_ff": 128, "max_seq_len": 256,
                                        "dtype": "float32", "tie_embeddings": False},
                "pretrain": "next-token prediction on the training plays"},
    "encoder": {"config": "bert_tiny.py", "model": {"dtype": "float32"},
                "pretrain": "MLM + NSP on the training plays (configs/bert_tiny.py)"},
}
# (name, family, start: "scratch" | "pretrained", recipe, learning rate)
VARIANTS = (
    ("decoder, from scratch, full", "decoder", "scratch", ("classify",), 3e-3),
    ("decoder, pre-trained, full", "decoder", "pretrained", ("classify",), 3e-3),
    ("decoder, pre-trained, LoRA r=8", "decoder", "pretrained", ("lora", "classify"), 1e-2),
    ("encoder, from scratch, full", "encoder", "scratch", ("classify",), 1e-3),
    ("encoder, pre-trained, full", "encoder", "pretrained", ("classify",), 1e-3),
    ("encoder, pre-trained, LoRA r=8", "encoder", "pretrained", ("lora", "classify"), 1e-2),
)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(args: dict, family: str, steps: int, lr: float):
    import importlib.util

    from slimjax.configs import base
    from slimjax.data import records

    path = FAMILIES[family]["config"]
    if path:
        spec = importlib.util.spec_from_file_location("family_config", os.path.join(CONFIGS, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
    else:
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
        c = _config(args, family, args["pre_steps"], 3e-3 if family == "decoder" else 1e-3)
        s = slimjax.train(c, pre_dir)
        out = {"eval_loss": s["final_eval_loss"], "step_time_s": s["step_time_s"], "wall_time_s": s["wall_time_s"]}
        if family == "encoder":  # masked tokens of the held-out plays, beside the unigram baseline
            e = slimjax.evaluate(slimjax.load_run(pre_dir), max_docs=args["mlm_docs"])
            out |= {k: e[k] for k in ("mlm_accuracy", "unigram_accuracy", "nsp_accuracy", "masked_tokens")}
        return out
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
    p.add_argument("--mlm_docs", type=int, default=8, help="held-out documents of the encoder's MLM evaluation")
    p.add_argument("--families", default=",".join(FAMILIES), help="families to run (the others' rows are kept)")
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
    args = {k: v for k, v in vars(a).items() if k not in ("child", "families")} | {"workdir": workdir}
    families = a.families.split(",")
    t0 = time.perf_counter()
    previous = _previous(args) if set(families) != set(FAMILIES) else {"rows": [], "pretrain": {}}
    pretrain = {f: p for f, p in previous["pretrain"].items() if f not in families}
    for family in families:
        if any(v[1] == family and v[2] == "pretrained" for v in VARIANTS):
            pretrain[family] = p = _run_child({"kind": "pretrain", "family": family, "args": args})
            extra = (f", MLM accuracy {p['mlm_accuracy']:.3f} (unigram {p['unigram_accuracy']:.3f})"
                     if "mlm_accuracy" in p else "")
            print(f"pre-trained {family}: held-out loss {p['eval_loss']:.3f}{extra}", flush=True)
    rows = [r for r in previous["rows"] if r["family"] not in families]
    for i, (name, family, start, recipe, lr) in enumerate(VARIANTS):
        if family not in families:
            continue
        r = _run_child({"kind": "finetune", "family": family, "start": start, "recipe": list(recipe), "lr": lr,
                        "args": args, "workdir": os.path.join(workdir, f"ft-{i}")})
        rows.append({"variant": name, "family": family, "start": start, "recipe": "+".join(recipe),
                     "learning_rate": lr, **r})
        print(f"{name}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f} (majority "
              f"{r['majority_accuracy']:.3f} / {r['majority_macro_f1']:.3f})", flush=True)
    rows.sort(key=lambda r: [v[0] for v in VARIANTS].index(r["variant"]))
    scale = scale_share()
    targets = [t for family in FAMILIES for t in family_targets(family, [r for r in rows if r["family"] == family])]
    targets.append({"name": "lora_trainable_share_gpt2_small", "value": scale["trainable_share"],
                    "target": "<= 0.01 (shape only)", "met": scale["trainable_share"] <= 0.01})
    columns = ["variant", "accuracy", "macro_f1", "majority_accuracy", "majority_macro_f1", "trainable_params",
               "trainable_share", "step_time_s", "peak_rss_bytes"]
    finish("finetune", rows, columns, targets, {
        "task": "genre classification of Shakespeare passages, split by play",
        "args": {k: v for k, v in args.items() if k != "workdir"}, "families_run": families, "pretrain": pretrain,
        "scale": scale, "wall_time_s": time.perf_counter() - t0})
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def family_targets(family: str, rows: list[dict]) -> list[dict]:
    """One family's targets (names prefixed by the family but the decoder's, as they were first
    named): every row beats the majority; pre-training helps; LoRA within 1 point of full
    fine-tuning with <= 1% of the parameters trained."""
    if not rows:
        return []
    prefix = "" if family == "decoder" else f"{family}_"
    by = {r["start"] + "+" + r["recipe"]: r for r in rows}
    scratch, full, lora = by["scratch+classify"], by["pretrained+classify"], by["pretrained+lora+classify"]
    margin = min(min(r["accuracy"] - r["majority_accuracy"], r["macro_f1"] - r["majority_macro_f1"]) for r in rows)
    gain, gap = full["accuracy"] - scratch["accuracy"], lora["accuracy"] - full["accuracy"]
    return [
        {"name": prefix + "beats_majority_min_margin", "value": margin,
         "target": "> 0 (every row, accuracy and macro-F1)", "met": margin > 0},
        {"name": prefix + "pretrained_minus_scratch_accuracy", "value": gain, "target": "> 0 (equal fine-tuning steps)",
         "met": gain > 0},
        {"name": prefix + "lora_minus_full_accuracy", "value": gap, "target": ">= -0.01", "met": gap >= -0.01},
        {"name": prefix + "lora_trainable_share", "value": lora["trainable_share"], "target": "<= 0.01",
         "met": lora["trainable_share"] <= 0.01},
    ]


def _previous(args: dict) -> dict:
    """The last results' rows and pre-training figures, when they were measured with these arguments."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "finetune.json")
    if not os.path.exists(path):
        return {"rows": [], "pretrain": {}}
    with open(path) as f:
        old = json.load(f)
    same = {k: v for k, v in old["args"].items() if k in args} == {k: v for k, v in args.items() if k in old["args"]
                                                                    and k != "workdir"}
    return old if same else {"rows": [], "pretrain": {}}


if __name__ == "__main__":
    main()
