"""A damaged safetensors file is one line naming it (exit 2 from `slimjax import`), checked for
every tensor's byte range before any data is read; files written by slimjax itself pass."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from hf_models import save

from slimjax.cli import main
from slimjax.errors import SlimjaxError
from slimjax.interop.safetensors_io import SINGLE_FILE, TensorFile, write_file

SPECS = [("a", (3, 4), np.float32), ("b", (5,), np.int8), ("c", (2, 2), np.float16)]
VALUES = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int8),
          "c": np.ones((2, 2), np.float16)}


def written(tmp_path) -> str:
    path = str(tmp_path / "t.safetensors")
    write_file(path, SPECS, VALUES.__getitem__)
    return path


def header_of(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite(path, header, data):
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)


def test_a_file_written_by_slimjax_reads_back(tmp_path):
    tf = TensorFile(written(tmp_path))
    for name, value in VALUES.items():
        np.testing.assert_array_equal(tf.array(name), value)


# Data: a = bytes 0-48, b = 48-53, c = 53-61. A cut inside c, at its start, or inside a.
@pytest.mark.parametrize("cut,tensor", [(1, "c"), (8, "c"), (30, "a")])
def test_a_truncated_file_names_the_cut_tensor(tmp_path, cut, tensor):
    path = written(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with pytest.raises(SlimjaxError, match=rf"t\.safetensors' is not a readable safetensors file: tensor '{tensor}' "
                                           rf"ends at data byte \d+, but the file holds only {61 - cut} bytes"):
        TensorFile(path)


@pytest.mark.parametrize("change,message", [
    (lambda h: h["a"].update(data_offsets=[0, 40]), r"tensor 'a' has 40 bytes for shape \(3, 4\) F32 \(48 expected\)"),
    (lambda h: h["b"].update(data_offsets=[40, 45]), "tensors 'a' and 'b' overlap"),
    (lambda h: h["b"].update(dtype="Q7"), "tensor 'b' has dtype 'Q7'"),
    (lambda h: h["b"].update(shape=[-5]), r"tensor 'b' has shape \[-5\]"),
    (lambda h: h["c"].update(data_offsets=[60]), r"tensor 'c' has data_offsets \[60\]"),
    (lambda h: h.update(d="x"), "tensor 'd' has no dtype/shape/data_offsets entry"),
])
def test_a_corrupt_header_entry_is_named(tmp_path, change, message):
    path = written(tmp_path)
    header, data = header_of(path)
    change(header)
    rewrite(path, header, data)
    with pytest.raises(SlimjaxError, match=message):
        TensorFile(path)


@pytest.mark.parametrize("raw,message", [
    (b"\x05\x00", "shorter than its 8-byte header length"),
    (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 runs past the end of the file"),
    (struct.pack("<Q", 6) + b"{nope}", "Expecting property name"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
])
def test_a_broken_header_is_one_error(tmp_path, raw, message):
    path = tmp_path / "t.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SlimjaxError, match=message):
        TensorFile(str(path))


def test_import_of_a_truncated_model_exits_2_in_one_line(tmp_path, capsys):
    hf_dir = save("llama_gqa", str(tmp_path / "hf"))
    model = os.path.join(hf_dir, SINGLE_FILE)
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) - 100)  # a download cut short
    workdir = tmp_path / "run"
    capsys.readouterr()  # transformers' own progress output while saving
    assert main(["import", f"--hf_dir={hf_dir}", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and model in err[0] and "truncated" in err[0], err
    assert not workdir.exists()
    # The corrupt header of a real file too.
    shutil.copyfile(model, model + ".bak")
    with open(model, "r+b") as f:
        f.seek(8)
        f.write(b"#")
    assert main(["import", f"--hf_dir={hf_dir}", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and model in err[0] and "not a readable safetensors file" in err[0]
    assert not workdir.exists()
