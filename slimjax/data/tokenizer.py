"""Tokenizers: SentencePiece (train one on a corpus, cached in the workdir, or load a ``.model``),
a Hugging Face ``tokenizer.json`` (see ``hf_tokenizer``) and a byte-level fallback.

Newlines matter for scripts and code, so the SentencePiece trainer keeps whitespace as written
(identity normalisation, no whitespace folding) and makes ``\\n`` a symbol of its own; byte
fallback means no character is ever unknown. Ids 0..3 are pad, unk, bos, eos.
"""

from __future__ import annotations

import io
import os
import pathlib
import random
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import sentencepiece as spm

from slimjax.errors import SlimjaxError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_NAME = "spm.model"


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    path: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 4..259 after pad, unk, bos, eos: needs no file and never fails."""

    path = "byte"
    vocab_size = 256 + 4
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 4).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """Thin typed wrapper over ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise SlimjaxError(f"tokenizer file '{self.path}' is not a SentencePiece model: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.vocab_size = int(self._sp.GetPieceSize())
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, self._sp.bos_id(), self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.EncodeAsIds(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def pieces(self) -> list[str]:
        """Every id's piece, in id order (whole-word masking reads word starts from them)."""
        return [self._sp.IdToPiece(i) for i in range(self.vocab_size)]


def paragraphs(docs: Iterable[str], max_bytes: int = 4000) -> Iterable[str]:
    """Training 'sentences': blank-line separated blocks, newlines kept, cut to SentencePiece's limit."""
    for doc in docs:
        for block in doc.split("\n\n"):
            block = block.strip("\n")
            while block:
                yield block[:max_bytes]
                block = block[max_bytes:]


# Threads of SentencePiece's trainer. Fixed, not the host's core count: the unigram trainer's
# result depends on how its EM steps split sentences among threads (measured: 1, 2 and 4 threads
# gave three different vocabularies on the plays), so a core count would make the model differ
# from machine to machine. BPE does not depend on it.
TRAINER_THREADS = 8
SAMPLE_SEED = 0


def sample_sentences(sentences: Iterable[str], k: int, seed: int = SAMPLE_SEED) -> list[str]:
    """At most ``k`` of ``sentences``, a uniform sample drawn with a fixed seed (reservoir
    sampling), in their input order; all of them when there are ``k`` or fewer."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, sentence in enumerate(sentences):
        if i < k:
            reservoir.append((i, sentence))
        elif (j := rng.randrange(i + 1)) < k:
            reservoir[j] = (i, sentence)
    return [sentence for _, sentence in sorted(reservoir)]


def train_sentencepiece(docs: Iterable[str], vocab_size: int, model_type: str,
                        out_path: str | os.PathLike, max_sentences: int = 2_000_000) -> SentencePieceTokenizer:
    """Trains a tokenizer on ``docs`` (at most ``max_sentences`` of their paragraphs, sampled) and
    writes it atomically to ``out_path``. The same documents give the same model bytes."""
    # Deterministic by construction: SentencePiece's own sampling (input_sentence_size with
    # shuffle_input_sentence) seeds from std::random_device, so a corpus larger than the sample
    # gave a different model in every process; here the sample is drawn with a fixed seed and
    # SentencePiece is given exactly it. The model is returned in memory (model_writer) rather than
    # written under a prefix, because the prefix (a fresh temporary directory) is recorded in the
    # model's trainer spec and made its bytes differ from run to run.
    sample = sample_sentences(paragraphs(docs), max_sentences)
    if not sample:
        raise SlimjaxError(f"no text to train a SentencePiece tokenizer on (for '{out_path}'): the "
                           "training documents are empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_by_whitespace=True, user_defined_symbols=["\n"], pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=TRAINER_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise SlimjaxError(f"SentencePiece training failed (vocab_size={vocab_size}): "
                           f"{str(e).splitlines()[-1]}") from None
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)  # atomic: a reader never sees half a model
    return SentencePieceTokenizer(out_path)


def cached_model_path(workdir: str | os.PathLike) -> pathlib.Path:
    """Where a run caches the SentencePiece model it trained (``<workdir>/tokenizer/spm.model``)."""
    return pathlib.Path(workdir) / "tokenizer" / MODEL_NAME


def get_tokenizer(kind: str, path: str, workdir: str | os.PathLike, vocab_size: int, model_type: str,
                  docs: Callable[[], Iterable[str]]) -> Tokenizer:
    """The configured tokenizer. For SentencePiece: ``path`` if given, else the workdir's cached
    model, else one trained on ``docs()`` and cached."""
    if kind != "sentencepiece":
        if kind == "byte":
            tok: Tokenizer = ByteTokenizer()
        else:
            from slimjax.data.hf_tokenizer import HFTokenizer

            tok = HFTokenizer(path)
        if tok.vocab_size > vocab_size:
            raise SlimjaxError(f"tokenizer '{tok.path}' has {tok.vocab_size} ids but model.vocab_size is "
                               f"{vocab_size}; raise model.vocab_size to at least {tok.vocab_size}")
        return tok
    if path:
        if not os.path.isfile(path):
            raise SlimjaxError(f"data.tokenizer '{path}' does not exist; give a SentencePiece .model "
                               "file or '' to train one")
        tok = SentencePieceTokenizer(path)
    else:
        cached = cached_model_path(workdir)
        tok = SentencePieceTokenizer(cached) if cached.exists() else train_sentencepiece(
            docs(), vocab_size, model_type, cached)
    if tok.vocab_size != vocab_size:
        raise SlimjaxError(f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size is "
                           f"{vocab_size}; make them equal (or delete the cached tokenizer to retrain)")
    return tok


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Each document as int32 ids wrapped in BOS ... EOS."""
    return [np.asarray([tok.bos_id, *ids, tok.eos_id], np.int32) for ids in tok.encode_batch(docs)]
