"""Batches for fine-tuning: labelled sequences for ``slim.classify`` and packed prompt/response pairs (SFT).

Classification: one example per row, left-aligned and padded (segment id 0 past its end): BOS
and the text's tokens, cut at ``data.seq_len`` tokens; a passage source (the genre task) is cut
into as many whole windows of ``seq_len - 1`` tokens after BOS as its text holds. Encoder rows
are laid out as its pre-training rows, ``[CLS] text [SEP]`` (BOS and EOS; one token less of
text), with token type 0 throughout (the decoder ignores token types). Each row's
``loss_mask`` is 1 at its last real token only, so the step's target-token count is the number
of examples (the ``cls`` term is a mean over examples) and ``labels`` holds the class id (-1 on
padding rows).

SFT: BOS + prompt + response + EOS per pair, packed like pre-training documents (segment ids
keep pairs from attending to each other; positions restart per pair) with ``loss_mask`` kept
only where the target is a response token or the closing EOS. The response mask is packed by
the same packer as the tokens: packing depends on lengths only, so both land in the same places.

Both stream endlessly in a per-epoch shuffled order fixed by ``train.seed``; each process keeps
its contiguous slice of every global batch, so the global batch does not depend on the
process count. Held-out examples come in a fixed order, padded to whole batches.
"""

from __future__ import annotations

import collections
from typing import Sequence

import grain
import numpy as np

from slimjax.config import Config
from slimjax.data import records, tokenizer
from slimjax.data.loader import Data
from slimjax.data.packing import pack_concat_split, pack_first_fit, to_example
from slimjax.errors import SlimjaxError

Examples = dict[str, np.ndarray]  # named arrays with a leading example dim
EVAL_ORDER_SEED = 0  # the held-out examples' order: fixed, whatever train.seed says


def task_of(cfg: Config) -> str:
    """"classify", "sft" or "lm": what the run's sources and recipe ask for (mismatches, and a
    ``checkpoint.best_metric`` the task does not measure, are errors)."""
    kinds = {src.kind for src in cfg.data.sources}
    labelled, paired = kinds & set(records.LABELLED_KINDS), kinds & set(records.PAIR_KINDS)
    classify = "classify" in cfg.slim.recipe
    if classify and not labelled:
        raise SlimjaxError(f"slim.recipe names 'classify' but data.sources ({', '.join(sorted(kinds))}) carry no "
                           "labels; train a classifier on a labelled source ('genre' or 'labels:GLOB')")
    if labelled and not classify:
        raise SlimjaxError(f"data.sources kind {sorted(labelled)[0]!r} carries labels: add 'classify' to slim.recipe "
                           "and name the labels in slim.classify.classes")
    if labelled and paired:
        raise SlimjaxError("data.sources mixes labelled and prompt/response sources; a run does one task")
    if not classify and cfg.checkpoint.best_metric != "loss":
        raise SlimjaxError(f"checkpoint.best_metric={cfg.checkpoint.best_metric!r} is measured on classifiers only "
                           "(slim.recipe with 'classify'); a language model ranks by 'loss'")
    return "classify" if classify else "sft" if paired else "lm"


def sequence_rows(ids: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> Examples:
    """Left-aligned rows ``[n, seq_len + 1]`` (the packer's layout: inputs and targets one apart) of
    the given token lists (each at most ``seq_len`` long)."""
    n = len(ids)
    tokens = np.full((n, seq_len + 1), pad_id, np.int32)
    segment_ids = np.zeros((n, seq_len + 1), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
        segment_ids[i, :len(row)] = 1
    positions = np.where(segment_ids > 0, np.arange(seq_len + 1)[None, :], 0).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def classification_examples(examples: Sequence[records.Labelled], classes: tuple[str, ...],
                            tok: tokenizer.Tokenizer, seq_len: int, sep: bool = False) -> Examples:
    """Model-ready rows (inputs, targets, segment ids, positions, token types, last-token loss mask,
    labels); ``sep`` closes each row with EOS as [SEP] (the encoder's layout)."""
    ids, labels = [], []
    close = [tok.eos_id] if sep else []
    width = seq_len - 1 - len(close)
    for ex, body in zip(examples, tok.encode_batch([ex.text for ex in examples])):
        if ex.passages:  # whole windows only: a short tail would be an easier, different task
            windows = [body[i:i + width] for i in range(0, len(body) - width + 1, width)]
        else:
            windows = [body[:width]]
        ids += [[tok.bos_id, *w, *close] for w in windows]
        labels += [classes.index(ex.label)] * len(windows)
    out = to_example(sequence_rows(ids, seq_len, tok.pad_id))
    out["token_types"] = np.zeros_like(out["inputs"])
    lengths = np.asarray([len(r) for r in ids])
    out["loss_mask"] = (np.arange(seq_len)[None, :] == (lengths - 1)[:, None]).astype(np.float32)
    out["labels"] = np.asarray(labels, np.int32)
    return out


def sft_examples(pairs: Sequence[records.Pair], tok: tokenizer.Tokenizer, seq_len: int, packing: str) -> Examples:
    """Packed rows of prompt/response pairs with the loss on response tokens (and EOS) only."""
    prompts = tok.encode_batch([p.prompt for p in pairs])
    responses = tok.encode_batch([p.response for p in pairs])
    docs = [np.asarray([tok.bos_id, *p, *r, tok.eos_id], np.int32) for p, r in zip(prompts, responses)]
    weights = [np.asarray([0] * (1 + len(p)) + [1] * (len(r) + 1), np.int32) for p, r in zip(prompts, responses)]
    if packing == "first_fit":
        rows, masks = pack_first_fit(docs, seq_len, pad_id=tok.pad_id), pack_first_fit(weights, seq_len)
    else:
        rows, masks = (pack_concat_split(docs, seq_len, pad_last=True, pad_id=tok.pad_id),
                       pack_concat_split(weights, seq_len, pad_last=True))
    out = to_example({"tokens": rows.tokens, "segment_ids": rows.segment_ids, "positions": rows.positions})
    out["loss_mask"] = out["loss_mask"] * masks.tokens[:, 1:].astype(np.float32)
    return out


def train_stream(examples: Examples, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """Endless local batches: every epoch reshuffled, this process's slice of each global batch."""
    n = len(next(iter(examples.values())))
    if n < global_batch:
        raise SlimjaxError(f"the fine-tuning set has {n} training examples (rows), fewer than "
                           f"train.global_batch_size={global_batch}; lower the batch size or add data")
    local = global_batch // process_count
    lo = process_index * local
    rows = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(global_batch, drop_remainder=True)
    return rows.map(lambda idx: {k: v[np.asarray(idx)[lo:lo + local]] for k, v in examples.items()})


def fixed_batches(examples: Examples, global_batch: int, max_batches: int = 0, process_index: int = 0,
                  process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out rows in order, padded to whole global batches (padding rows carry no loss and label -1)."""
    n = len(next(iter(examples.values())))
    batches = -(-n // global_batch)
    batches = min(batches, max_batches) if max_batches else batches
    local = global_batch // process_count
    out = []
    for b in range(batches):
        idx = np.arange(b * global_batch + process_index * local, b * global_batch + (process_index + 1) * local)
        valid = idx < n
        picked = {k: v[np.minimum(idx, n - 1)] for k, v in examples.items()}
        for key in ("segment_ids", "loss_mask", "labels"):
            if key in picked:
                fill = -1 if key == "labels" else 0
                picked[key] = np.where(valid.reshape((-1,) + (1,) * (picked[key].ndim - 1)), picked[key], fill)
        out.append(picked)
    return out


def permuted(examples: Examples) -> Examples:
    """The examples in a fixed shuffled order (whatever ``train.seed`` says), so a capped evaluation
    still samples every held-out play."""
    order = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(examples["labels"]))
    return {k: v[order] for k, v in examples.items()}


def build(cfg: Config, task: str, workdir: str, process_index: int = 0, process_count: int = 1) -> Data:
    """The run's data for a ``classify`` or ``sft`` task (``task_of``)."""
    d, t = cfg.data, cfg.train
    if task == "classify":
        classes = cfg.slim.classify.classes
        train, held = records.labelled(d, "train", classes), records.labelled(d, "eval", classes)
        texts = lambda: (ex.text for ex in train)  # noqa: E731
    else:
        train, held = records.pairs(d, "train"), records.pairs(d, "eval")
        texts = lambda: (p.prompt + p.response for p in train)  # noqa: E731
    for split, items in (("train", train), ("held-out", held)):
        if not items:
            raise SlimjaxError(f"data.sources ({', '.join(s.name for s in d.sources)}) hold no {split} examples; "
                               "add records (or an eval_path / data.eval_fraction for held-out ones)")
    tok = tokenizer.get_tokenizer(d.tokenizer_kind, d.tokenizer, workdir, cfg.model.vocab_size, d.tokenizer_type,
                                  texts)
    if task == "classify":
        sep = cfg.model.family == "encoder"
        train_rows = classification_examples(train, classes, tok, d.seq_len, sep)
        eval_rows = permuted(classification_examples(held, classes, tok, d.seq_len, sep))
        counts = collections.Counter(classes[i] for i in train_rows["labels"])
        stats = {"train_examples": len(train_rows["labels"]), "eval_examples": len(eval_rows["labels"]),
                 "train_classes": {c: counts[c] for c in classes}}
    else:
        train_rows, eval_rows = (sft_examples(x, tok, d.seq_len, d.packing) for x in (train, held))
        stats = {"train_pairs": len(train), "eval_pairs": len(held), "train_rows": len(train_rows["inputs"])}
    return Data(tok, train_stream(train_rows, t.global_batch_size, t.seed, process_index, process_count),
                fixed_batches(eval_rows, t.global_batch_size, t.eval_batches, process_index, process_count), stats)
