"""Every source type on small files the tests write (TFDS: a dataset built here), tokenizers, and
one-line errors or counted skips for bad input."""

import json
import subprocess
import sys

import pytest
import zstandard

from slimjax import config as C
from slimjax.configs import base
from slimjax.data import loader, sources, tokenizer
from slimjax.data.hf_tokenizer import HFTokenizer
from slimjax.errors import SlimjaxError


def src(spec, **fields):
    return C.parse_source("test", {**({"kind": spec} if ":" not in spec else
                                      {"kind": spec.split(":", 1)[0], "path": spec.split(":", 1)[1]}), **fields})


def read_all(source, split="train", strict=False):
    stats = sources.ReadStats()
    records = list(sources.read(source, sources.units(source, split), strict=strict, stats=stats))
    return records, stats


def write_jsonl(path, lines, compress=None):
    data = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines).encode()
    if compress or str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_text_files_directories_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document\n")
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "two.md").write_text("second, caf\u00e9\n")
    (tmp_path / "a" / "three.txt").write_bytes(b"bad \xff byte\n")
    records, stats = read_all(src(f"text:{tmp_path / 'a'}"))  # a directory: every file below it
    assert [r.text for r in records] == ["second, caf\u00e9\n", "first document\n"]
    assert [r.key for r in records] == [(0, 0), (1, 0)]  # keys follow the sorted file list
    assert stats.skipped == {"non-UTF-8 bytes": 1} and "three.txt" in stats.first["non-UTF-8 bytes"]
    records, _ = read_all(src(f"text:{tmp_path}/**/*.txt"))
    assert [r.text for r in records] == ["first document\n"]
    with pytest.raises(SlimjaxError, match="non-UTF-8 bytes"):
        read_all(src(f"text:{tmp_path}/a/three.txt"), strict=True)


def test_jsonl_plain_and_zstd_in_the_slimpajama_layout(tmp_path):
    rows = [{"text": f"doc {i}", "meta": {"redpajama_set_name": name}}
            for i, name in enumerate(["RedPajamaC4", "RedPajamaGithub", "RedPajamaC4"])]
    write_jsonl(tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst", rows)
    write_jsonl(tmp_path / "train" / "chunk2" / "example_train_1.jsonl", rows[:1])
    every, _ = read_all(src(f"jsonl:{tmp_path}/train/**/*.jsonl*"))
    assert [r.text for r in every] == ["doc 0", "doc 1", "doc 2", "doc 0"]
    assert every[1].meta == {"redpajama_set_name": "RedPajamaGithub"} and every[1].where.endswith(".zst:2")
    c4, _ = read_all(src(f"jsonl:{tmp_path}/train/**/*.zst", set_name="RedPajamaC4"))
    assert [r.key for r in c4] == [(0, 0), (0, 2)]
    # The slimpajama preset: the seven sets with SlimPajama's weights (times the entry's weight).
    expanded = loader.expand((src(f"slimpajama:{tmp_path}/train/**/*.zst", weight=2.0),))
    assert [s.set_name for s in expanded] == list(sources.SLIMPAJAMA_MIXTURE)
    assert sum(s.weight for s in expanded) == pytest.approx(2.0)


def test_malformed_jsonl_records_are_counted_or_fail_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": \n{"txt": "no text"}\n{"text": "caf\xff"}\n\n{"text": "last"}\n')
    records, stats = read_all(src(f"jsonl:{path}"))
    assert [r.text for r in records] == ["good", "last"]
    assert stats.skipped == {"malformed JSON": 1, "no 'text' string field": 1, "non-UTF-8 bytes": 1}
    assert stats.first["malformed JSON"].startswith(f"{path}:2")
    with pytest.raises(SlimjaxError, match=f"{path}:2: .*malformed JSON"):
        read_all(src(f"jsonl:{path}"), strict=True)


def test_broken_zstd_frame_is_counted_or_fails(tmp_path):
    good = zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 1000)
    path = tmp_path / "broken.jsonl.zst"
    path.write_bytes(good[: len(good) // 2] + b"\x00garbage" * 20)
    records, stats = read_all(src(f"jsonl:{path}"))
    assert len(records) < 1000 and list(stats.skipped) == ["broken zstd data (rest of file skipped)"]
    with pytest.raises(SlimjaxError, match="broken.jsonl.zst: after line"):
        read_all(src(f"jsonl:{path}"), strict=True)


def test_stdlib_source_is_always_there():
    records = list(sources.read(src("stdlib"), sources.units(src("stdlib"))[:50]))
    assert len(sources.units(src("stdlib"))) > 1000
    assert any("def " in r.text for r in records)
    assert not any("site-packages" in r.where for r in records)


TFDS_BUILDER = '''
import tensorflow_datasets as tfds

class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(100, 106)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"text": f"record {i}: " + "words " * (i % 7 + 20)}

TinyText(data_dir=DATA_DIR, file_format="array_record").download_and_prepare()
'''


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A small TFDS dataset (ArrayRecord files) built from local data by a TFDS builder."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    result = subprocess.run([sys.executable, "-c", f"DATA_DIR = {data_dir!r}\n" + TFDS_BUILDER],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return data_dir


def test_tfds_source_through_data_source_without_tensorflow(tfds_dir):
    train = src("tfds:tiny_text", data_dir=tfds_dir, eval_path="test")
    records, _ = read_all(train)
    assert len(records) == 30 and {int(r.text.split()[1][:-1]) for r in records} == set(range(30))
    held, _ = read_all(train, split="eval")
    assert sorted(int(r.text.split()[1][:-1]) for r in held) == list(range(100, 106))
    assert "tensorflow" not in sys.modules
    with pytest.raises(SlimjaxError, match="TFDS dataset 'no_such_set' split 'train' cannot be opened"):
        read_all(src("tfds:no_such_set", data_dir=tfds_dir))


def test_common_path_imports_neither_tensorflow_nor_tfds(tmp_path):
    (tmp_path / "d.txt").write_text("hello world\n" * 50)
    code = (f"import sys\nfrom slimjax import config as C\nfrom slimjax.data import sources\n"
            f"s = C.parse_source('x', 'text:{tmp_path}/*.txt')\n"
            "assert len(list(sources.read(s, sources.units(s)))) == 1\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_byte_and_hugging_face_tokenizers(tmp_path):
    byte = tokenizer.ByteTokenizer()
    text = "HAMLET:\nTo be, or not \u2014 caf\u00e9\n"
    assert byte.decode(byte.encode(text)) == text and max(byte.encode(text)) < byte.vocab_size
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["to be or not to be that is the question"] * 50,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = HFTokenizer(path)
    assert tok.bos_id == tok.eos_id == hf.token_to_id("<|endoftext|>")  # GPT-2 style: one token for both
    assert tok.decode(tok.encode_batch([text])[0]) == text
    with pytest.raises(SlimjaxError, match=f"has {hf.get_vocab_size()} ids but model.vocab_size is 256"):
        tokenizer.get_tokenizer("huggingface", str(path), tmp_path, 256, "bpe", lambda: [])


@pytest.mark.parametrize("kind,contents,message", [
    ("huggingface", "{not json", "is not a Hugging Face tokenizer.json"),
    ("sentencepiece", "not a model", "is not a SentencePiece model"),
    ("huggingface", None, "does not exist"),
])
def test_tokenizer_file_that_is_not_one(tmp_path, kind, contents, message):
    path = tmp_path / "tok"
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(SlimjaxError, match=message):
        tokenizer.get_tokenizer(kind, str(path), tmp_path, 1024, "bpe", lambda: [])


def test_bad_source_entries_name_themselves():
    with pytest.raises(SlimjaxError, match=r"'data.sources\[0\].weight' must be > 0, got -1.0"):
        C.parse_source("data.sources[0]", {"kind": "stdlib", "weight": -1})
    with pytest.raises(SlimjaxError, match=r"unknown config key 'data.sources\[1\].wieght' \(did you mean"):
        C.parse_source("data.sources[1]", {"kind": "stdlib", "wieght": 2})
    with pytest.raises(SlimjaxError, match="kind 'jsonl'.* needs a path"):
        C.parse_source("data.sources[0]", "jsonl")
    c = base.get_config()
    c.data.sources = ("stdlib", {"kind": "shakespeare", "weight": 0.5})
    assert [s.kind for s in C.validate(c).data.sources] == ["stdlib", "shakespeare"]
    with pytest.raises(SlimjaxError, match="matches no file"):
        sources.units(src("text:/no/such/dir/*.txt"))


def test_loader_errors_for_an_empty_or_too_small_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    c = base.get_config()
    c.data.sources = (f"text:{tmp_path}/*.txt",)
    c.data.tokenizer_kind, c.data.eval_fraction = "byte", 0.0
    cfg = C.validate(c)
    with pytest.raises(SlimjaxError, match="no held-out documents"):
        loader.build(cfg.data, 16, 0, 1, 1024, str(tmp_path / "w"))
    c.data.sources = ({"kind": "text", "path": f"{tmp_path}/*.txt", "eval_path": f"{tmp_path}/*.txt"},)
    with pytest.raises(SlimjaxError, match="gives no rows of data.seq_len=128 in shard 0 of 16"):
        loader.build(C.validate(c).data, 16, 0, 1, 1024, str(tmp_path / "w"))


def test_loader_normalises_filters_and_holds_out_by_key(tmp_path):
    for i in range(60):
        (tmp_path / f"{i:02d}.txt").write_text(("cafe\u0301 " * (i + 1)) if i % 3 else "short")
    c = base.get_config()
    c.data.sources = (f"text:{tmp_path}/*.txt",)
    c.data.min_doc_chars, c.data.eval_fraction = 6, 0.25
    cfg = C.validate(c).data
    train = dict(loader.documents(cfg, cfg.sources[0], "train", lambda key: True, sources.ReadStats()))
    held = dict(loader.documents(cfg, cfg.sources[0], "eval", lambda key: True, sources.ReadStats()))
    assert not set(train) & set(held) and len(train) + len(held) == 40  # 20 "short" files dropped
    # The hash of the file's name below the glob's fixed prefix and the record index alone decides.
    names = sources.unit_names(cfg.sources[0], sources.units(cfg.sources[0]))
    assert names[:2] == ["00.txt", "01.txt"]
    assert set(held) == {k for k in set(train) | set(held) if loader.held_out(names[k[0]], k[1], 0.25)}
    assert held
    assert all(doc.startswith("caf\u00e9 ") for doc in train.values())  # NFC composed the accent
    assert held == dict(loader.documents(cfg, cfg.sources[0], "eval", lambda key: True, sources.ReadStats()))
