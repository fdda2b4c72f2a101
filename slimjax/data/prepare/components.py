"""Connected components by alternating large-star and small-star steps (Kiveris et al., 2014),
the map-reduce algorithm behind the Beam runner's clustering, here also as plain Python.

The graph is a set of directed edges ``(child, parent)`` with ``parent < child``. Each step is a
group-by on a node followed by a pure function of that node and its neighbours, so a step is one
shuffle on a distributed engine:

- large-star: every node ``u`` links each larger neighbour to the smallest node of ``{u} + N(u)``;
- small-star: every node ``u`` links itself and its smaller neighbours to the smallest of them.

A round is one of each. The edge set keeps every component connected and shrinks the distance to
the component's minimum; at the fixed point every component is a star around its smallest node, so
``child -> parent`` is each non-root node's root, the same document union-find keeps. Rounds
are O(log n) in practice (O(log^2 n) proven).
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

Edge = tuple[int, int]


def large_star(node: int, neighbours: Iterable[int]) -> Iterator[Edge]:
    """Large-star at ``node`` (``neighbours``: its neighbours in either direction)."""
    neighbours = set(neighbours)
    m = min(neighbours | {node})
    for v in neighbours:
        if v > node:
            yield v, m


def small_star(node: int, smaller: Iterable[int]) -> Iterator[Edge]:
    """Small-star at ``node`` (``smaller``: its neighbours below it, i.e. its parents)."""
    group = set(smaller) | {node}
    m = min(group)
    for v in group:
        if v != m:
            yield v, m


def both_ways(edge: Edge) -> Iterator[Edge]:
    """``(a, b)`` and ``(b, a)``: the keyed form large-star groups on."""
    yield edge
    yield edge[1], edge[0]


def normalise(pairs: Iterable[tuple[int, int]]) -> set[Edge]:
    """Distinct ``(larger, smaller)`` edges from any pairs; self-loops dropped."""
    return {(max(a, b), min(a, b)) for a, b in pairs if a != b}


def _step(edges: set[Edge], keyed: Iterable[Edge], fn) -> set[Edge]:
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for k, v in keyed:
        groups[k].append(v)
    return {e for node, vs in groups.items() for e in fn(node, vs)}


def round_(edges: set[Edge]) -> set[Edge]:
    """One large-star step then one small-star step."""
    large = _step(edges, (kv for e in edges for kv in both_ways(e)), large_star)
    return _step(large, large, small_star)


def connected_components(pairs: Iterable[tuple[int, int]], max_rounds: int = 64) -> tuple[dict[int, int], int]:
    """``({node: smallest node of its component} for every non-root node, rounds until no change)``.

    Raises ``RuntimeError`` if the edge set still changes after ``max_rounds`` rounds.
    """
    edges = normalise(pairs)
    for rounds in range(1, max_rounds + 1):
        new = round_(edges)
        if new == edges:
            return dict(edges), rounds
        edges = new
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
