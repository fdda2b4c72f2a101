"""Document-level text transforms shared by the loader and ``slimjax prepare``.

``normal_form`` is SlimPajama's comparison form (lower-cased, ASCII punctuation removed,
whitespace runs collapsed to one space, ends stripped): the short-document filter measures it,
and MinHash shingles and exact-duplicate hashes are taken over it.
"""

from __future__ import annotations

import hashlib
import string
import unicodedata

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def nfc(text: str) -> str:
    """Unicode NFC normalisation (composed characters), as SlimPajama applied to every document."""
    return unicodedata.normalize("NFC", text)


def normal_form(text: str) -> str:
    """Lower-cased, punctuation stripped, whitespace collapsed: the text SlimPajama compared."""
    # str.split() splits on runs of the same Unicode whitespace as re's \s, several times faster.
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def too_short(text: str, min_chars: int) -> bool:
    """SlimPajama's short-document filter: fewer than ``min_chars`` characters in normal form."""
    return min_chars > 0 and len(normal_form(text)) < min_chars


def exact_hash(normal: str) -> bytes:
    """A 16-byte digest of a document's normal form (exact-duplicate and decontamination key)."""
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()
