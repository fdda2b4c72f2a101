"""Shakespeare corpus, tokenizer, packing and the process-sharded, resumable batch stream."""

import numpy as np
import pytest

from conftest import EVAL_PLAYS
from slimjax.data import pipeline, shakespeare, tokenizer
from slimjax.errors import SlimjaxError


def test_corpus_holds_out_whole_plays():
    train, held = shakespeare.load(EVAL_PLAYS)
    assert len(shakespeare.list_plays()) == 38
    assert any(d.startswith("Hamlet\n") for d in held) and not any(d.startswith("Hamlet\n") for d in train)
    assert sum(map(len, train)) > 4_000_000 and sum(map(len, held)) > 300_000
    assert "**" not in train[0] and "HAMLET:" in "".join(held)
    with pytest.raises(SlimjaxError, match="unknown play 'hamlett' \\(did you mean 'hamlet'\\?\\)"):
        shakespeare.load(("hamlett",))


def test_tokenizer_round_trips_text_with_newlines(spm_path):
    tok = tokenizer.SentencePieceTokenizer(spm_path)
    text = "HAMLET:\nTo be, or not to be: that is the question.\n\n  Enter GHOST\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 1024 and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)


def test_tokenizer_file_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(SlimjaxError, match="is not a SentencePiece model"):
        tokenizer.SentencePieceTokenizer(bad)


def test_packing_keeps_every_token_once_and_labels_segments():
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 100, size=int(n)).astype(np.int32) for n in rng.integers(1, 40, size=50)]
    seq = 16
    rows = pipeline.pack_concat_split(docs, seq, pad_last=True)
    stream = np.concatenate(docs)
    # Rows overlap by one token; dropping each row's first token recovers the stream exactly once.
    rebuilt = np.concatenate([rows.tokens[0, :1]] + [r[1:] for r in rows.tokens])
    n_pad = len(rebuilt) - len(stream)
    np.testing.assert_array_equal(rebuilt[: len(stream)], stream)
    assert (rebuilt[len(stream):] == 0).all() and n_pad < seq
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    start_of = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    for r in range(len(rows)):
        for c in range(seq + 1):
            i = r * seq + c
            if i >= len(stream):
                assert rows.segment_ids[r, c] == 0
                continue
            # same document <=> same segment id within a row
            assert rows.segment_ids[r, c] == doc_of[i] - doc_of[r * seq] + 1
            assert rows.positions[r, c] == min(i - start_of[doc_of[i]], c)
    example = pipeline.to_example(rows[0])
    assert example["inputs"].shape == (seq,)
    crossing = example["segment_ids"][:-1] != example["segment_ids"][1:]
    assert (example["loss_mask"][:-1][crossing] == 0).all()


def test_process_shards_assemble_the_single_process_batch_and_resume_by_index():
    rng = np.random.default_rng(0)
    # 4 logical shards, 2 sources each (weights 3:1), 2 rows per shard per step -> global batch 8.
    shards = [[pipeline.pack_concat_split([rng.integers(4, 99, size=int(n)).astype(np.int32)
                                           for n in rng.integers(5, 60, size=20)], 8) for _ in range(2)]
              for _ in range(4)]
    one = pipeline.train_dataset(shards, [3.0, 1.0], rows_per_shard=2, seed=3)
    two = [pipeline.train_dataset(shards[2 * p: 2 * p + 2], [3.0, 1.0], 2, seed=3, first_shard=2 * p) for p in (0, 1)]
    for step in (0, 1, 7, 40):  # 40 crosses epoch boundaries
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([two[0][step][key], two[1][step][key]]), one[step][key])
    assert not np.array_equal(one[0]["inputs"], one[1]["inputs"])
    it = pipeline.iterate(one)
    for _ in range(5):
        next(it)
    resumed = pipeline.iterate(one, state=it.get_state())  # what a checkpoint stores
    np.testing.assert_array_equal(next(resumed)["inputs"], one[5]["inputs"])
    np.testing.assert_array_equal(next(it)["inputs"], one[5]["inputs"])
    # Epochs are reshuffled: the first rows of source 0 in epoch 2 are not those of epoch 1.
    stream = pipeline.shard_stream(shards[0], [3.0, 1.0], seed=3, shard=0)
    first = [stream[i]["tokens"] for i in range(4)]
    n0 = len(shards[0][0])
    source0 = [i for i in range(8 * n0) if i % 4 != 3]  # weights 3:1 interleave 0,0,0,1
    second = [stream[i]["tokens"] for i in source0[n0: n0 + 3]]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))
    # Each source's share of rows follows its weight.
    seen = [stream[i]["tokens"].tobytes() for i in range(400)]
    from_1 = {r.tobytes() for r in shards[0][1].tokens}
    assert sum(s in from_1 for s in seen) == 100


def test_eval_batches_cover_every_row_once():
    docs = [np.arange(4, 4 + n, dtype=np.int32) for n in range(5, 40)]
    rows = pipeline.pack_concat_split(docs, 8, pad_last=True)
    batches = pipeline.eval_batches(rows, 4, max_batches=0)
    seen = sum(float(b["loss_mask"].sum()) for b in batches)
    assert seen == sum(float(pipeline.to_example(rows[i])["loss_mask"].sum()) for i in range(len(rows)))
    halves = [pipeline.eval_batches(rows, 4, 0, p, 2) for p in (0, 1)]
    for b, h0, h1 in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), b["inputs"])
