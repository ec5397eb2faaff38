"""Choose a pruning ratio per group so that the network loses a target share of its FLOPs.

Analytic: FLOPs come from channel counts through the traced graph, never from pruning and
restoring the live network. Deterministic: the same network and curves give the same plan.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

STRATEGIES = ("sensitivity", "uniform")


def n_keep(n: int, ratio: float, rounding: int = 1) -> int:
    """Channels kept out of `n` at `ratio`: floor(ratio*n) go, round up to `rounding`, keep >= 1."""
    keep = n - int(math.floor(ratio * n + 1e-9))
    if rounding > 1:
        keep = min(n, int(math.ceil(keep / rounding) * rounding))
    return max(1, keep)


def _units(group: Any) -> List[int]:
    """Block sizes of a group (one block unless grouped convolutions constrain it)."""
    if group.partition is None:
        return [group.channels]
    return [int((group.partition == b).sum()) for b in np.unique(group.partition)]


def kept_count(group: Any, ratio: float, round_to: int = 1) -> int:
    units = _units(group)
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


def plan_ratios(pruner: Any, target: float, sens: Optional[Any], skip: Sequence[str] = (),
                strategy: str = "sensitivity", round_to: int = 1) -> Dict[int, np.ndarray]:
    """Kept channels per group that remove `target` of the FLOPs.

    Sensitivity strategy (PaddleSlim's rule): one loss threshold for all groups; each group gets
    the largest ratio whose interpolated loss stays under it; the threshold is found by
    bisection. Then a last exact step removes single channels (cheapest loss first) until the
    target is met, so the result lands at or just above the target.

    Raises:
        ValueError: target outside (0, 1), unknown strategy, no curves for strategy
            "sensitivity", or a target larger than the largest reachable reduction.
    """
    if not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
        raise ValueError(f"FLOPs target must be a fraction in (0, 1), e.g. 0.4; got {target!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "sensitivity" and sens is None:
        raise ValueError("strategy 'sensitivity' needs sensitivities: run pruner.sensitivity(...) "
                         "first, pass sensitivities=..., or use strategy='uniform'")
    skip_idx = {pruner.group_index(s) for s in skip}
    graph = pruner.graph
    cands = [i for i, g in enumerate(graph.groups) if g.prunable and i not in skip_idx]
    curves: Dict[int, List[Tuple[float, float]]] = {}
    if strategy == "sensitivity":
        losses = sens.curves()
        missing = [graph.groups[i].name for i in cands if graph.groups[i].name not in losses]
        if missing:
            logger.warning("no sensitivity for %d group(s), left unpruned: %s", len(missing),
                           ", ".join(missing[:5]))
        cands = [i for i in cands if graph.groups[i].name in losses]
        for i in cands:
            pts = sorted(losses[graph.groups[i].name].items())
            curves[i] = [(0.0, 0.0)] + [(float(r), float(l)) for r, l in pts]
    base = graph.flops({})
    if not cands:
        raise ValueError("no group can be pruned (all skipped, unprunable or without curves)")

    def reduction(ratios: Dict[int, float]) -> float:
        counts = {i: kept_count(graph.groups[i], r, round_to) for i, r in ratios.items()}
        return 1.0 - graph.flops(counts) / base

    top = {i: max(curves[i][-1][0], 0.0) if curves else 0.999 for i in cands}
    if strategy == "uniform":
        top = {i: 0.999 for i in cands}
    reachable = reduction(top)
    if target > reachable + 1e-9:
        raise ValueError(
            f"a FLOPs reduction of {target:.3f} cannot be reached: the largest reachable with these "
            f"groups{' and sensitivity ratios' if strategy == 'sensitivity' else ''} is "
            f"{reachable:.3f}; lower the target or skip fewer groups")

    if strategy == "uniform":
        def assign(t: float) -> Dict[int, float]:
            return {i: t for i in cands}
        lo, hi = 0.0, 0.999
    else:
        def assign(t: float) -> Dict[int, float]:
            return {i: min(_interp_ratio(curves[i], t), top[i]) for i in cands}
        all_losses = [l for c in curves.values() for _, l in c]
        lo, hi = min(all_losses) - 1.0, max(all_losses) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if reduction(assign(mid)) >= target:
            hi = mid
        else:
            lo = mid
    ratios = assign(lo)
    ratios = _top_up(graph, ratios, curves, top, target, base, round_to)
    achieved = reduction(ratios)
    logger.info("planned a %.3f FLOPs reduction: achieved %.4f, %d of %d groups pruned", target,
                achieved, sum(r > 0 for r in ratios.values()), len(ratios))
    return pruner.select({graph.groups[i].name: r for i, r in ratios.items() if r > 0},
                         round_to)


def _top_up(graph: Any, ratios: Dict[int, float], curves: Dict[int, List[Tuple[float, float]]],
            top: Dict[int, float], target: float, base: int, round_to: int) -> Dict[int, float]:
    """Remove one more unit at a time from the group where it costs least, up to the target."""
    ratios = dict(ratios)

    def counts() -> Dict[int, int]:
        return {i: kept_count(graph.groups[i], r, round_to) for i, r in ratios.items()}

    def loss_at(i: int, r: float) -> float:
        if i not in curves:
            return r
        xs, ys = zip(*curves[i])
        return float(np.interp(r, xs, ys))

    budget = sum(graph.groups[i].channels for i in ratios) + 1
    while budget > 0 and 1.0 - graph.flops(counts()) / base < target:
        budget -= 1
        best, best_cost = None, None
        for i, r in ratios.items():
            g = graph.groups[i]
            nxt = _next_ratio(g, r, round_to)
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


def _next_ratio(group: Any, ratio: float, round_to: int) -> Optional[float]:
    """The smallest ratio above `ratio` that keeps fewer channels, or None at the minimum."""
    units = _units(group)
    if len(units) == 1:
        n = units[0]
        keep = n_keep(n, ratio, round_to)
        step = round_to if round_to > 1 else 1
        new_keep = keep - step
        if new_keep < 1:
            return None
        return (n - new_keep) / n
    u = min(units)
    removed = int(math.floor(ratio * u + 1e-9))
    if removed + 1 >= u:
        return None
    return (removed + 1) / u
