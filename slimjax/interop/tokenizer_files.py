"""A run's tokenizer in an exported Hugging Face directory, set up so ``transformers`` encodes a
prompt as slimjax does (BOS first, no EOS, no other special tokens) and ``generate`` stops at
slimjax's EOS.

slimjax encodes text without special tokens and puts BOS before every document and prompt
itself. A copied ``tokenizer.model`` or ``tokenizer.json`` alone does not say so: transformers then
adds nothing (or whatever the file's own post-processor adds). So the export writes
``tokenizer_config.json`` (``add_bos_token``, the BOS/EOS tokens), a ``tokenizer.json`` whose
post-processor prepends BOS (for Hugging Face tokenizers), BOS/EOS ids in ``config.json`` and
``generation_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil

from slimjax.errors import SlimjaxError
from slimjax.interop import hf_config

TOKENIZER_JSON = "tokenizer.json"
SPM_FILE = "tokenizer.model"  # what transformers' Llama tokenizers read
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def export_tokenizer(out_dir: str, kind: str, path: str, bos_id: int, eos_id: int) -> list[str]:
    """Writes the tokenizer files of a ``kind`` ("huggingface" or "sentencepiece") tokenizer at
    ``path`` into ``out_dir`` (which already holds ``config.json``); returns the names written.
    A byte tokenizer has no Hugging Face counterpart: only the BOS/EOS ids are written."""
    files: list[str] = []
    tokens = None
    if kind == "huggingface":
        from tokenizers import Tokenizer, processors

        tok = Tokenizer.from_file(path)
        tokens = tok.id_to_token(bos_id), tok.id_to_token(eos_id)
        # Exactly slimjax's encoding: BOS, then the text's tokens (the file's own template, e.g. an
        # EOS appended or no BOS at all, would differ).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[0]} $A", pair=f"{tokens[0]} $A $B", special_tokens=[(tokens[0], bos_id)])
        tok.save(os.path.join(out_dir, TOKENIZER_JSON))
        files.append(TOKENIZER_JSON)
    elif kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        tokens = sp.id_to_piece(bos_id), sp.id_to_piece(eos_id)
        shutil.copyfile(path, os.path.join(out_dir, SPM_FILE))
        files.append(SPM_FILE)
    elif kind != "byte":
        raise SlimjaxError(f"cannot export a {kind!r} tokenizer; known kinds: huggingface, sentencepiece, byte")
    if tokens is not None:
        _write_json(os.path.join(out_dir, TOKENIZER_CONFIG),
                    {"add_bos_token": True, "add_eos_token": False, "bos_token": tokens[0], "eos_token": tokens[1]})
        files.append(TOKENIZER_CONFIG)
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    _write_json(os.path.join(out_dir, GENERATION_CONFIG), ids)
    files.append(GENERATION_CONFIG)
    config_path = os.path.join(out_dir, hf_config.CONFIG_FILE)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    _write_json(config_path, {**config, **ids})
    return files


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
