"""Choose a pruning ratio per group so that the network loses a target share of its FLOPs.

Pure: a function of plain data (group names and channel counts, a FLOPs function of kept
counts, sensitivity curves, the target). It never sees a network or the pruner, and never
prunes to measure. Deterministic: the same inputs give the same ratios.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..utils.errors import tagged

logger = logging.getLogger(__name__)


class Strategy(str, Enum):
    """How the FLOPs target is shared among groups."""

    SENSITIVITY = "sensitivity"  # one loss threshold: less sensitive groups lose more
    UNIFORM = "uniform"  # the same ratio everywhere


STRATEGIES = tuple(s.value for s in Strategy)

FlopsFn = Callable[[Mapping[int, int]], int]
"""FLOPs of the network when group `i` (a position in the group list) keeps `counts[i]`
channels; groups left out keep all of theirs."""
Curve = List[Tuple[float, float]]
_MAX_RATIO = 0.999  # the largest ratio tried: every group keeps at least one channel


@dataclass(frozen=True)
class PlanGroup:
    """What planning knows of one group of coupled channels.

    Args:
        name: the group's name.
        channels: its channel count.
        units: block sizes when grouped convolutions make each block lose the same count
            (their sum is `channels`); empty for one free block.
        prunable: False for a group that must stay whole.
        round_width: for a group whose units must keep a count from a set of widths (channel
            shuffles route its channels differently at each width): the allowed count nearest
            to a unit's kept count. None: every count is allowed.
    """

    name: str
    channels: int
    units: Tuple[int, ...] = ()
    prunable: bool = True
    round_width: Optional[Callable[[int], int]] = None

    @property
    def blocks(self) -> Tuple[int, ...]:
        return self.units or (self.channels,)


def fit_multiple(n: int, rounding: int) -> int:
    """The multiple a group of `n` channels is rounded to when `rounding` is asked.

    `rounding` itself when the group is wider than it; a group no wider (it could only stay
    whole) gets the largest power of two that lets it lose half its channels (16 channels at
    rounding 16: multiples of 8; 8: of 4; 3: of 1), so small layers still prune in even steps.

    Examples:
        >>> fit_multiple(512, 16), fit_multiple(24, 16), fit_multiple(16, 16), fit_multiple(8, 16)
        (16, 16, 8, 4)
    """
    if rounding <= 1 or n > rounding:
        return max(1, rounding)
    return 1 << max(0, (n // 2).bit_length() - 1) if n >= 2 else 1


def n_keep(n: int, ratio: float, rounding: int = 1) -> int:
    """Channels kept out of `n` at `ratio`, as PaddleSlim counts them.

    `round(ratio * n)` channels go (Python's `round`: to nearest, ties to even, exactly as
    PaddleSlim's `int(round(len(idx) * ratio))`, so the same ratio gives the same shapes: 0.6 of
    256 keeps 102); the kept count is then rounded up to a multiple of `rounding` (of
    `fit_multiple(n, rounding)` for a group no wider than `rounding`) but never above `n`, and
    at least one channel always stays (PaddleSlim would remove them all).

    Examples:
        >>> n_keep(256, 0.6), n_keep(10, 0.25), n_keep(4, 0.9), n_keep(10, 0.25, 4)
        (102, 8, 1, 8)
    """
    keep = max(1, n - int(round(ratio * n)))
    if rounding > 1:  # 0 kept rounds up to one whole step, not to a single channel
        step = fit_multiple(n, rounding)
        keep = min(n, int(math.ceil(keep / step) * step))
    return max(1, keep)


def kept_count(group: PlanGroup, ratio: float, round_to: int = 1) -> int:
    """Channels a group keeps at `ratio` (blocks of a grouped conv lose the same share each)."""
    units = group.blocks
    if group.round_width is not None:  # equal units, each at an allowed width
        return group.round_width(n_keep(units[0], ratio)) * len(units)
    if len(units) == 1:
        return n_keep(units[0], ratio, round_to)
    return sum(n_keep(u, ratio) for u in units)


def _interp_ratio(curve: Sequence[Tuple[float, float]], threshold: float) -> float:
    """Largest ratio whose linearly interpolated loss is <= threshold (curve starts at (0, 0))."""
    best = 0.0
    for (r0, l0), (r1, l1) in zip(curve, curve[1:]):
        if l1 <= threshold:
            best = max(best, r1)
        elif l0 <= threshold:
            best = max(best, r0 + (threshold - l0) / (l1 - l0) * (r1 - r0))
    return best


def check_fraction(value: Any, what: str = "flops") -> float:
    """`value` as a float in (0, 1): Python and numpy numbers accepted, bools refused.

    Raises:
        ValueError: not a real number in (0, 1) (the message names `what` and the value).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not 0.0 < float(value) < 1.0:
        raise tagged(what, ValueError(f"{what} must be a fraction in (0, 1) such as 0.4 (the share of FLOPs to "
                         f"remove); got {value!r}"))
    return float(value)


def _check_curves(curves: Mapping[str, Mapping[float, Any]]) -> None:
    """Curves planning can trust: every loss a finite number (NaN means a diverged evaluation)."""
    if not isinstance(curves, Mapping):
        raise tagged("sensitivities", TypeError(f"sensitivities must map group names to {{ratio: loss}}, got "
                        f"{type(curves).__name__}"))
    for name, pts in curves.items():
        if not isinstance(pts, Mapping):
            raise TypeError(f"the sensitivity of group {name!r} must be a {{ratio: loss}} mapping, "
                            f"got {type(pts).__name__}")
        for r, loss in pts.items():
            if not isinstance(loss, numbers.Real) or not math.isfinite(float(loss)):
                raise ValueError(
                    f"the sensitivity of group {name!r} at ratio {r} is {loss!r}, not a finite "
                    f"loss: the network diverged (NaN) while it was analysed; analyse it again "
                    f"at an epoch where its metric is finite, or use strategy='uniform'")


def _check(flops: Any, strategy: Any, curves: Optional[Mapping[str, Any]]) -> Strategy:
    check_fraction(flops, "FLOPs target")
    try:
        strategy = Strategy(strategy)
    except ValueError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}") from None
    if strategy is Strategy.SENSITIVITY and curves is None:
        raise ValueError("strategy 'sensitivity' needs sensitivities: run pruner.sensitivity(...) "
                         "first, pass sensitivities=..., or use strategy='uniform'")
    if strategy is Strategy.SENSITIVITY:
        _check_curves(curves)
    return strategy


def _candidates(groups: Sequence[PlanGroup], skip: Sequence[str],
                curves: Optional[Mapping[str, Mapping[float, float]]],
                strategy: Strategy) -> Tuple[List[int], Dict[int, Curve]]:
    """Positions of the groups planning may prune, and their curves starting at (0, 0)."""
    skipped = set(skip)
    cands = [i for i, g in enumerate(groups) if g.prunable and g.name not in skipped]
    out: Dict[int, Curve] = {}
    if strategy is Strategy.SENSITIVITY:
        missing = [groups[i].name for i in cands if groups[i].name not in curves]
        if missing:
            logger.warning("no sensitivity for %d group(s), left unpruned: %s", len(missing),
                           ", ".join(missing[:5]))
        cands = [i for i in cands if groups[i].name in curves]
        for i in cands:
            pts = sorted(curves[groups[i].name].items())
            out[i] = [(0.0, 0.0)] + [(float(r), float(l)) for r, l in pts]
    if not cands:
        raise ValueError("no group can be pruned: every group is skipped, unprunable or without "
                         "a sensitivity curve; skip fewer groups")
    return cands, out


def plan_group_ratios(groups: Sequence[PlanGroup], flops_fn: FlopsFn,
                      curves: Optional[Mapping[str, Mapping[float, float]]], flops: float,
                      skip: Sequence[str] = (), strategy: str = "sensitivity",
                      round_to: int = 1) -> Dict[str, float]:
    """Pruning ratio per group name that removes `flops` of the network's FLOPs.

    Sensitivity strategy (PaddleSlim's rule): one loss threshold for all groups; each group gets
    the largest ratio whose interpolated loss stays under it; the threshold is found by
    bisection. Then a last exact step removes single channels (cheapest loss first) until the
    target is met, so the result lands at or just above the target. Uniform strategy: the same
    ratio everywhere, found the same way, then the same exact step.

    Args:
        groups: every group of the network, in the order `flops_fn` indexes them.
        flops_fn: FLOPs when group i keeps counts[i] channels (see `FlopsFn`).
        curves: `{group name: {ratio: loss}}` (`SensitivityResult.curves()`), for strategy
            "sensitivity"; groups without a curve stay whole.
        flops: share of FLOPs to remove, in (0, 1).
        skip: names of groups that stay whole.
        strategy: "sensitivity" or "uniform" (see `Strategy`).
        round_to: kept channel counts are multiples of this (single-block groups).

    Returns:
        `{group name: ratio}` for every group that loses channels (ratio > 0); turn it into
        channels with `FilterPruner.select(ratios, round_to)`.

    Raises:
        ValueError: `flops` outside (0, 1), an unknown strategy, no curves for strategy
            "sensitivity", no prunable group, or a target larger than the largest reachable.

    Examples:
        >>> groups = [PlanGroup("a", 8), PlanGroup("b", 8)]
        >>> plan_group_ratios(groups, lambda c: 10 * c.get(0, 8) + 10 * c.get(1, 8), None,
        ...                   0.5, strategy="uniform")
        {'a': 0.5, 'b': 0.5}
    """
    strategy = _check(flops, strategy, curves)
    flops = float(flops)
    cands, curve, top = _reachable(groups, flops, skip, curves, strategy, round_to, flops_fn)
    base = flops_fn({})

    def reduction(ratios: Mapping[int, float]) -> float:
        counts = {i: kept_count(groups[i], r, round_to) for i, r in ratios.items()}
        return 1.0 - flops_fn(counts) / base

    ratios = _bisect(cands, curve, top, strategy, lambda r: reduction(r) >= flops)
    ratios = _top_up(groups, flops_fn, ratios, curve, top, flops, base, round_to)
    if round_to > 1:  # coarse steps overshoot: give back what the target does not need
        ratios = _give_back(groups, flops_fn, ratios, curve, flops, base, round_to)
    logger.info("planned a %.3f FLOPs reduction: achieved %.4f, %d of %d groups pruned", flops,
                reduction(ratios), sum(r > 0 for r in ratios.values()), len(ratios))
    return {groups[i].name: r for i, r in ratios.items() if r > 0}


def _reachable(groups: Sequence[PlanGroup], flops: float, skip: Sequence[str],
               curves: Optional[Mapping[str, Mapping[float, float]]], strategy: Strategy,
               round_to: int, flops_fn: FlopsFn) -> Tuple[List[int], Dict[int, Curve],
                                                          Dict[int, float]]:
    """Candidates, their curves and largest ratios; raises if `flops` is out of their reach."""
    cands, curve = _candidates(groups, skip, curves, strategy)
    if strategy is Strategy.UNIFORM:
        top = {i: _MAX_RATIO for i in cands}
    else:
        top = {i: max(curve[i][-1][0], 0.0) for i in cands}
    base = flops_fn({})
    reachable = 1.0 - flops_fn({i: kept_count(groups[i], r, round_to)
                                for i, r in top.items()}) / base if base else 0.0
    if flops > reachable + 1e-9:
        raise ValueError(
            f"a FLOPs reduction of {flops:.3f} cannot be reached: the largest reachable with these "
            f"groups{' and sensitivity ratios' if strategy is Strategy.SENSITIVITY else ''} is "
            f"{reachable:.3f}; lower the target, skip fewer groups"
            f"{', or analyse larger ratios' if strategy is Strategy.SENSITIVITY else ''}")
    return cands, curve, top


def check_reachable(groups: Sequence[PlanGroup], flops_fn: FlopsFn, flops: float,
                    skip: Sequence[str] = (), strategy: str = "uniform",
                    curves: Optional[Mapping[str, Mapping[float, float]]] = None,
                    round_to: int = 1) -> None:
    """Raise now if `plan_group_ratios` could not reach `flops`: from channel counts alone.

    For strategy "sensitivity" only each curve's largest ratio matters, so curves not measured
    yet can be stood in for by `{group: {largest ratio to analyse: 0.0}}`.

    Raises:
        ValueError: as `plan_group_ratios` for a bad target, no prunable group, or a target
            beyond the largest reachable reduction (the message gives it).
    """
    strategy_ = _check(flops, strategy, curves)
    _reachable(groups, float(flops), skip, curves, strategy_, round_to, flops_fn)


def _bisect(cands: List[int], curve: Dict[int, Curve], top: Dict[int, float],
            strategy: Strategy, enough: Callable[[Dict[int, float]], bool]) -> Dict[int, float]:
    """Ratios at the largest threshold (loss, or uniform ratio) that is not yet enough."""
    if strategy is Strategy.UNIFORM:
        def assign(t: float) -> Dict[int, float]:
            return {i: t for i in cands}
        lo, hi = 0.0, _MAX_RATIO
    else:
        def assign(t: float) -> Dict[int, float]:
            return {i: min(_interp_ratio(curve[i], t), top[i]) for i in cands}
        all_losses = [l for c in curve.values() for _, l in c]
        lo, hi = min(all_losses) - 1.0, max(all_losses) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if enough(assign(mid)):
            hi = mid
        else:
            lo = mid
    return assign(lo)


def _top_up(groups: Sequence[PlanGroup], flops_fn: FlopsFn, ratios: Dict[int, float],
            curves: Dict[int, Curve], top: Dict[int, float], target: float, base: int,
            round_to: int) -> Dict[int, float]:
    """Remove one more unit at a time from the group where it costs least, up to the target."""
    ratios = dict(ratios)

    def counts() -> Dict[int, int]:
        return {i: kept_count(groups[i], r, round_to) for i, r in ratios.items()}

    def loss_at(i: int, r: float) -> float:
        if i not in curves:
            return r
        xs, ys = zip(*curves[i])
        return float(np.interp(r, xs, ys))

    budget = sum(groups[i].channels for i in ratios) + 1
    while budget > 0 and 1.0 - flops_fn(counts()) / base < target:
        budget -= 1
        best, best_cost = None, None
        for i, r in ratios.items():
            nxt = _next_ratio(groups[i], r, round_to)
            if nxt is None or nxt > top[i] + 1e-9:
                continue
            # equal losses (flat curves, e.g. an untrained net): take from the group that has
            # lost least so far, so the cut spreads evenly instead of emptying the first groups
            cost = (loss_at(i, nxt), nxt, i)
            if best_cost is None or cost < best_cost:
                best, best_cost = (i, nxt), cost
        if best is None:
            break
        ratios[best[0]] = best[1]
    return ratios


def _give_back(groups: Sequence[PlanGroup], flops_fn: FlopsFn, ratios: Dict[int, float],
               curves: Dict[int, Curve], target: float, base: int, round_to: int) -> Dict[int, float]:
    """Restore one `round_to` step at a time, most sensitive group first, while the target holds.

    With coarse rounding the bisection and top-up steps remove whole blocks of channels and can
    overshoot the target by several points; this brings the cut back to within one step of it.
    """
    ratios = dict(ratios)

    def reduction() -> float:
        return 1.0 - flops_fn({i: kept_count(groups[i], r, round_to) for i, r in ratios.items()}) / base

    def loss_at(i: int, r: float) -> float:
        if i not in curves:
            return r
        xs, ys = zip(*curves[i])
        return float(np.interp(r, xs, ys))

    frozen: set = set()
    while True:
        order = sorted((i for i, r in ratios.items() if r > 0 and i not in frozen),
                       key=lambda i: (-loss_at(i, ratios[i]), -ratios[i], i))
        for i in order:
            prev = _prev_ratio(groups[i], ratios[i], round_to)
            if prev is None:
                frozen.add(i)
                continue
            old, ratios[i] = ratios[i], prev
            if reduction() >= target:
                break
            ratios[i] = old
            frozen.add(i)
        else:
            return ratios


def _prev_ratio(group: PlanGroup, ratio: float, round_to: int) -> Optional[float]:
    """The ratio one `round_to` step wider than `ratio` (single-block groups only), or None."""
    if group.round_width is not None or len(group.blocks) != 1:
        return None
    n = group.channels
    keep = n_keep(n, ratio, round_to)
    if keep >= n:
        return None
    step = fit_multiple(n, round_to)
    wider = min(n, (keep // step + 1) * step)
    return (n - wider) / n


def _next_ratio(group: PlanGroup, ratio: float, round_to: int) -> Optional[float]:
    """The smallest ratio above `ratio` that keeps fewer channels, or None at the minimum."""
    units = group.blocks
    if group.round_width is not None:
        return _next_width_ratio(group.round_width, units[0], ratio)
    if len(units) == 1:
        n = units[0]
        keep = n_keep(n, ratio, round_to)
        step = fit_multiple(n, round_to)
        new_keep = keep - step
        if new_keep < 1:
            return None
        return (n - new_keep) / n
    u = min(units)
    removed = u - n_keep(u, ratio)
    if removed + 1 >= u:
        return None
    return (removed + 1) / u


def _next_width_ratio(round_width: Callable[[int], int], unit: int,
                      ratio: float) -> Optional[float]:
    """The smallest ratio above `ratio` whose allowed width is smaller, or None at the least."""
    width = round_width(n_keep(unit, ratio))
    for smaller in range(width - 1, 0, -1):
        if round_width(smaller) < width:
            return (unit - smaller) / unit
    return None


def auto_strategy(strategy: Optional[str], has_curves: bool) -> str:
    """`strategy`, or for None ("auto"): "sensitivity" when curves are given, else "uniform"."""
    if strategy is None:
        return "sensitivity" if has_curves else "uniform"
    return strategy
