"""Encoder pre-training rows: sentence pairs for NSP/SOP and masked tokens for MLM (BERT, ALBERT).

Each document is tokenized and cut into pieces of at most ``(seq_len - 3) // 2`` tokens; a row is
``[CLS] A [SEP] B [SEP]`` padded to ``seq_len`` ([CLS] = the tokenizer's BOS, [SEP] = its EOS),
with token type 0 up to the first [SEP] and 1 after it. A is a piece that has a next piece in its
document. NSP (BERT): B is that next piece (label 0) or, half the time, a piece of another
document (label 1). SOP (ALBERT): B is the next piece (label 0) or the two are swapped (label 1).

MLM (BERT's rule): of the row's non-special tokens, ``round(rate * n)`` (at least one) are chosen
for prediction, as single tokens or, with whole-word masking, as whole words; each chosen token
becomes [MASK] with probability 0.8, a random non-special token with 0.1, and stays with 0.1.

Every random draw of a row comes from a generator seeded by (seed, shard, the row's index in its
shard's endless stream): the same seed gives the same rows and masks, a resumed run continues
the same stream, and each epoch masks afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
from grain.experimental import ZipMapDataset
import numpy as np

from slimjax.config import PretrainConfig
from slimjax.data.pipeline import BatchSpec, eval_indices, shard_stream
from slimjax.errors import SlimjaxError

# The encoder's batch: named arrays and the logical names of their dimensions.
ENCODER_BATCH: BatchSpec = {
    "inputs": (("batch", "length"), np.int32),  # token ids after masking
    "token_types": (("batch", "length"), np.int32),  # 0 = [CLS] A [SEP], 1 = B [SEP]
    "segment_ids": (("batch", "length"), np.int32),  # 1 = the row's example, 0 = padding
    "positions": (("batch", "length"), np.int32),
    "mlm_targets": (("batch", "length"), np.int32),  # the original token where one is to be predicted
    "mlm_weights": (("batch", "length"), np.float32),  # 1 where a token is to be predicted
    "nsp_labels": (("batch",), np.int32),  # 0: B follows A (NSP) / in order (SOP); 1: it does not
    "nsp_weights": (("batch",), np.float32),  # 1 for a real row (0 pads the last eval batch)
}
MASK_P, RANDOM_P = 0.8, 0.1  # BERT's 80/10/10 rule (the rest keep their token)


@dataclasses.dataclass(frozen=True)
class Specials:
    """Token ids the encoder rows are built with, and what masking may draw."""

    cls: int
    sep: int
    pad: int
    mask: int
    vocab_size: int

    def random_ids(self) -> np.ndarray:
        """The ids a masked token may be replaced by: every id but the specials."""
        return np.setdiff1d(np.arange(self.vocab_size), [self.cls, self.sep, self.pad, self.mask])


def specials_of(tok: Any, cfg: PretrainConfig, model_vocab: int) -> Specials:
    """The tokenizer's [CLS]/[SEP]/[PAD] and ``pretrain.mask_id`` as [MASK], checked apart."""
    if cfg.mask_id >= model_vocab:
        raise SlimjaxError(f"config key 'pretrain.mask_id' is {cfg.mask_id} but model.vocab_size is {model_vocab}; "
                           "give an id inside the vocabulary")
    if cfg.mask_id in (tok.bos_id, tok.eos_id, tok.pad_id) or tok.bos_id == tok.eos_id:
        raise SlimjaxError(f"config key 'pretrain.mask_id'={cfg.mask_id} and tokenizer '{tok.path}' ([CLS]=bos "
                           f"{tok.bos_id}, [SEP]=eos {tok.eos_id}, [PAD] {tok.pad_id}) need four distinct special ids")
    return Specials(tok.bos_id, tok.eos_id, tok.pad_id, cfg.mask_id, tok.vocab_size)


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Documents cut into pieces: the token ids of each, its document, and which pieces start a pair
    (``anchors``: a piece whose next piece is of the same document)."""

    tokens: list[np.ndarray]
    doc: np.ndarray
    anchors: np.ndarray

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, i: int) -> tuple["Pieces", int]:
        return self, int(self.anchors[i])


def cut_pieces(docs: Sequence[Sequence[int]], piece_len: int) -> Pieces:
    """Each document's ids (no BOS/EOS) cut into consecutive pieces of ``piece_len`` tokens (the
    last one shorter)."""
    tokens, doc = [], []
    for d, ids in enumerate(docs):
        ids = np.asarray(ids, np.int32)
        for start in range(0, len(ids), piece_len):
            tokens.append(ids[start:start + piece_len])
            doc.append(d)
    doc_arr = np.asarray(doc, np.int64)
    anchors = np.flatnonzero(doc_arr[:-1] == doc_arr[1:]) if len(doc_arr) > 1 else np.zeros(0, np.int64)
    return Pieces(tokens, doc_arr, anchors)


def pair(pieces: Pieces, anchor: int, task: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label) for the pair starting at piece ``anchor`` (a fair coin picks the label)."""
    a, b = pieces.tokens[anchor], pieces.tokens[anchor + 1]
    if rng.random() < 0.5:
        return a, b, 0
    if task == "sop":
        return b, a, 1
    others = np.flatnonzero(pieces.doc != pieces.doc[anchor])
    if not len(others):  # one document only: no other document to draw B from
        return a, b, 0
    return a, pieces.tokens[int(others[rng.integers(len(others))])], 1


# Word table entries: how a token relates to the words of whole-word masking.
CONTINUES, STARTS, ALONE = 0, 1, 2  # continues a word / begins one / is a word of its own (newline, space)


def word_table(tok: Any) -> np.ndarray:
    """Per token id, :data:`CONTINUES`, :data:`STARTS` or :data:`ALONE`: SentencePiece pieces
    beginning with "▁" start a word and its newline symbol stands alone; byte tokens that are
    whitespace stand alone (the bytes between them make a word)."""
    from slimjax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        pieces = tok.pieces()
        return np.asarray([ALONE if p == "\n" else STARTS if p.startswith("\u2581") else CONTINUES
                           for p in pieces], np.int8)
    if isinstance(tok, ByteTokenizer):
        table = np.full(tok.vocab_size, CONTINUES, np.int8)
        table[[ord(c) + 4 for c in " \t\n\r"]] = ALONE
        return table
    raise SlimjaxError(f"pretrain.whole_word needs word boundaries, which tokenizer '{tok.path}' does not give; "
                       "use a SentencePiece or byte tokenizer, or set pretrain.whole_word=False")


def word_begins(tokens: np.ndarray, table: np.ndarray) -> np.ndarray:
    """True where a token begins a word: it starts one or stands alone, or follows one that stands alone."""
    kind = table[tokens]
    begins = kind != CONTINUES
    begins[1:] |= kind[:-1] == ALONE
    return begins


def mask_tokens(tokens: np.ndarray, candidates: np.ndarray, rate: float, specials: Specials,
                rng: np.random.Generator, starts: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) of one row under BERT's rule.

    ``candidates`` marks the tokens that may be chosen (never specials or padding); ``starts``
    (True where a token begins a word) turns on whole-word masking: a word is a run of candidates
    from one start to the next, and words are chosen whole (BERT's create_pretraining_data skips a
    word that would overshoot the count).
    """
    positions = np.flatnonzero(candidates)
    inputs, targets, weights = tokens.copy(), np.zeros_like(tokens), np.zeros(len(tokens), np.float32)
    if not len(positions):
        return inputs, targets, weights
    n_pred = max(1, int(round(rate * len(positions))))
    if starts is None:
        units = [positions[i:i + 1] for i in range(len(positions))]
    else:
        begin = starts[positions].copy()
        begin[0] = True
        begin[1:] |= positions[1:] != positions[:-1] + 1  # a special between two candidates ends a word
        units = np.split(positions, np.flatnonzero(begin)[1:])
    chosen: list[np.ndarray] = []
    count = 0
    for u in rng.permutation(len(units)):
        if count >= n_pred:
            break
        if count + len(units[u]) > n_pred and count:
            continue
        chosen.append(units[u])
        count += len(units[u])
    picked = np.sort(np.concatenate(chosen))
    draw = rng.random(len(picked))
    replace = rng.choice(specials.random_ids(), size=len(picked))
    targets[picked] = tokens[picked]
    weights[picked] = 1.0
    inputs[picked] = np.where(draw < MASK_P, specials.mask, np.where(draw < MASK_P + RANDOM_P, replace, tokens[picked]))
    return inputs, targets, weights


def make_row(pieces: Pieces, anchor: int, seq_len: int, cfg: PretrainConfig, specials: Specials,
             rng: np.random.Generator, words: np.ndarray | None) -> dict[str, np.ndarray]:
    """One encoder row (the arrays of :data:`ENCODER_BATCH`) for the pair at ``anchor``;
    ``words`` (a :func:`word_table`) turns on whole-word masking."""
    a, b, label = pair(pieces, anchor, cfg.pair_task, rng)
    body = np.concatenate([[specials.cls], a, [specials.sep], b, [specials.sep]]).astype(np.int32)
    n = len(body)
    tokens = np.full(seq_len, specials.pad, np.int32)
    tokens[:n] = body
    types = np.zeros(seq_len, np.int32)
    types[len(a) + 2:n] = 1
    real = np.arange(seq_len) < n
    special = np.isin(tokens, [specials.cls, specials.sep]) | ~real
    inputs, targets, weights = mask_tokens(tokens, ~special, cfg.mask_rate, specials, rng,
                                           None if words is None else word_begins(tokens, words))
    return {"inputs": inputs, "token_types": types, "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32), "mlm_targets": targets,
            "mlm_weights": weights, "nsp_labels": np.int32(label), "nsp_weights": np.float32(1.0)}


def row_rng(seed: int, shard: int, index: int) -> np.random.Generator:
    """The generator of row ``index`` of logical shard ``shard`` (-1: the held-out rows)."""
    return np.random.default_rng(np.random.SeedSequence([seed, shard + 1, index]))


def train_dataset(shards: Sequence[Sequence[Pieces]], weights: Sequence[float], rows_per_shard: int, seed: int,
                  first_shard: int, seq_len: int, cfg: PretrainConfig, specials: Specials,
                  words: np.ndarray | None) -> grain.MapDataset:
    """This process's local batches of encoder rows (element ``s``: its slice of global batch ``s``),
    each shard's pairs streamed as ``pipeline.shard_stream`` streams packed rows."""
    def stream(i: int, per_source: Sequence[Pieces]) -> grain.MapDataset:
        shard = first_shard + i
        rows = shard_stream(per_source, weights, seed, shard).map_with_index(
            lambda idx, el: make_row(el[0], el[1], seq_len, cfg, specials, row_rng(seed, shard, idx), words))
        return rows.batch(rows_per_shard, drop_remainder=True)

    zipped = ZipMapDataset([stream(i, per_source) for i, per_source in enumerate(shards)])
    return zipped.map(lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def eval_batches(pieces: Pieces, global_batch: int, max_batches: int, seed: int, seq_len: int,
                 cfg: PretrainConfig, specials: Specials, words: np.ndarray | None, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out rows, one per anchor in order with fixed draws, padded to whole batches (pad rows
    weigh nothing); this process's slices only."""
    out = []
    for idx in eval_indices(len(pieces), global_batch, max_batches, process_index, process_count):
        rows = []
        for i in map(int, idx):
            row = make_row(pieces, int(pieces.anchors[min(i, len(pieces) - 1)]), seq_len, cfg, specials,
                           row_rng(seed, -1, i), words)
            if i >= len(pieces):
                row = {k: np.zeros_like(v) for k, v in row.items()}
            rows.append(row)
        out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return out
