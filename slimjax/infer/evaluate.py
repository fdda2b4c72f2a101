"""Evaluation: perplexity and bits per byte on documents, classification and generation metrics.

Language-model scores run the eval step of training (``slimjax.infer.scoring``) on batches
sharded over the mesh like training batches, with parameters in their rules' shardings; the
documents are packed in a fixed order and every token is scored once, so results are
deterministic. Bits per byte divide the summed NLL (nats, over every target token including
each document's EOS) by ``ln 2 x`` the UTF-8 bytes of the documents' text: a number comparable
across tokenizers, unlike perplexity per token.

Task metrics: accuracy and macro-F1 over predicted and true labels (written out here: they are
two lines of counting), BLEU through ``sacrebleu`` and ROUGE through ``rouge-score``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slimjax.config import DataConfig, PretrainConfig
from slimjax.data import loader, mlm, pipeline
from slimjax.data.tokenizer import Tokenizer
from slimjax.infer.scoring import eval_means, make_eval_step
from slimjax.sharding import Rules, activation_rules


@dataclasses.dataclass(frozen=True)
class LMScore:
    """Summed NLL (nats) over ``tokens`` target tokens of documents holding ``bytes`` UTF-8 bytes."""

    nll_sum: float
    tokens: int
    bytes: int
    documents: int

    def as_dict(self) -> dict[str, float]:
        loss = self.nll_sum / max(self.tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "bits_per_byte": self.nll_sum / (math.log(2) * max(self.bytes, 1)),
                "tokens": float(self.tokens), "bytes": float(self.bytes), "documents": float(self.documents)}


def compile_eval_step(graphdef: nnx.GraphDef, abstract_params: Any, param_shardings: Any, mesh: Mesh,
                      rules: Rules, rows: int, seq_len: int, family: str = "decoder") -> Callable[[dict, dict], dict]:
    """The eval step of ``family`` compiled for ``[rows, seq_len]`` batches sharded like training batches."""
    batch_sharding = pipeline.batch_shardings(mesh, rules, loader.BATCH_SPECS[family])
    abstract_batch = pipeline.abstract_batch(loader.BATCH_SPECS[family], {"batch": rows, "length": seq_len},
                                             batch_sharding)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_params, param_shardings)
    with activation_rules(mesh, rules):
        return jax.jit(make_eval_step(graphdef, family), in_shardings=(param_shardings, batch_sharding),
                       out_shardings=NamedSharding(mesh, PartitionSpec())).lower(abstract, abstract_batch).compile()


def document_batches(data: DataConfig, tok: Tokenizer, docs: Sequence[str], rows: int
                     ) -> list[dict[str, np.ndarray]]:
    """``docs`` tokenized, packed by the configured packer (last row padded, so every token is
    scored) and cut into this process's slices of ``rows``-row global batches."""
    packed = loader.pack(data, tok, list(docs), pad_last=True)
    return pipeline.eval_batches(packed, rows, 0, jax.process_index(), jax.process_count())


def score_documents(eval_step: Callable[[dict, dict], dict], params: dict, data: DataConfig, tok: Tokenizer,
                    docs: Sequence[str], rows: int, mesh: Mesh, rules: Rules) -> LMScore:
    """Summed NLL, scored tokens and UTF-8 bytes of ``docs`` under the model."""
    sharding = pipeline.batch_sharding(mesh, rules)
    nll, tokens = 0.0, 0.0
    for batch in document_batches(data, tok, docs, rows):
        out = jax.device_get(eval_step(params, pipeline.to_global(batch, sharding)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return LMScore(nll_sum=nll, tokens=int(tokens), bytes=n_bytes, documents=len(docs))


def score_masked(eval_step: Callable[[dict, dict], dict], params: dict, data: DataConfig, pretrain: PretrainConfig,
                 tok: Tokenizer, docs: Sequence[str], rows: int, seed: int, model_vocab: int, mesh: Mesh,
                 rules: Rules) -> dict[str, float]:
    """An encoder's held-out MLM and pair-task loss and accuracy on sentence pairs of ``docs`` (the
    training rule's masks, drawn with ``seed``), next to the unigram baseline: the accuracy of always
    predicting the most frequent masked token."""
    rows_of = loader.pair_rows(data, pretrain, tok, model_vocab)
    pieces = rows_of.pieces(docs)
    batches = mlm.eval_batches(pieces, rows, 0, seed, data.seq_len, pretrain, rows_of.specials, rows_of.words,
                               jax.process_index(), jax.process_count())
    sharding = pipeline.batch_shardings(mesh, rules, mlm.ENCODER_BATCH)
    out = eval_means([jax.device_get(eval_step(params, pipeline.to_global(b, sharding))) for b in batches])
    # The baseline is measured on this process's rows (a single-process figure on multi-host runs).
    targets = np.concatenate([b["mlm_targets"][b["mlm_weights"] > 0] for b in batches])
    counts = np.bincount(targets, minlength=1)
    return out | {"unigram_accuracy": float(counts.max() / max(len(targets), 1)),
                  "masked_tokens": float(len(targets)), "pairs": float(len(pieces)), "documents": float(len(docs))}


def classification_metrics(predicted: Sequence[Any], true: Sequence[Any]) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1 over every label that occurs
    among the true or predicted labels; a class never predicted correctly scores 0)."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    if predicted.shape != true.shape or predicted.ndim != 1 or not len(true):
        raise ValueError(f"need two equally long, non-empty label lists, got {predicted.shape} and {true.shape}")
    f1s = []
    for label in np.unique(np.concatenate([true, predicted])):
        tp = np.sum((predicted == label) & (true == label))
        fp = np.sum((predicted == label) & (true != label))
        fn = np.sum((predicted != label) & (true == label))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == true)), "macro_f1": float(np.mean(f1s))}


def majority_baseline(train_counts: dict[str, int], eval_labels: Sequence[int], classes: Sequence[str]
                      ) -> dict[str, Any]:
    """Accuracy and macro-F1 of always predicting the most frequent training class (the floor a
    classifier's held-out score must clear to mean anything)."""
    majority = max(range(len(classes)), key=lambda i: (train_counts.get(classes[i], 0), -i))
    eval_labels = np.asarray(eval_labels)
    return {"class": classes[majority], **classification_metrics(np.full_like(eval_labels, majority), eval_labels)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (rouge-score, 0-1, stemmed)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    out = {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    for kind in ROUGE_TYPES:
        out[kind] = float(np.mean([s[kind].fmeasure for s in scores]))
    return out


def split_documents(data: DataConfig, split: str, max_docs: int = 0) -> list[str]:
    """The documents of ``split`` ("eval": held out; "train") of the configured sources, first
    ``max_docs`` only when given (whole documents, so bytes and tokens stay matched)."""
    docs = loader.split_documents(data, split)
    return docs[:max_docs] if max_docs else docs
