"""Channel importance criteria: how much each output channel of a layer matters.

A criterion scores one weight tensor along one axis; a group's score for a channel is the SUM of
its scores over every layer that produces that channel (a conv and, through a residual add, the
other convs feeding the same sum). Pure numpy; never touches the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np

ScoreFn = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Criterion:
    """A scoring rule.

    Args:
        name: registry key.
        score: `score(weight, axis) -> scores`, one per index along `axis`, higher = keep.
        source: "producer" scores the weights of the layers minting the channels (conv filters,
            linear columns); "norm" scores the scale of the normalisation after them.
    """

    name: str
    score: ScoreFn
    source: str = "producer"


_CRITERIA: Dict[str, Criterion] = {}


def register_criterion(name: str, score: ScoreFn, source: str = "producer") -> Criterion:
    """Add a criterion usable as `FilterPruner(..., criterion=name)`."""
    if source not in ("producer", "norm"):
        raise ValueError(f"source must be 'producer' or 'norm', got {source!r}")
    crit = Criterion(name, score, source)
    _CRITERIA[name] = crit
    return crit


def get_criterion(name: str | Criterion) -> Criterion:
    if isinstance(name, Criterion):
        return name
    if name not in _CRITERIA:
        raise ValueError(
            f"unknown criterion {name!r}; choose one of {sorted(_CRITERIA)} or register one with "
            "prune_callbacks.importance.register_criterion")
    return _CRITERIA[name]


def criteria() -> list[str]:
    return sorted(_CRITERIA)


def _rows(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)


def l1(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(_rows(w, axis)).sum(axis=1)


def l2(w: np.ndarray, axis: int) -> np.ndarray:
    return np.sqrt((_rows(w, axis) ** 2).sum(axis=1))


def fpgm(w: np.ndarray, axis: int) -> np.ndarray:
    """Filter Pruning via Geometric Median: filters close to all others are redundant."""
    rows = _rows(w, axis)
    sq = (rows ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
    return np.sqrt(d2).sum(axis=1)


def bn_scale(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(_rows(w, axis)).sum(axis=1)


def random_score(w: np.ndarray, axis: int) -> np.ndarray:
    # seeded by the weights' shape so a plan is repeatable for the same network
    rng = np.random.default_rng(w.shape[axis] * 7919 + w.size)
    return rng.random(w.shape[axis])


register_criterion("l1", l1)
register_criterion("l2", l2)
register_criterion("fpgm", fpgm)
register_criterion("bn_scale", bn_scale, source="norm")
register_criterion("random", random_score)
