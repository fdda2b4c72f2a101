"""Rank selection for low-rank factorisation: pure NumPy functions of singular values and shapes.

A *group* is what shares one rank: one layer's matrix, or every layer of a scanned stack (see
:mod:`slimjax.slim.lowrank`). Factoring a ``d_in x d_out`` matrix at rank r stores
``r * (d_in + d_out)`` numbers instead of ``d_in * d_out``, so it only pays below the break-even
rank; a group whose chosen rank does not save parameters stays dense (rank ``None``).

- :func:`energy_rank`: the smallest r keeping a fraction ``e`` of the spectral energy
  (``sum_{i<r} s_i^2 >= e * sum s_i^2``); a stack takes the largest over its layers, so every
  layer keeps at least ``e``.
- :func:`budget_ranks`: ranks under a parameter budget, greedily by retained energy per
  parameter. Each layer's energy is taken relative to its own total (scale-free, so layers of
  different sizes and norms compare); a step raises one group's rank by one (or, from its largest
  useful rank, makes it dense). The steps' gains shrink with the rank, so taking the best gain per
  parameter that still fits, until none fits, leaves less budget unused than any group's next step
  costs: as close to the budget as integer ranks allow, never over it.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import numpy as np

from slimjax.errors import SlimjaxError


@dataclasses.dataclass(frozen=True)
class Group:
    """Matrices sharing one rank: their shape and each one's singular values (float64, descending)."""

    d_in: int
    d_out: int
    spectra: tuple[np.ndarray, ...]

    @property
    def step_cost(self) -> int:
        """Parameters one more rank costs (over every layer of the group)."""
        return len(self.spectra) * (self.d_in + self.d_out)

    @property
    def dense_cost(self) -> int:
        return len(self.spectra) * self.d_in * self.d_out

    def cost(self, rank: int | None) -> int:
        """Stored parameters at ``rank`` (None: dense)."""
        return self.dense_cost if rank is None else rank * self.step_cost

    def relative_energy(self) -> np.ndarray:
        """``[layers, min(d_in, d_out)]`` each singular value's share of its layer's energy."""
        sq = np.stack([np.asarray(s, np.float64) ** 2 for s in self.spectra])
        total = sq.sum(axis=1, keepdims=True)
        return np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)


def useful_rank(d_in: int, d_out: int) -> int:
    """The largest rank whose factors hold fewer parameters than the dense matrix (0: none)."""
    return min((d_in * d_out - 1) // (d_in + d_out), min(d_in, d_out) - 1)


def retained_energy(spectrum: np.ndarray, rank: int | None) -> float:
    """Fraction of ``sum s_i^2`` the first ``rank`` singular values hold (1 when dense)."""
    sq = np.asarray(spectrum, np.float64) ** 2
    total = sq.sum()
    return 1.0 if rank is None or total == 0 else float(sq[:rank].sum() / total)


def energy_rank(spectrum: np.ndarray, energy: float) -> int:
    """The smallest r with ``sum_{i<r} s_i^2 >= energy * sum s_i^2`` (``spectrum`` descending)."""
    check_energy(energy)
    cum = np.cumsum(np.asarray(spectrum, np.float64) ** 2)
    # cum[-1] is the total as summed here, so energy=1 reaches exactly the last nonzero value.
    return int(np.searchsorted(cum, energy * cum[-1], side="left")) + 1


def check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise SlimjaxError(f"energy={energy} must lie in (0, 1]: the fraction of each layer's spectral energy kept")


def or_dense(group: Group, rank: int) -> int | None:
    """``rank``, or None (dense) where factoring at it would not save parameters."""
    return rank if rank <= useful_rank(group.d_in, group.d_out) else None


def energy_ranks(groups: Sequence[Group], energy: float) -> list[int | None]:
    """Per group the smallest rank keeping ``energy`` of every member's spectral energy (None: dense)."""
    return [or_dense(g, max(energy_rank(s, energy) for s in g.spectra)) for g in groups]


def budget_ranks(groups: Sequence[Group], budget: int) -> list[int | None]:
    """Per group a rank (None: dense) whose summed :meth:`Group.cost` is at most ``budget``
    parameters, chosen greedily by relative energy gained per parameter (module docstring).

    Every group starts at rank 1 (a group too small to save anything stays dense); a budget below
    that is an error."""
    ranks: list[int | None] = [1 if useful_rank(g.d_in, g.d_out) else None for g in groups]
    least = sum(g.cost(r) for g, r in zip(groups, ranks))
    if budget < least:
        raise SlimjaxError(f"a budget of {budget:,} parameters cannot be met: the targeted layers need at least "
                           f"{least:,} at rank 1; raise the budget or target fewer layers")
    left = budget - least
    gains = [g.relative_energy().sum(axis=0) for g in groups]  # per rank, summed over the group's layers
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        g, r = groups[i], ranks[i]
        if r is None:
            return
        top = useful_rank(g.d_in, g.d_out)
        gain, cost = (gains[i][r], g.step_cost) if r < top else (gains[i][r:].sum(), g.dense_cost - g.cost(r))
        heapq.heappush(heap, (-gain / cost, i, cost))

    for i in range(len(groups)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if cost > left:
            continue  # this group's later steps cost at least as much per step: it stops here
        left -= cost
        top = useful_rank(groups[i].d_in, groups[i].d_out)
        ranks[i] = None if ranks[i] == top else ranks[i] + 1
        push(i)
    return ranks
