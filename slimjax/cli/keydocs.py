"""One-line documentation of config keys and option fields, read from the comments in their source.

``configs/base.py`` documents each key with a trailing comment (or, for a few, a comment block
just above it); ``PrepareOptions`` documents its fields the same way. Reading those comments keeps
``--help`` and the source from drifting apart: there is no second copy of the text to update.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from typing import Any, Iterator

import ml_collections


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    lines = source.splitlines()
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            found[row] = (tok.string.lstrip("#").strip(), lines[row - 1].lstrip().startswith("#"))
    return found


def _doc(comments: dict[int, tuple[str, bool]], node: ast.stmt) -> str:
    """The trailing comment of a statement, else the comment block right above it, on one line."""
    for row in range(node.lineno, node.end_lineno + 1):
        text, whole_line = comments.get(row, ("", True))
        if text and not whole_line:
            return text
    block, row = [], node.lineno - 1
    while row in comments and comments[row][1]:
        block.insert(0, comments[row][0])
        row -= 1
    return " ".join(block)


def config_docs(source: str) -> dict[str, str]:
    """Dotted config key -> its comment, from a ``get_config()`` file built by attribute
    assignment (``c.model = m = ConfigDict()`` then ``m.d_model = 128  # ...``)."""
    comments = _comments(source)
    function = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    prefix: dict[str, str] = {}  # local name -> the dotted section it holds ("" for the root)
    docs = {}
    for node in function.body:  # in order: a section's name is bound before its keys are set
        if not isinstance(node, ast.Assign):
            continue
        key = ""
        for target in node.targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                    and target.value.id in prefix:
                key = ".".join(p for p in (prefix[target.value.id], target.attr) if p)
                docs[key] = _doc(comments, node)
        for target in node.targets:
            if isinstance(target, ast.Name):  # `c = ConfigDict()` is the root; `m` in `c.model = m = ...`
                prefix[target.id] = key
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its comment, for a dataclass whose fields carry trailing comments."""
    source = inspect.getsource(cls)
    comments = _comments(source)
    body = ast.parse(source).body[0].body
    return {n.target.id: _doc(comments, n) for n in body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-section key, in definition order."""
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, key + ".")
        else:
            yield key, value


def config_table(config: ml_collections.ConfigDict, docs: dict[str, str]) -> str:
    """One line per key: ``key = value`` and its comment (if it has one)."""
    rows = [(f"{key} = {value!r}", docs.get(key, "")) for key, value in leaves(config)]
    width = min(48, max(len(left) for left, _ in rows))
    return "\n".join(f"  {left:<{width}}  {doc}".rstrip() for left, doc in rows)
