"""Encoder pre-training rows: BERT's masking rule (statistics, specials, whole words), NSP/SOP
pairs, row layout, and determinism (same seed, same rows; each row keyed by its index)."""

import dataclasses

import numpy as np
import pytest

from slimjax import config as C
from slimjax.configs import base
from slimjax.data import mlm

SPECIALS = mlm.Specials(cls=2, sep=3, pad=0, mask=1, vocab_size=300)
SEQ = 64


def pretrain(**kw) -> C.PretrainConfig:
    return dataclasses.replace(C.validate(base.get_config()).pretrain, **kw)


def docs(n=30, seed=0):
    rng = np.random.default_rng(seed)
    # Each document's ids live in its own range, so a piece tells which document it came from.
    return [rng.integers(10 + 9 * d, 19 + 9 * d, size=int(rng.integers(40, 120))) for d in range(n)]


def rows(cfg, n, words=None, seed=0):
    pieces = mlm.cut_pieces(docs(), (SEQ - 3) // 2)
    return pieces, [mlm.make_row(pieces, int(pieces.anchors[i % len(pieces)]), SEQ, cfg, SPECIALS,
                                 mlm.row_rng(seed, 0, i), words) for i in range(n)]


def within(count, n, p, sigmas=4.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_masking_follows_the_80_10_10_rule_and_never_touches_specials():
    _, rs = rows(pretrain(mask_rate=0.15), 1500)
    chosen = kept = masked = randomised = 0
    for r in rs:
        body = r["segment_ids"] == 1
        original = np.where(r["mlm_weights"] > 0, r["mlm_targets"], r["inputs"])
        special = np.isin(original, [SPECIALS.cls, SPECIALS.sep]) | ~body
        picked = r["mlm_weights"] > 0
        assert not (picked & special).any()  # [CLS], [SEP] and padding are never chosen
        assert (r["inputs"][special] == original[special]).all()
        assert picked.sum() == max(1, round(0.15 * (~special).sum()))  # the rate, exactly per row
        got = r["inputs"][picked]
        masked += (got == SPECIALS.mask).sum()
        kept += (got == original[picked]).sum()
        replaced = (got != SPECIALS.mask) & (got != original[picked])
        randomised += replaced.sum()
        assert not np.isin(got[replaced], [SPECIALS.cls, SPECIALS.sep, SPECIALS.pad, SPECIALS.mask]).any()
        chosen += picked.sum()
    # A random replacement equals the original with probability 1/(vocab - 4): counted as kept.
    p_same = 1 / (SPECIALS.vocab_size - 4)
    assert within(masked, chosen, 0.8)
    assert within(randomised, chosen, 0.1 * (1 - p_same))
    assert within(kept, chosen, 0.1 + 0.1 * p_same)


def test_whole_word_masking_chooses_whole_words():
    table = np.full(SPECIALS.vocab_size, mlm.CONTINUES, np.int8)
    table[np.arange(0, SPECIALS.vocab_size, 3)] = mlm.STARTS  # every third id begins a word
    table[17] = mlm.ALONE
    _, rs = rows(pretrain(mask_rate=0.2, whole_word=True), 300, words=table)
    multi_token_words = 0
    for r in rs:
        original = np.where(r["mlm_weights"] > 0, r["mlm_targets"], r["inputs"])
        candidate = (r["segment_ids"] == 1) & ~np.isin(original, [SPECIALS.cls, SPECIALS.sep])
        begins = mlm.word_begins(original, table) | ~np.r_[False, candidate[:-1]]
        word = np.cumsum(begins)
        picked = r["mlm_weights"] > 0
        for w in np.unique(word[candidate]):
            members = picked[(word == w) & candidate]
            assert members.all() or not members.any(), "a word was split"
            multi_token_words += members.all() and len(members) > 1
        assert picked.any()
    assert multi_token_words > 50  # the test saw real multi-token words being masked


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pairs_are_built_as_their_labels_say(task):
    pieces, rs = rows(pretrain(pair_task=task), 1000)
    labels = []
    for i, r in enumerate(rs):
        anchor = int(pieces.anchors[i % len(pieces)])
        tok, types, n = r["mlm_targets"], r["token_types"], int(r["segment_ids"].sum())
        original = np.where(r["mlm_weights"] > 0, tok, r["inputs"])[:n]
        first_sep = int(np.flatnonzero(original == SPECIALS.sep)[0])
        a, b = original[1:first_sep], original[first_sep + 1:n - 1]
        assert original[0] == SPECIALS.cls and original[n - 1] == SPECIALS.sep
        assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:n] == 1).all() and (types[n:] == 0).all()
        this, following = pieces.tokens[anchor], pieces.tokens[anchor + 1]
        label = int(r["nsp_labels"])
        if label == 0:
            assert np.array_equal(a, this) and np.array_equal(b, following)
        elif task == "sop":
            assert np.array_equal(a, following) and np.array_equal(b, this)
        else:  # a piece of another document (document d's ids lie in [10 + 9d, 19 + 9d))
            assert np.array_equal(a, this) and len(b)
            assert ((b - 10) // 9 != pieces.doc[anchor]).all()
        labels.append(label)
    assert within(sum(labels), len(labels), 0.5)


def test_same_seed_same_rows_and_each_row_keyed_by_its_index():
    cfg = pretrain()
    _, first = rows(cfg, 20, seed=3)
    _, again = rows(cfg, 20, seed=3)
    _, other = rows(cfg, 20, seed=4)
    for a, b in zip(first, again):
        for k in a:
            assert np.array_equal(a[k], b[k])
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_train_stream_is_a_pure_function_of_the_step():
    pieces = mlm.cut_pieces(docs(), (SEQ - 3) // 2)
    make = lambda: mlm.train_dataset([[pieces], [pieces]], [1.0], 4, 7, 0, SEQ, pretrain(), SPECIALS, None)  # noqa
    ds, fresh = make(), make()
    for step in (0, 5, 40):  # resuming at a step is indexing the same stream
        a, b = ds[step], fresh[step]
        assert a["inputs"].shape == (8, SEQ) and a["nsp_labels"].shape == (8,)
        for k in a:
            assert np.array_equal(a[k], b[k])
    other_seed = mlm.train_dataset([[pieces], [pieces]], [1.0], 4, 8, 0, SEQ, pretrain(), SPECIALS, None)
    assert not np.array_equal(ds[0]["inputs"], other_seed[0]["inputs"])
