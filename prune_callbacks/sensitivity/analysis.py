"""The sensitivity analysis: the loss of the metric when each group loses its weakest channels.

Drives the replay engine over groups and ratios and persists every point. It never keeps a change
to the network (masks are always restored) and never touches paddle.Model or VisualDL.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import (Any, Callable, Dict, Iterator, Mapping, Optional, Protocol, Sequence, Tuple,
                    Union)

import numpy as np
import paddle.nn as nn

from ..utils.errors import tagged
from ..training.distributed import (all_gather, broadcast_state, check_agree, is_main, rank,
                           world_size)
from ..utils.modes import eval_mode
from ..utils.files import check_writable
from .evaluation import EvalData, top1_metric
from .fingerprint import fingerprint, network_signature
from .replay import EvaluateFn, ParamSlices, Runner
from .result import (DEFAULT_RATIOS, FORMAT, SensitivityResult, check_header, ratio_key, read_result,
                     save_result)

logger = logging.getLogger(__name__)

BASELINE_RTOL = 1e-6
"""How closely a re-measured baseline must match a file's before the file is resumed or reused."""


class UnresolvableMetric(ValueError):
    """The baseline metric cannot give relative losses: 0, not a finite number, or scored on too
    few samples to resolve them. A caller may fall back to another metric (the loss) or plan
    without curves."""


class GroupLike(Protocol):
    """What the analysis reads of a group (`prune_callbacks.graph.channels.Group` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def channels(self) -> int: ...
    @property
    def prunable(self) -> bool: ...
    @property
    def layers(self) -> Sequence[str]: ...


class CriterionLike(Protocol):
    @property
    def name(self) -> str: ...


class GraphLike(Protocol):
    @property
    def param_axes(self) -> Mapping[Tuple[str, int], Any]: ...


class SensitivityPruner(Protocol):
    """What `analyse` needs from a pruner: `FilterPruner` is one.

    The analysis reads the network and its groups, and asks which parameter slices a ratio of a
    group's weakest channels would zero; it never prunes.
    """

    @property
    def net(self) -> nn.Layer: ...
    @property
    def input_shape(self) -> Tuple[int, ...]: ...
    @property
    def criterion(self) -> CriterionLike: ...
    @property
    def groups(self) -> Sequence[GroupLike]: ...
    @property
    def graph(self) -> GraphLike: ...

    def group_index(self, name: str) -> int: ...

    def select(self, ratios: Mapping[str, float],
               round_to: int = 1) -> Mapping[int, np.ndarray]: ...

    def slices(self, kept: Mapping[int, np.ndarray]) -> Tuple[ParamSlices, ParamSlices]: ...


def analyse(pruner: SensitivityPruner, evaluate: Union[Callable[[], float], EvalData],
            ratios: Sequence[float] = DEFAULT_RATIOS, path: Optional[str] = None,
            skip: Sequence[str] = (), max_loss: Optional[float] = None,
            cache: bool = True) -> SensitivityResult:
    """Loss of the metric when each prunable group loses each ratio of its weakest channels.

    Args:
        pruner: a FilterPruner over the network (see `SensitivityPruner`).
        evaluate: `eval_fn() -> float` (higher is better), or an `EvalData`, which lets the
            engine batch once and replay the unaffected start of the network from a cache.
        ratios: ratios to try, each in (0, 1).
        path: JSON file, rewritten atomically after every point; an existing file is resumed
            (or, complete, reused) once the baseline measured now matches the one it holds.
        skip: groups (names or parameter names) not to analyse.
        max_loss: stop a group's curve once its loss exceeds this; later ratios stay None.
        cache: replay unaffected layers from a cache (EvalData only). Same numbers either way.

    Returns:
        SensitivityResult. The network's parameters and each sublayer's train/eval mode are
        unchanged afterwards.

    Raises:
        ValueError: bad or duplicate ratios, a corrupt file, or a file made for another network
            (any group, layer type or parameter shape differs), criterion, ratio set or data, or
            on other weights (its baseline differs from the one measured now); a baseline metric
            of 0 or NaN (a diverged network), or a top-1 baseline of fewer correct samples than
            `EvalData.min_correct`: `UnresolvableMetric` (a ValueError).
    """
    ratios = check_ratios(ratios)
    lower = bool(getattr(evaluate, "lower_is_better", False))
    skip_idx = {pruner.group_index(s) for s in ([skip] if isinstance(skip, str) else skip)}
    groups = [(i, g) for i, g in enumerate(pruner.groups) if g.prunable and i not in skip_idx]
    channels = {g.name: g.channels for _, g in groups}
    data = _shared(lambda: _start(pruner, evaluate, ratios, path, channels))
    todo = [(gi, g) for gi, g in groups
            if len(data["losses"].get(g.name, {})) < len(ratios)
            and not _stopped(data["losses"].get(g.name, {}), max_loss)]
    path = path if is_main() else None  # one writer under paddle.distributed
    if isinstance(evaluate, EvalData) and world_size() > 1:
        logger.info("took rank 0's running statistics (%d tensors) so the ranks' evaluations "
                    "agree", broadcast_state(pruner.net))
    with eval_mode(pruner.net):
        runner = Runner(pruner.net, evaluate, cache and bool(todo), groups,
                        pruner.graph.param_axes)
        baseline = _baseline(runner, data, path, bool(todo), evaluate)
        if isinstance(evaluate, EvalData) and world_size() > 1:
            check_agree("sensitivity baseline", {"baseline": round(baseline, 9)})
            _shared_curves(pruner, runner, todo, data, ratios, baseline, max_loss, path, lower)
        else:  # one process, or an opaque eval_fn (which may itself use collectives)
            _curves(pruner, runner, todo, data, ratios, baseline, max_loss, path, lower)
    res = SensitivityResult(baseline=baseline, ratios=tuple(ratios),
                            channels=dict(data["groups"]), criterion=data["criterion"],
                            network=data["network"])
    res.losses = {g: {float(r): l for r, l in pts.items()} for g, pts in data["losses"].items()
                  if g in channels}
    res.channels = {g: c for g, c in res.channels.items() if g in channels}
    return res


def _curves(pruner: SensitivityPruner, runner: Runner, todo: Sequence[Tuple[int, Any]],
            data: Dict[str, Any], ratios: Sequence[float], baseline: float,
            max_loss: Optional[float], path: Optional[str], lower: bool = False) -> None:
    """Every missing point, group by group, saved after each one."""
    total = sum(len(ratios) - len(data["losses"].get(g.name, {})) for _, g in todo)
    progress = _Progress(total)
    for n, (_, g) in enumerate(todo, 1):
        pts = data["losses"].setdefault(g.name, {})
        filled = 0
        with runner.group(g) as run:
            for _ in _fill(pruner, g.name, run, pts, ratios, baseline, max_loss, lower):
                filled += 1
                save_result(path, data)
        progress.log(filled, f"[{n}/{len(todo)}] {g.name}")


def _shared_curves(pruner: SensitivityPruner, runner: Runner, todo: Sequence[Tuple[int, Any]],
                   data: Dict[str, Any], ratios: Sequence[float], baseline: float,
                   max_loss: Optional[float], path: Optional[str], lower: bool = False) -> None:
    """The missing points shared out over the ranks (whole groups, so each keeps its replay
    cache), evaluated one point per rank per round; each round's points are gathered so every
    rank holds the full analysis, and rank 0 saves it (a kill loses at most one round)."""
    missing = {g.name: len(ratios) - len(data["losses"].get(g.name, {})) for _, g in todo}
    shares = _balance([g.name for _, g in todo], missing, world_size())
    mine = [(gi, g) for gi, g in todo if g.name in shares[rank()]]
    rounds = max(sum(missing[name] for name in share) for share in shares)
    points = _points(pruner, runner, mine, data, ratios, baseline, max_loss, lower)
    progress = _Progress(sum(missing.values()))
    for _ in range(rounds):
        point = next(points, None)
        got = [p for p in all_gather(point) if p is not None]
        for name, key, loss in got:
            data["losses"].setdefault(name, {})[key] = loss
        save_result(path, data)
        progress.log(len(got), f"{len(got)} point(s) on {world_size()} ranks")


def _balance(names: Sequence[str], cost: Mapping[str, int], n: int) -> list:
    """Split groups into `n` shares of nearly equal cost (largest first, to the lightest)."""
    shares: list = [set() for _ in range(n)]
    load = [0] * n
    for name in sorted(names, key=lambda g: -cost[g]):  # sorted() is stable: same on every rank
        i = load.index(min(load))
        shares[i].add(name)
        load[i] += cost[name]
    return shares


def _points(pruner: SensitivityPruner, runner: Runner, mine: Sequence[Tuple[int, Any]],
            data: Dict[str, Any], ratios: Sequence[float], baseline: float,
            max_loss: Optional[float], lower: bool = False) -> Iterator[Tuple[str, str, Optional[float]]]:
    """This rank's missing points, one (group, ratio key, loss) at a time."""
    for _, g in mine:
        pts = dict(data["losses"].get(g.name, {}))
        with runner.group(g) as run:
            for key, loss in _fill(pruner, g.name, run, pts, ratios, baseline, max_loss, lower):
                yield g.name, key, loss


class _Progress:
    """Counts points and logs progress with an ETA (on rank 0 only)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def log(self, filled: int, what: str) -> None:
        before, self.done = self.done, self.done + filled
        every = max(1, self.total // 20)  # about 20 lines per analysis, and the last point
        if not is_main() or (before // every == self.done // every and self.done < self.total):
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        logger.info("sensitivity %s: %d/%d points done, %d left, ETA %.0fs", what, self.done,
                    self.total, self.total - self.done, eta)


def _shared(read: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """`read()` on rank 0, its result (or its error) handed to every rank, so all ranks resume
    from the same state even while rank 0 rewrites the file."""
    if world_size() == 1:
        return read()
    outcome: Tuple[str, Any] = ("ok", None)
    error: Optional[BaseException] = None
    if is_main():
        try:
            outcome = ("ok", read())
        except (ValueError, TypeError, OSError) as e:
            error, outcome = e, ("error", f"{type(e).__name__}: {e}")
    status, value = all_gather(outcome)[0]  # every rank takes part, so none waits on an error
    if error is not None:
        raise error
    if status == "error":
        raise ValueError(f"rank 0 could not start the sensitivity analysis: {value}")
    return value


def _start(pruner: SensitivityPruner, evaluate: Any, ratios: Tuple[float, ...],
           path: Optional[str], channels: Dict[str, int]) -> Dict[str, Any]:
    """The analysis file's content: resumed from `path` (checked to match), or a new one."""
    describe = evaluate.describe() if isinstance(evaluate, EvalData) else ""
    network = network_signature(pruner.net, pruner.groups)
    if path and os.path.exists(path):
        data = read_result(path)
        check_header(path, data, network, pruner.criterion.name, ratios, describe)
        data["groups"].update(channels)
        logger.info("resuming sensitivity analysis from %s", path)
        return data
    return {"format": FORMAT, "producer": "prune_callbacks", "criterion": pruner.criterion.name,
            "ratios": list(ratios), "input_shape": list(pruner.input_shape), "data": describe,
            "fingerprint": fingerprint(network), "network": network,
            "groups": channels, "baseline": None, "losses": {}}


def _baseline(runner: Runner, data: Dict[str, Any], path: Optional[str], todo: bool,
              evaluate: Any = None) -> float:
    """The unpruned metric, measured every time (it also fills the replay cache): a resumed or
    reused file must hold the baseline of these very weights, or its losses describe others."""
    metric = float(runner.baseline())
    if not math.isfinite(metric):
        raise UnresolvableMetric(
            f"the unpruned network scores {metric} on the evaluation data: it has diverged (NaN "
            "or infinite outputs), so no sensitivity can be measured; lower the learning rate or "
            "analyse an earlier epoch")
    stored = data["baseline"]  # a file of other weights is named first, whatever they score
    if stored is not None and not math.isclose(stored, metric, rel_tol=BASELINE_RTOL, abs_tol=1e-12):
        raise ValueError(
            f"{path!r} was measured on other weights: its baseline metric is {stored!r}, these "
            f"weights score {metric!r} on the same data (the curves would not describe them); "
            f"delete it or pass another path to analyse these weights afresh")
    if metric == 0:
        raise UnresolvableMetric(
            "the baseline metric is 0 on the evaluation data, so relative losses are "
            "undefined: analyse a network that has learned something (a later at_epoch), "
            "evaluate on more samples (num_samples) or use metric='loss'")
    _check_resolution(metric, evaluate)
    if stored is None:
        data["baseline"] = stored = metric
        save_result(path, data)
    return stored


def _check_resolution(baseline: float, evaluate: Any) -> None:
    """Raise when a top-1 baseline rests on fewer correct samples than `evaluate.min_correct`
    (`HANDFUL` from the callback): no point of a curve could move by more than that, so its
    relative losses would be noise."""
    if not isinstance(evaluate, EvalData) or evaluate.metric is not top1_metric or not evaluate.min_correct:
        return
    correct = int(round(baseline * evaluate.size))
    if correct < evaluate.min_correct:
        raise UnresolvableMetric(
            f"the baseline top-1 is {baseline:.3f} on {evaluate.size} evaluation samples: {correct} "
            f"correct, so no point can change by a handful ({evaluate.min_correct}) of samples and relative "
            f"losses move in steps of {1 / max(correct, 1):.0%}; evaluate on more samples "
            f"(num_samples) or use metric='loss'")


def _fill(pruner: SensitivityPruner, name: str, run: EvaluateFn,
          pts: Dict[str, Optional[float]], ratios: Sequence[float], baseline: float,
          max_loss: Optional[float], lower: bool = False) -> Iterator[Tuple[str, Optional[float]]]:
    """Fill the missing points of one group's curve in `pts`, yielding each (ratio key, loss):
    the metric's relative drop, or for a loss (`lower`) its relative rise: higher is worse."""
    for r in ratios:
        if ratio_key(r) in pts:
            continue
        if _stopped(pts, max_loss):
            pts[ratio_key(r)] = None
        else:
            _, drop = pruner.slices(pruner.select({name: r}))
            change = baseline - run(drop)
            pts[ratio_key(r)] = (-change if lower else change) / baseline
        yield ratio_key(r), pts[ratio_key(r)]


def _stopped(pts: Mapping[str, Optional[float]], max_loss: Optional[float]) -> bool:
    if max_loss is None:
        return False
    return any(v is None or v > max_loss for v in pts.values())


def check_ratios(ratios: Sequence[float]) -> Tuple[float, ...]:
    try:
        out = tuple(sorted(float(r) for r in ratios))
    except (TypeError, ValueError) as e:
        raise tagged("ratios", TypeError(f"ratios must be numbers in (0, 1), got {ratios!r}")) from e
    if not out or any(not 0.0 < r < 1.0 for r in out):
        raise tagged("ratios", ValueError(f"ratios must be numbers in (0, 1), got {list(ratios)!r}"))
    keys = [ratio_key(r) for r in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise tagged("ratios", ValueError(f"ratios must be distinct (to 6 decimals, the precision of the file's keys); "
                         f"{', '.join(dupes)} appear(s) more than once in {list(ratios)!r}"))
    return out


def check_file(pruner: SensitivityPruner, evaluate: Union[Callable[[], float], EvalData],
               ratios: Sequence[float], path: str) -> None:
    """Check now, before any work, that `analyse(pruner, evaluate, ratios, path)` can use `path`:
    a writable file (not a directory) that, if it exists, is a sensitivity file made for this
    network, criterion, ratio set and data. The baseline is checked when the analysis runs.

    Raises:
        ValueError: what `analyse` would raise about the file, and an unwritable path.
    """
    check_writable(path, "sensitivity file")
    if os.path.exists(path):
        _start(pruner, evaluate, check_ratios(ratios), path, {})
