"""Channel importance criteria: how much each output channel of a layer matters.

A criterion scores one weight tensor along one axis; a group's score for a channel is the SUM of
its scores over every layer that produces that channel (a conv and, through a residual add, the
other convs feeding the same sum). Pure numpy; never touches the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, Union

import numpy as np

ScoreFn = Callable[[np.ndarray, int], np.ndarray]


class Source(str, Enum):
    """Which weights a criterion scores."""

    PRODUCER = "producer"  # the weights minting the channels: conv filters, linear columns
    NORM = "norm"  # the scale of the normalisation after them (BatchNorm's gamma)


@dataclass(frozen=True)
class Criterion:
    """A scoring rule.

    Args:
        name: registry key.
        score: `score(weight, axis) -> scores`, one per index along `axis`, higher = keep.
        source: `Source.PRODUCER` scores the weights of the layers minting the channels (conv
            filters, linear columns); `Source.NORM` the scale of the normalisation after them.
    """

    name: str
    score: ScoreFn
    source: Source = Source.PRODUCER


_CRITERIA: Dict[str, Criterion] = {}


def register_criterion(name: str, score: ScoreFn,
                       source: Union[Source, str] = Source.PRODUCER) -> Criterion:
    """Add a criterion usable as `FilterPruner(..., criterion=name)`.

    Args:
        name: the registry key (an existing name is replaced).
        score: `score(weight, axis) -> scores`, one float per index along `axis`, higher = keep.
        source: "producer" (default) or "norm", see `Source`.

    Returns:
        The registered Criterion.

    Raises:
        ValueError: an unknown `source`.
        TypeError: `name` is not a str or `score` not callable.

    Examples:
        >>> register_criterion("linf", lambda w, axis: np.abs(np.moveaxis(w, axis, 0))
        ...                    .reshape(w.shape[axis], -1).max(axis=1))
        >>> FilterPruner(net, [1, 3, 32, 32], criterion="linf")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(score):
        raise TypeError(f"score must be callable as score(weight, axis), got {score!r}")
    try:
        source = Source(source)
    except ValueError:
        raise ValueError(f"source must be one of {[s.value for s in Source]}, got {source!r}") from None
    crit = Criterion(name, score, source)
    _CRITERIA[name] = crit
    return crit


def get_criterion(name: str | Criterion) -> Criterion:
    if isinstance(name, Criterion):
        return name
    if name not in _CRITERIA:
        raise ValueError(
            f"unknown criterion {name!r}; choose one of {sorted(_CRITERIA)} or register one with "
            "prune_callbacks.register_criterion")
    return _CRITERIA[name]


def _rows(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)


def l1(w: np.ndarray, axis: int) -> np.ndarray:
    # summed in float64 over the other axes in place: no float64 copy of a large Linear weight
    # (25x faster on VGG16's 25088x4096 classifier than reshaping rows first)
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return np.abs(w).sum(axis=others, dtype=np.float64)


def l2(w: np.ndarray, axis: int) -> np.ndarray:
    return np.sqrt((_rows(w, axis) ** 2).sum(axis=1))


def fpgm(w: np.ndarray, axis: int) -> np.ndarray:
    """Filter Pruning via Geometric Median: filters close to all others are redundant."""
    rows = _rows(w, axis)
    sq = (rows ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
    return np.sqrt(d2).sum(axis=1)


def bn_scale(w: np.ndarray, axis: int) -> np.ndarray:
    """|gamma| of a normalisation scale: the L1 rule, applied to the norm (`Source.NORM`)."""
    return l1(w, axis)


def random_score(w: np.ndarray, axis: int) -> np.ndarray:
    # seeded by the weights' shape so a plan is repeatable for the same network
    rng = np.random.default_rng(w.shape[axis] * 7919 + w.size)
    return rng.random(w.shape[axis])


register_criterion("l1", l1)
register_criterion("l2", l2)
register_criterion("fpgm", fpgm)
register_criterion("bn_scale", bn_scale, source=Source.NORM)
register_criterion("random", random_score)
