"""Measure a per-group latency table on the exported network, and meet a latency target with it.

The table (HALP's latency lookup table, measured rather than modelled) holds, for every prunable
group and each candidate width, the latency share of the whole exported network with only that
group cut: measured once, with the baseline and the group's candidates timed alternately. A
latency target is then planned from the table (`planning.latency_allocation`) and verified by at
most two exports of the whole plan. Prunes deep copies only, never the live network.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import paddle.nn as nn

from ..planning.allocation import n_keep
from ..planning.latency_allocation import LatencyTable, UnreachableLatency, monotone
from .latency import (CLOCKS, Clock, Kept, LatencyOptions, LatencySearch, RunnerFactory, SlicingPruner, Trial,
                      build_runner, check_latency_target, pruned_copy, time_runners)

logger = logging.getLogger(__name__)

__all__ = ["TABLE_RATIOS", "candidate_widths", "measure_latency_table", "verify_latency_plan"]

class TablePruner(SlicingPruner, Protocol):
    """What the latency table reads of a pruner (`FilterPruner` is one): besides the network and
    its slices, the input shape, the groups (`name`, `channels`, `prunable`), the channels a
    ratio keeps, and the traced graph's FLOPs of kept counts (`graph.flops`)."""

    input_shape: Tuple[int, ...]
    groups: List[Any]
    graph: Any

    def select(self, ratios: Mapping[str, float], round_to: Any = 1) -> Kept: ...


TABLE_RATIOS = (0.2, 0.4, 0.6, 0.8)
"""Pruning ratios whose (rounded) widths the table measures per group: four exports per group at
most (MobileNetV1: about 50), since the cost of the table is its exports."""


def candidate_widths(channels: int, round_to: int = 1, ratios: Sequence[float] = TABLE_RATIOS) -> Tuple[int, ...]:
    """The distinct widths below `channels` that `ratios` keep at `round_to`, widest first.

    Examples:
        >>> candidate_widths(64, 16), candidate_widths(64, 1, (0.1, 0.5))
        ((48, 32, 16), (58, 32))
    """
    return tuple(sorted({n_keep(channels, r, round_to) for r in ratios} - {channels}, reverse=True))


def measure_latency_table(pruner: TablePruner, options: LatencyOptions = LatencyOptions(), *, round_to: int = 1,
                          ratios: Sequence[float] = TABLE_RATIOS, skip: Sequence[str] = (),
                          clock: Optional[Clock] = None,
                          runner_factory: RunnerFactory = build_runner) -> LatencyTable:
    """Each prunable group's latency share at its candidate widths, on the exported network.

    For each group not in `skip`: one pruned copy per candidate width (`candidate_widths`, only
    that group cut, least important channels first), exported and timed alternately with the
    baseline, one pair at a time (`time_runners`, `options.warmup` and `options.repeats`); the
    share is the copy's median over the baseline's in that same run.

    Cost: one export per (group, width): MobileNetV1 at round_to 16 has 14 groups x at most 4 widths.

    Args:
        pruner: a FilterPruner over the live network (see `TablePruner`).
        options: batch, backend, threads, oneDNN, warm-up, repeats, clock.
        round_to: the channel multiple of the candidate widths (resolved, an int).
        ratios: the ratios whose widths are measured.
        skip: group names not measured (they stay whole in plans from this table).
        clock, runner_factory: injected by tests (default: `options.clock`, `build_runner`).

    Returns:
        The LatencyTable (its `exports` counts the pruned copies exported).
    """
    clock = clock if clock is not None else CLOCKS[options.clock]
    shape = list(pruner.input_shape)
    start = time.perf_counter()
    base = runner_factory(pruner.net, shape, **options.measure_kwargs())
    shares: Dict[str, Dict[int, float]] = {}
    raw: Dict[str, Dict[int, float]] = {}
    channels: Dict[str, int] = {}
    skipped = set(skip)
    exports = 0
    todo = [(gi, g) for gi, g in enumerate(pruner.groups) if g.prunable and g.name not in skipped]
    for done, (gi, g) in enumerate(todo):
        runners, widths = [], []
        for w in candidate_widths(g.channels, round_to, ratios):
            kept = pruner.select({g.name: (g.channels - w) / g.channels})
            width = len(kept[gi])
            if width >= g.channels or width in widths:
                continue
            runners.append(runner_factory(pruned_copy(pruner, kept), shape, **options.measure_kwargs()))
            widths.append(width)
        if not runners:
            continue
        exports += len(runners)
        raw[g.name] = {}
        for w, run in zip(widths, runners):  # in pairs, as LatencyMeter verifies: engines that keep
            # per-shape kernel caches (oneDNN) thrash when many networks alternate
            b, c = time_runners([base, run], warmup=options.warmup, repeats=options.repeats, clock=clock)
            raw[g.name][w] = c.median / b.median
        shares[g.name] = monotone(raw[g.name], g.channels)
        channels[g.name] = g.channels
        logger.info("latency table %d/%d: %s (%d ch): %s", done + 1, len(todo), g.name, g.channels,
                    ", ".join(f"{w}:{s:.3f}" for w, s in raw[g.name].items()))
    logger.info("latency table: %d groups, %d exports in %.0f s (%s, batch %d)", len(shares), exports,
                time.perf_counter() - start, options.backend, options.batch)
    return LatencyTable(shares, channels, options.backend, options.batch, tuple(shape), exports, raw, round_to)


def verify_latency_plan(pruner: TablePruner, target: float, plan_at: Callable[[float], Tuple[Kept, float]],
                        measure: Callable[[nn.Layer], float], *, tolerance: float = 0.02,
                        max_verify: int = 2) -> LatencySearch:
    """Plan from the table for `target`, export and measure; correct the model's error once.

    The first plan aims at `target` itself. If its measured share misses the target by more than
    `tolerance` (either way: too slow, or faster than needed and so more pruned than needed), the
    second scales the table's savings by what the first export showed: with measured saving
    `1 - m` where `1 - p` was predicted, it aims at `1 - (1 - target) (1 - p) / (1 - m)` (at
    least 0.01: as fast as the table can go). The error of an additive table grows with the cut
    (noise in many small entries, interactions between neighbours), so it is scaled, not shifted. The smallest FLOPs cut that met the target is returned, else the
    fastest plan (with a warning).

    Args:
        pruner: a FilterPruner (for the pruned copies and FLOPs).
        target: latency share to reach, in (0, 1).
        plan_at: internal target share -> (kept channels, predicted share).
        measure: pruned copy -> measured latency share (e.g. a `LatencyMeter`).
        tolerance: shares within this of the target meet it.
        max_verify: exports of whole plans at most (1 or 2).

    Returns:
        LatencySearch (`flops` is each plan's FLOPs cut; `trials` the verifications).

    A target (or corrected aim) below the table's fastest plan plans that one, with a warning.

    Raises:
        ValueError: bad arguments.
    """
    target = check_latency_target(target)
    if max_verify not in (1, 2):
        raise ValueError(f"max_verify must be 1 or 2, got {max_verify!r}")
    base_flops = pruner.graph.flops({})
    aim = target
    measured: List[Tuple[float, Kept, float]] = []
    trials: List[Trial] = []
    for _ in range(max_verify):
        try:
            kept, predicted = plan_at(aim)
        except UnreachableLatency as e:  # faster than the table's fastest plan: plan that one
            logger.warning("latency plan: %s; planning the fastest the table allows (%.3f)", e,
                           e.lowest)
            aim = e.lowest
            kept, predicted = plan_at(aim)
        cut = 1.0 - pruner.graph.flops({gi: len(k) for gi, k in kept.items()}) / base_flops
        share = float(measure(pruned_copy(pruner, kept)))
        trials.append(Trial(cut, share))
        measured.append((cut, kept, share))
        logger.info("latency plan verification %d: aimed at %.3f, predicted %.3f, measured %.3f (target %.3f), "
                    "FLOPs cut %.3f", len(trials), aim, predicted, share, target, cut)
        if abs(share - target) <= tolerance:
            break
        # the table's savings scaled by what the export showed: measured saving / predicted saving
        scale = (1.0 - share) / (1.0 - predicted) if predicted < 1.0 and share < 1.0 else 0.0
        aim = 1.0 - (1.0 - target) / scale if scale > 0 else 0.01
        aim = min(max(aim, 0.01), 0.99)
    met = [m for m in measured if m[2] <= target + tolerance]
    if met:
        cut, kept, share = min(met, key=lambda m: m[0])
    else:
        cut, kept, share = min(measured, key=lambda m: m[2])
        logger.warning("latency target %.3f not met after %d verification exports: the best plan, a %.3f FLOPs "
                       "cut, runs in %.3f of the original time; lower the target or measure the table with "
                       "more repeats", target, len(trials), cut, share)
    return LatencySearch(cut, kept, share, bool(met), tuple(trials))
