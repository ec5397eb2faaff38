"""Choose each group's width from a measured latency table (HALP-style), not from FLOPs.

Pure: a function of plain data (groups, a table of measured latency shares per group and width,
sensitivity curves, a target share). It never measures, exports or prunes; `deploy.latency_table`
measures the table on the exported network and verifies the plan.

The latency model is additive: the network's share of the original latency when each group g
keeps width w_g is `1 + sum_g (share_g(w_g) - 1)`, where `share_g(w)` was measured with only
group g at width w. Interactions between neighbouring groups are what the verification export
corrects.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .allocation import FlopsFn, PlanGroup, fit_multiple

logger = logging.getLogger(__name__)

__all__ = ["LatencyTable", "monotone", "efficient_widths", "predict_share", "plan_latency_widths",
           "trade_for_latency"]


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency shares: `shares[group][width]` is the network's latency, relative to the
    original's, with only that group cut to `width` channels (the full width is 1.0).

    Args:
        shares: group name -> {width: latency share} (`monotone`: smoothed as measured).
        channels: group name -> its full width.
        runtime, batch, input_shape: where and how it was measured (for the log and cache key).
    """

    shares: Mapping[str, Mapping[int, float]]
    channels: Mapping[str, int]
    runtime: str = ""
    batch: int = 1
    input_shape: Tuple[int, ...] = ()
    exports: int = field(default=0, compare=False)
    raw: Mapping[str, Mapping[int, float]] = field(default_factory=dict, compare=False)
    """The shares as measured, before `monotone`."""
    round_to: int = 1
    """The channel multiple of the measured widths (the kernels' block: `fit_multiple` per group)."""

    def share(self, widths: Mapping[str, int], interpolate: bool = False) -> float:
        """Predicted latency share of the network when group g keeps `widths[g]` (others whole);
        between measured widths the next wider one's share, or with `interpolate` the line
        between its neighbours (`interpolated`)."""
        at = self.interpolated if interpolate else self.share_at
        total = 1.0
        for name, w in widths.items():
            if name not in self.shares or w >= self.channels[name]:
                continue
            total += at(name, w) - 1.0
        return total

    def interpolated(self, name: str, width: int) -> float:
        """The share at `width`: a width off the table's grid (multiples of `round_to`, per group
        `fit_multiple`) costs as the next grid width above it (blocked kernels: 17 channels
        cost as much as 32); on the grid, linear between the measured widths and the full width
        at 1.0 (there every width runs blocked kernels and time falls with the work); below the
        narrowest measured, that one's.
        """
        table, n = self.shares[name], self.channels[name]
        step = fit_multiple(n, self.round_to)
        width = min(n, int(math.ceil(width / step)) * step)
        xs = sorted(w for w in table if w < n) + [n]
        ys = [table[w] for w in xs[:-1]] + [1.0]
        return float(np.interp(width, xs, ys))

    def share_at(self, name: str, width: int) -> float:
        """The share at `width`; between measured widths, that of the next wider one (a width
        never costs less than a measured narrower one is known to)."""
        table = self.shares[name]
        wider = [w for w in table if w >= width]
        return table[min(wider)] if wider else 1.0


def monotone(shares: Mapping[int, float], channels: int) -> Dict[int, float]:
    """`shares` made non-increasing as the width falls (isotonic regression, pool adjacent violators),
    with the full width fixed at 1.0.

    A narrower copy of a group is never slower in truth; measured shares that say otherwise are
    noise, and a planner that trusts each one picks exactly the widths whose noise flattered them
    (the winner's curse). Pooling neighbours that disagree averages that noise out.

    Examples:
        >>> monotone({48: 0.75, 32: 0.85, 16: 0.5}, 64)
        {16: 0.5, 32: 0.8, 48: 0.8}
    """
    blocks: list = []  # [value, weight, widths], widths ascending
    for w in sorted(shares):
        if w >= channels:
            continue
        blocks.append([float(shares[w]), 1.0, [w]])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v1, n1, w1 = blocks.pop()
            v0, n0, w0 = blocks.pop()
            blocks.append([(v0 * n0 + v1 * n1) / (n0 + n1), n0 + n1, w0 + w1])
    out = {}
    for value, _, widths in blocks:
        for w in widths:
            out[w] = min(value, 1.0)  # the full width is 1.0 exactly: nothing narrower above it
    return out


def efficient_widths(table: Mapping[int, float], channels: int, tolerance: float = 0.0) -> Tuple[int, ...]:
    """The widths worth pruning to, widest first: each runs faster (by more than `tolerance`)
    than every wider one, including the full width.

    A width that costs as much as a wider one is on the expensive side of a latency step (e.g. 17
    channels where kernels run in blocks of 16 cost as much as 32): it only loses channels.

    Examples:
        >>> efficient_widths({64: 1.0, 48: 0.9, 40: 0.9, 32: 0.8, 20: 0.8, 16: 0.7}, 64)
        (64, 48, 32, 16)
    """
    out = [channels]
    best = table.get(channels, 1.0)
    for w in sorted((w for w in table if w < channels), reverse=True):
        if table[w] < best - tolerance:
            out.append(w)
            best = table[w]
    return tuple(out)


def _loss(curve: Optional[Sequence[Tuple[float, float]]], ratio: float) -> float:
    """The loss at `ratio`: interpolated from a curve, else ratio squared (spreads the cut)."""
    proxy = ratio * ratio
    if curve is None:
        return proxy
    xs, ys = zip(*curve)
    return float(np.interp(ratio, xs, ys)) + 1e-3 * proxy  # flat curves: still spread the cut


def predict_share(table: LatencyTable, widths: Mapping[str, int], groups: Sequence[PlanGroup],
                  flops_fn: Optional[FlopsFn] = None, _single: Optional[Dict[Tuple[str, int], int]] = None,
                  interpolate: bool = False) -> float:
    """Predicted latency share when group g keeps `widths[g]`: the table's summed savings, scaled
    by how much of the summed single-group FLOPs savings the joint plan really saves.

    Cutting two groups that meet in one layer (a conv's input and output) shrinks that layer as the
    product of their widths, so single-group savings add up to more than the joint saving. FLOPs
    (`flops_fn`, exact from the traced graph) measure that overlap; the latency savings are assumed
    to overlap alike. Without `flops_fn`, the plain sum (`LatencyTable.share`, `interpolate`d or not).
    """
    additive = table.share(widths, interpolate)
    if flops_fn is None or not widths:
        return additive
    index = {g.name: i for i, g in enumerate(groups)}
    base = flops_fn({})
    single = 0
    for name, w in widths.items():
        key = (name, w)
        if _single is None or key not in _single:
            saved = base - flops_fn({index[name]: w})
            if _single is None:
                single += saved
                continue
            _single[key] = saved
        single += _single[key]
    joint = base - flops_fn({index[n]: w for n, w in widths.items()})
    return 1.0 - (1.0 - additive) * joint / single if single > 0 else additive


class UnreachableLatency(ValueError):
    """A latency share below what the table predicts for its fastest plan (`lowest`)."""

    def __init__(self, message: str, lowest: float) -> None:
        super().__init__(message)
        self.lowest = float(lowest)


def plan_latency_widths(groups: Sequence[PlanGroup], table: LatencyTable, target: float,
                        curves: Optional[Mapping[str, Mapping[float, float]]] = None,
                        skip: Sequence[str] = (), max_ratio: float = 0.9,
                        tolerance: float = 0.0, flops_fn: Optional[FlopsFn] = None) -> Dict[str, int]:
    """Width per group whose predicted latency share is at most `target`, losing least.

    Greedy, HALP's trade-off: each step moves one group to its next efficient width (see
    `efficient_widths`: only where latency drops), the one with the least loss per unit of time
    saved; loss is the sensitivity curve's (interpolated, `{ratio: loss}`) or, without curves,
    the squared pruning ratio. Groups without a table entry, skipped, unprunable, or (with
    curves) without a curve stay whole; no group goes beyond `max_ratio` (or its curve's end).

    Args:
        groups: the network's groups (names and widths).
        table: measured latency shares (`deploy.latency_table.measure_latency_table`).
        target: latency share to reach, in (0, 1).
        curves: `{group: {ratio: loss}}`, or None.
        skip: group names kept whole.
        max_ratio: the largest share of a group's channels removed.
        tolerance: latency differences below this count as equal (measurement noise).
        flops_fn: FLOPs of kept counts by group position (`FlopsFn`): predictions then account
            for groups that meet in one layer (`predict_share`); None: the plain sum.

    Returns:
        `{group name: kept width}` for every group cut (width below its channels).

    Raises:
        ValueError: `target` outside (0, 1), or beyond what the table can reach (the message
            gives the lowest reachable share).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise ValueError(f"target must be a latency share in (0, 1) such as 0.6, got {target!r}")
    skipped = set(skip)
    steps: Dict[str, Tuple[int, ...]] = {}
    curve: Dict[str, Optional[Sequence[Tuple[float, float]]]] = {}
    for g in groups:
        if not g.prunable or g.name in skipped or g.name not in table.shares:
            continue
        top = max_ratio
        if curves is not None:
            if g.name not in curves:
                continue
            pts = sorted((float(r), float(l)) for r, l in curves[g.name].items())
            curve[g.name] = [(0.0, 0.0)] + pts
            top = min(top, pts[-1][0]) if pts else 0.0
        else:
            curve[g.name] = None
        widths = [w for w in efficient_widths(table.shares[g.name], g.channels, tolerance)
                  if 1.0 - w / g.channels <= top + 1e-9]
        if len(widths) > 1:
            steps[g.name] = tuple(widths)
    channels = {g.name: g.channels for g in groups}
    at = {name: 0 for name in steps}  # index into steps[name]

    def widths() -> Dict[str, int]:
        return {n: steps[n][i] for n, i in at.items() if i > 0}

    single: Dict[Tuple[str, int], int] = {}

    def predicted() -> float:
        return predict_share(table, widths(), groups, flops_fn, single)

    share = predicted()
    while share > target:
        best, best_cost = None, None
        for name, i in at.items():
            if i + 1 >= len(steps[name]):
                continue
            w0, w1 = steps[name][i], steps[name][i + 1]
            saved = table.share_at(name, w0) - table.share_at(name, w1)
            if saved <= 0:
                continue
            n = channels[name]
            cost = (_loss(curve[name], 1 - w1 / n) - _loss(curve[name], 1 - w0 / n)) / saved
            if best_cost is None or (cost, name) < best_cost:
                best, best_cost = name, (cost, name)
        if best is None:
            raise UnreachableLatency(
                f"a latency share of {target:.3f} cannot be reached by the measured table: the "
                f"lowest predicted is {share:.3f}; raise the target, skip fewer groups or measure "
                f"smaller widths", lowest=share)
        at[best] += 1
        share = predicted()
    logger.info("latency table plan: predicted share %.3f (target %.3f), %d of %d groups cut", share,
                target, sum(i > 0 for i in at.values()), len(at))
    return widths()


def trade_for_latency(groups: Sequence[PlanGroup], flops_fn: FlopsFn, table: LatencyTable,
                      counts: Mapping[int, int], flops: float,
                      curves: Optional[Mapping[str, Mapping[float, float]]] = None, skip: Sequence[str] = (),
                      round_to: int = 1, max_ratio: float = 0.9, max_shift: float = 0.1,
                      slack: float = 0.005, min_gain: float = 1e-4) -> Dict[int, int]:
    """Kept counts that still remove `flops` of the FLOPs (within `slack`) and that `table`
    predicts faster than `counts` (a FLOPs plan, e.g. `plan_group_ratios`'): width is traded
    between groups.

    Each step tries, for every group, one move to its next narrower *efficient* width (faster
    than every wider one, `efficient_widths`, on the table's grid); the FLOPs that move removes
    beyond the target are then given back to other groups, one `round_to` step at a time (free
    where it stays within one kernel block), where the table says they cost the least time per
    FLOP, while the target holds. Of the moves that land within [flops, flops + slack] and save
    more than `min_gain` of predicted latency, the one losing least per unit of latency saved
    is made (HALP's trade-off). Repeats until no move saves time.

    The start plan's accuracy logic is kept twice: moves are ranked by the sensitivity loss
    they cost (without curves, the squared ratio, which spreads the cut), and no group loses
    more than `max_shift` of its channels (or one kernel block, if more) beyond what `counts`
    takes from it, so the plan stays near the one the allocation chose (widening is free).
    Groups that are skipped, unprunable, grouped into blocks, routed, without a table entry or
    (with curves) without a curve keep their count in `counts`.

    Latency is predicted as `predict_share`, with shares interpolated between the measured
    widths on the table's grid (`LatencyTable.interpolated`; off it, a width costs as the next
    grid width above it).

    Args:
        groups: every group, in `flops_fn`'s order.
        flops_fn: FLOPs of kept counts by group position (`FlopsFn`).
        table: the measured latency table.
        counts: the FLOPs plan's kept counts by group position (groups left out are whole).
        flops: the FLOPs cut it must keep, in (0, 1).
        curves: `{group: {ratio: loss}}`, or None (loss: the squared ratio).
        skip: group names kept as in `counts`.
        round_to: the plan's channel multiple: the steps in which FLOPs are given back.
        max_ratio: the largest share of a group's channels removed.
        max_shift: the largest share of a group's channels removed beyond `counts`.
        slack: the FLOPs cut may exceed `flops` by this much (or by as much as `counts` does).
        min_gain: a move must save more predicted latency share than this.

    Returns:
        Kept counts by group position, for every group below its width; `counts` itself (as a
        dict) when no trade is predicted faster.
    """
    counts = {int(i): int(c) for i, c in counts.items() if c < groups[i].channels}
    base = flops_fn({})
    if base <= 0:
        return counts

    def cut(c: Mapping[int, int]) -> float:
        return 1.0 - flops_fn(c) / base

    ceiling = max(cut(counts), flops + slack)
    skipped = set(skip)
    grid: Dict[int, Tuple[int, ...]] = {}  # efficient widths, widest (the full width) first
    curve: Dict[int, Optional[Sequence[Tuple[float, float]]]] = {}
    for i, g in enumerate(groups):
        if not g.prunable or g.name in skipped or g.name not in table.shares or g.units \
                or g.round_width is not None or not table.shares[g.name]:
            continue
        top = max_ratio
        if curves is not None:
            if g.name not in curves:
                continue
            pts = sorted((float(r), float(l)) for r, l in curves[g.name].items())
            curve[i] = [(0.0, 0.0)] + pts
            top = min(top, pts[-1][0]) if pts else 0.0
        else:
            curve[i] = None
        n, step = g.channels, fit_multiple(g.channels, table.round_to)
        start = counts.get(i, n)
        below = (start - 1) // step * step  # one kernel block below the start, at least
        low = max(min(table.shares[g.name]), int(math.ceil(n * (1.0 - top) - 1e-9)),
                  min(int(math.ceil(start - n * max_shift - 1e-9)), below))
        widths = [n] + [w for w in range(n - n % step if n % step else n - step, 0, -step) if w >= low]
        efficient, best = [], 2.0
        for w in widths:
            s = table.interpolated(g.name, w) if w < n else 1.0
            if s < best - 1e-12:
                efficient.append(w)
                best = s
        if len(efficient) > 1:
            grid[i] = tuple(efficient)
    if not grid:
        return counts

    def width(c: Mapping[int, int], i: int) -> int:
        return c.get(i, groups[i].channels)

    def loss(i: int, w: int) -> float:
        return _loss(curve[i], 1.0 - w / groups[i].channels)

    single: Dict[Tuple[str, int], int] = {}

    def predicted(c: Mapping[int, int]) -> float:
        named = {groups[i].name: w for i, w in c.items()}
        return predict_share(table, named, groups, flops_fn, single, interpolate=True)

    def shrink(i: int, w: int) -> Optional[int]:
        return next((x for x in grid[i] if x < w), None)

    def widen(i: int, w: int) -> Optional[int]:
        n = groups[i].channels
        if w >= n:
            return None
        step = fit_multiple(n, round_to)
        return min(n, (w // step + 1) * step)

    def land(c: Dict[int, int], moved: int) -> Dict[int, int]:
        """Give back what the target does not need, where it costs the least time per FLOP."""
        while True:
            now_flops = flops_fn(c)
            best, best_cost = None, None
            for i in grid:
                w = width(c, i)
                wider = widen(i, w) if i != moved else None
                if wider is None:
                    continue
                trial = dict(c)
                trial[i] = wider
                added = flops_fn(trial) - now_flops
                if added <= 0 or cut(trial) < flops:
                    continue
                s0 = table.interpolated(groups[i].name, w)
                s1 = table.interpolated(groups[i].name, wider)
                cost = ((s1 - s0) / added, i)
                if best_cost is None or cost < best_cost:
                    best, best_cost = trial, cost
            if best is None:
                return {i: w for i, w in c.items() if w < groups[i].channels}
            c = best

    state = dict(counts)
    share, total = predicted(state), sum(loss(i, w) for i, w in state.items() if i in grid)
    start_share = share
    for _ in range(10_000):  # each move saves more than min_gain: this bound is never reached
        best = None
        for i in grid:
            narrower = shrink(i, width(state, i))
            if narrower is None:
                continue
            moved = dict(state)
            moved[i] = narrower
            moved = land(moved, i)
            if cut(moved) > ceiling + 1e-12 or cut(moved) < flops:
                continue
            s = predicted(moved)
            if s > share - min_gain:
                continue
            lost = sum(loss(j, w) for j, w in moved.items() if j in grid)
            key = ((lost - total) / (share - s), groups[i].name)
            if best is None or key < best[0]:
                best = (key, moved, s, lost)
        if best is None:
            break
        _, state, share, total = best
    if share < start_share:
        logger.info("latency-aware FLOPs plan: predicted latency share %.3f instead of %.3f, FLOPs cut %.4f "
                    "(target %.3f)", share, start_share, cut(state), flops)
    return state
