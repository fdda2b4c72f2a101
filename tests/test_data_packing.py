"""First-fit packing: no token lost or duplicated, whole documents where they fit, correct segment
ids and positions, and the model keeps the packed documents apart."""

import numpy as np
import pytest

from helpers import assert_segments_isolated, small_config
from slimjax.data import packing, pipeline


def unique_docs(lengths):
    """Documents whose tokens are all distinct, so every token can be traced to its place."""
    offsets = np.concatenate([[4], 4 + np.cumsum(lengths)])
    return [np.arange(offsets[i], offsets[i + 1], dtype=np.int32) for i in range(len(lengths))]


def segments(rows):
    """(row, segment id) -> the tokens and positions of that segment, in row order."""
    out = {}
    for r in range(len(rows)):
        for seg in np.unique(rows.segment_ids[r]):
            if seg:
                where = rows.segment_ids[r] == seg
                assert np.all(np.diff(np.flatnonzero(where)) == 1), "a segment is contiguous"
                out[(r, int(seg))] = (rows.tokens[r, where], rows.positions[r, where])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_first_fit_keeps_every_token_once_and_whole_documents_whole(seed):
    rng = np.random.default_rng(seed)
    seq = 32
    lengths = np.concatenate([rng.integers(2, 20, 300), rng.integers(20, 34, 40), rng.integers(34, 120, 15)])
    rng.shuffle(lengths)
    docs = unique_docs(lengths)
    rows = packing.pack_first_fit(docs, seq)
    assert rows.tokens.shape[1] == seq + 1
    segs = segments(rows)
    for tokens, positions in segs.values():
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))  # positions restart per piece
        assert np.all(np.diff(tokens) == 1)  # each piece is a contiguous run of one document
    doc_of = {int(d[0]): i for i, d in enumerate(docs)}
    # Documents that fit in a row are never cut: exactly one segment holds them whole.
    starts = {int(t[0]): len(t) for t, _ in segs.values()}
    for d in docs:
        if len(d) <= seq + 1:
            assert starts.get(int(d[0])) == len(d)
    # Every token except a document's first is a target exactly once; nothing else appears.
    targets = np.concatenate([t[1:] for t, _ in segs.values()])
    expected = np.concatenate([d[1:] for d in docs])
    np.testing.assert_array_equal(np.sort(targets), np.sort(expected))
    assert set(doc_of) <= {int(t[0]) for t, _ in segs.values()} | set(expected.tolist())
    # Padding only after the last segment of a row, and first-fit wastes little.
    for r in range(len(rows)):
        used = np.flatnonzero(rows.segment_ids[r])
        assert used.max() == len(used) - 1 and (rows.tokens[r, len(used):] == 0).all()
    assert (rows.segment_ids > 0).mean() > 0.9


def test_first_fit_fills_the_first_open_row_with_room():
    docs = unique_docs([6, 5, 3, 2, 4])  # rows of width 9
    rows = packing.pack_first_fit(docs, 8)
    # 6 -> row 0 (3 left); 5 -> row 1 (4 left); 3 -> row 0 (full); 2 -> row 1 (2 left); 4 -> row 2.
    np.testing.assert_array_equal(rows.segment_ids, [[1] * 6 + [2] * 3, [1] * 5 + [2] * 2 + [0, 0], [1] * 4 + [0] * 5])
    assert rows.tokens[0, 6] == docs[2][0] and rows.tokens[1, 5] == docs[3][0]


def test_concat_split_and_first_fit_batches_keep_documents_apart_in_the_model():
    cfg = small_config("llama")
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, cfg.model.vocab_size, int(n)).astype(np.int32) for n in rng.integers(3, 20, 200)]
    for pack in (packing.pack_first_fit, packing.pack_concat_split):
        rows = pack(docs, cfg.data.seq_len)
        ds = pipeline.train_dataset([[rows]], [1.0], cfg.train.global_batch_size, seed=0)
        assert_segments_isolated(cfg, ds[0])
