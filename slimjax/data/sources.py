"""Document sources: the bundled plays, Python's own standard library, text files, JSON Lines
(plain or zstd, SlimPajama layout) and TFDS datasets read through ``tfds.data_source``.

A source is a list of *units* (files, plays, a TFDS split) read in a fixed order; every record
has a key ``(unit index, record index)`` that does not depend on how many processes read, so
sharding and held-out splits are pure functions of the key. Readers take a ``want(key)``
predicate and skip unwanted records before parsing them (unwanted files are never opened).

Bad records (malformed JSON, a missing text field, non-UTF-8 bytes, a broken zstd frame) are
skipped and counted in :class:`ReadStats`, or raise :class:`SlimjaxError` with ``file:line``
when ``strict``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import pathlib
import sysconfig
from typing import Any, Callable, Iterator

from slimjax.config import SourceConfig
from slimjax.data import shakespeare
from slimjax.errors import SlimjaxError

Key = tuple[int, int]

# SlimPajama's seven RedPajama sets and their shares of the final token mixture (Cerebras,
# SlimPajama model card): CommonCrawl 52.2%, C4 26.7%, GitHub 5.2%, Books 4.2%, ArXiv 4.6%,
# Wikipedia 3.8%, StackExchange 3.3%.
SLIMPAJAMA_MIXTURE = {
    "RedPajamaCommonCrawl": 0.522, "RedPajamaC4": 0.267, "RedPajamaGithub": 0.052,
    "RedPajamaBook": 0.042, "RedPajamaArXiv": 0.046, "RedPajamaWikipedia": 0.038,
    "RedPajamaStackExchange": 0.033,
}
SET_NAME_KEY = "redpajama_set_name"
# RedPajama-Data-1T ships each set in a directory of its own (arxiv/, book/, c4/, common_crawl/,
# github/, stackexchange/, wikipedia/) and its records carry no set name; SlimPajama added
# meta.redpajama_set_name. The preset reads either: a record without the field is named by the
# set directory it lies under.
REDPAJAMA_DIRS = {
    "common_crawl": "RedPajamaCommonCrawl", "c4": "RedPajamaC4", "github": "RedPajamaGithub",
    "book": "RedPajamaBook", "arxiv": "RedPajamaArXiv", "wikipedia": "RedPajamaWikipedia",
    "stackexchange": "RedPajamaStackExchange",
}
_GLOB_MAGIC = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class Record:
    """One document: its key, text, metadata (JSON Lines ``meta``) and where it came from."""

    key: Key
    text: str
    meta: dict[str, Any]
    where: str


@dataclasses.dataclass
class ReadStats:
    """Records skipped while reading, by reason (reported, never silent)."""

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> first file:line

    def skip(self, reason: str, where: str, strict: bool, detail: str = "") -> None:
        if strict:
            raise SlimjaxError(f"{where}: {reason}{f' ({detail})' if detail else ''}; drop --strict / "
                               "data.strict to skip and count such records")
        self.drop(reason, where)

    def drop(self, reason: str, where: str) -> None:
        """Counts a record left out on purpose (empty, too short): never an error, even when strict."""
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)

    def merge(self, other: ReadStats) -> None:
        self.skipped.update(other.skipped)
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard library (always present: an always-available code corpus)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Every ``.py`` file of the standard library, sorted (installed packages left out)."""
    found = []
    for folder, subdirs, files in os.walk(stdlib_dir()):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        found.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return sorted(found)


def units(src: SourceConfig, split: str = "train", eval_plays: tuple[str, ...] = ()) -> list[str]:
    """The ordered units of ``src`` for ``split`` ("train" or "eval").

    Sources with their own held-out set (``eval_path``, or the held-out plays) list different
    units per split; the others list the same units for both and split records by key.
    """
    path = src.eval_path if split == "eval" and src.eval_path else src.path
    if src.kind == "prepared":
        raise SlimjaxError(f"data source '{describe(src)}' holds tokenized rows, not documents; only training reads "
                           "it (give the sources it was tokenized from to commands that read documents)")
    if src.kind == "shakespeare":
        plays = shakespeare.list_plays()
        shakespeare.check_plays(eval_plays, plays)
        return [str(p) for name, p in plays.items() if (name in eval_plays) == (split == "eval")]
    if src.kind == "stdlib":
        return stdlib_files()
    if src.kind == "tfds":
        return [src.eval_path if split == "eval" and src.eval_path else "train"]
    files = _expand(path)
    if not files:
        raise SlimjaxError(f"data source '{describe(src)}': '{path}' matches no file; check the path or glob")
    return files


def glob_root(pattern: str) -> str:
    """The fixed part of a glob: its leading path components without wildcards (a directory
    itself; a plain file's directory), as an absolute path."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    if os.path.isdir(pattern):
        return pattern
    parts = pathlib.PurePath(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_MAGIC & set(part)), len(parts) - 1)
    return str(pathlib.PurePath(*parts[:fixed]))


def unit_names(src: SourceConfig, unit_list: list[str], split: str = "train") -> list[str]:
    """A name for each unit that does not depend on where the corpus lives: files relative to the
    glob's fixed prefix (the standard library: to its directory), a TFDS split by its name."""
    if src.kind == "tfds":
        return list(unit_list)
    if src.kind == "shakespeare":
        return [os.path.basename(u) for u in unit_list]
    root = str(stdlib_dir()) if src.kind == "stdlib" else glob_root(
        src.eval_path if split == "eval" and src.eval_path else src.path)
    return [pathlib.PurePath(os.path.relpath(os.path.abspath(u), root)).as_posix() for u in unit_list]


def describe(src: SourceConfig) -> str:
    """The source as a user wrote it (kind and path or glob; the set, if one is kept), for messages."""
    where = f"{src.kind}:{src.path}" if src.path else src.kind
    return f"{where} (set {src.set_name})" if src.set_name else where


def has_own_eval(src: SourceConfig) -> bool:
    """True when held-out documents come from separate units rather than a share of the records."""
    return src.kind == "shakespeare" or bool(src.eval_path)


def read(src: SourceConfig, unit_list: list[str], want: Callable[[Key], bool] | None = None,
         strict: bool = False, stats: ReadStats | None = None, unit_ids: list[int] | None = None
         ) -> Iterator[Record]:
    """Records of the given units (``unit_ids`` are their indices in the full list, for keys)."""
    want = want or (lambda key: True)
    stats = stats if stats is not None else ReadStats()
    ids = unit_ids if unit_ids is not None else range(len(unit_list))
    if src.kind == "tfds":
        yield from _read_tfds(src, unit_list[0], want, strict, stats)
        return
    for u, path in zip(ids, unit_list):
        if src.kind == "shakespeare":
            for j, text in enumerate(shakespeare.scenes(pathlib.Path(path))):
                if want((u, j)):
                    yield Record((u, j), text, {SET_NAME_KEY: "shakespeare"}, f"{path}:{j}")
        elif src.kind in ("stdlib", "text"):
            if want((u, 0)):
                text = _read_text_file(path, strict, stats)
                if text is not None:
                    yield Record((u, 0), text, {SET_NAME_KEY: src.kind if src.kind == "stdlib" else "text"}, path)
        else:
            yield from _read_jsonl(src, u, path, want, strict, stats, _set_dir(src, path))


def _expand(pattern: str) -> list[str]:
    """A glob (recursive ``**``), a file, or a directory (every file below it), sorted."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def _set_dir(src: SourceConfig, path: str) -> str:
    """The RedPajama set of a ``slimpajama`` file from its set directory below the glob's fixed
    prefix ("" when it lies in none, or for other kinds: their records name their own set).

    Relative to the prefix, so a set-like name above the corpus (``/home/book/...``) is not
    taken; the innermost match wins, for held-out files found through another glob."""
    if src.kind != "slimpajama":
        return ""
    rel = pathlib.PurePath(os.path.relpath(os.path.abspath(path), glob_root(src.path)))
    return next((REDPAJAMA_DIRS[d] for d in reversed(rel.parts[:-1]) if d in REDPAJAMA_DIRS), "")


def _read_text_file(path: str, strict: bool, stats: ReadStats) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skip("non-UTF-8 bytes", path, strict, f"byte {e.start}")
    except OSError as e:
        raise SlimjaxError(f"cannot read '{path}': {e.strerror}") from None
    return None


def _open_lines(path: str) -> io.BufferedReader:
    """Binary line reader over a plain or zstd-compressed file."""
    raw = open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _read_jsonl(src: SourceConfig, u: int, path: str, want: Callable[[Key], bool], strict: bool,
                stats: ReadStats, set_dir: str = "") -> Iterator[Record]:
    import zstandard

    j = -1
    try:
        with _open_lines(path) as lines:
            for j, line in enumerate(lines):
                if not want((u, j)) or not line.strip():
                    continue
                record = _parse_line(line, f"{path}:{j + 1}", src.text_key, strict, stats)
                if record is None:
                    continue
                text, meta = record
                if set_dir and not meta.get(SET_NAME_KEY):
                    meta = {**meta, SET_NAME_KEY: set_dir}
                if src.set_name and meta.get(SET_NAME_KEY) != src.set_name:
                    continue
                yield Record((u, j), text, meta, f"{path}:{j + 1}")
    except zstandard.ZstdError as e:
        stats.skip("broken zstd data (rest of file skipped)", f"{path}: after line {j + 1}", strict, str(e))
    except OSError as e:
        raise SlimjaxError(f"cannot read '{path}': {e.strerror or e}") from None


def _parse_line(line: bytes, where: str, text_key: str, strict: bool, stats: ReadStats
                ) -> tuple[str, dict[str, Any]] | None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        stats.skip("non-UTF-8 bytes", where, strict)
        return None
    except json.JSONDecodeError as e:
        stats.skip("malformed JSON", where, strict, e.msg)
        return None
    text = obj.get(text_key) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        stats.skip(f"no '{text_key}' string field", where, strict)
        return None
    meta = obj.get("meta")
    return text, meta if isinstance(meta, dict) else {}


def _read_tfds(src: SourceConfig, split: str, want: Callable[[Key], bool], strict: bool,
               stats: ReadStats) -> Iterator[Record]:
    source = tfds_source(src, split)
    for i in range(len(source)):
        if not want((0, i)):
            continue
        element = source[i]
        value = element.get(src.text_key) if isinstance(element, dict) else None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("non-UTF-8 bytes", f"tfds {src.path}[{split}][{i}]", strict)
                continue
        if not isinstance(value, str):
            stats.skip(f"no '{src.text_key}' text feature", f"tfds {src.path}[{split}][{i}]", strict)
            continue
        yield Record((0, i), value, {SET_NAME_KEY: src.path}, f"tfds {src.path}[{split}][{i}]")


def tfds_source(src: SourceConfig, split: str):
    """Random-access ArrayRecord reader (``tfds.data_source``); TFDS's data path needs no TensorFlow."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(src.path, split=split, data_dir=src.data_dir or None)
    except Exception as e:  # TFDS raises many types for a missing or unbuilt dataset
        raise SlimjaxError(f"TFDS dataset '{src.path}' split '{split}' cannot be opened "
                           f"(data_dir '{src.data_dir or 'default'}'): {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
