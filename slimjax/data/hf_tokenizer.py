"""A Hugging Face ``tokenizer.json`` (what imported models ship) through the ``tokenizers`` library.

BOS and EOS are found among the special tokens the common model families use; a tokenizer with
only an end-of-text token (GPT-2) uses it for both. Padding positions are masked out of the loss
and attention, so the pad id is only a placeholder.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from slimjax.errors import SlimjaxError

BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|endoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")


class HFTokenizer:
    """Typed wrapper over ``tokenizers.Tokenizer`` (no special tokens added by its post-processor)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise SlimjaxError(f"data.tokenizer '{self.path}' does not exist; give a Hugging Face "
                               "tokenizer.json file")
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception for any unreadable file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SlimjaxError(f"tokenizer file '{self.path}' is not a Hugging Face tokenizer.json: {first}") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eos = self._first_known(EOS_CANDIDATES)
        bos = self._first_known(BOS_CANDIDATES)
        if eos is None:
            raise SlimjaxError(f"tokenizer '{self.path}' has none of the end-of-document tokens "
                               f"{', '.join(EOS_CANDIDATES)}; slimjax needs one to separate documents")
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos
        self.pad_id = 0

    def _first_known(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            i = self._tok.token_to_id(token)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
