"""The sensitivity analysis: the loss of the metric when each group loses its weakest channels.

Drives the replay engine over groups and ratios and persists every point. It never keeps a change
to the network (masks are always restored) and never touches paddle.Model or VisualDL.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import paddle.nn as nn

from ..modes import eval_mode
from ..plan import check_writable
from .evaluation import EvalData
from .fingerprint import fingerprint, network_signature
from .replay import EvaluateFn, ParamSlices, Runner
from .result import (DEFAULT_RATIOS, FORMAT, SensitivityResult, _check_header, _key, _read,
                     _save)

logger = logging.getLogger(__name__)

BASELINE_RTOL = 1e-6
"""How closely a re-measured baseline must match a file's before the file is resumed or reused."""


class GroupLike(Protocol):
    """What the analysis reads of a group (`prune_callbacks.graph.Group` is one)."""

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
            of 0 or NaN (a diverged network).
    """
    ratios = _check_ratios(ratios)
    skip_idx = {pruner.group_index(s) for s in ([skip] if isinstance(skip, str) else skip)}
    groups = [(i, g) for i, g in enumerate(pruner.groups) if g.prunable and i not in skip_idx]
    channels = {g.name: g.channels for _, g in groups}
    data = _start(pruner, evaluate, ratios, path, channels)
    todo = [(gi, g) for gi, g in groups
            if len(data["losses"].get(g.name, {})) < len(ratios)
            and not _stopped(data["losses"].get(g.name, {}), max_loss)]
    with eval_mode(pruner.net):
        runner = Runner(pruner.net, evaluate, cache and bool(todo), groups,
                        pruner.graph.param_axes)
        baseline = _baseline(runner, data, path, bool(todo))
        total = sum(len(ratios) - len(data["losses"].get(g.name, {})) for _, g in todo)
        done, t0 = 0, time.perf_counter()
        for n, (_, g) in enumerate(todo, 1):
            pts = data["losses"].setdefault(g.name, {})
            with runner.group(g) as run:
                done += _curve(pruner, g.name, run, pts, ratios, baseline, max_loss,
                               lambda: _save(path, data))
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (total - done) if done else 0.0
            logger.info("sensitivity [%d/%d] %s: %d/%d points done, %d left, ETA %.0fs",
                        n, len(todo), g.name, done, total, total - done, eta)
    res = SensitivityResult(baseline=baseline, ratios=tuple(ratios),
                            channels=dict(data["groups"]), criterion=data["criterion"],
                            network=data["network"])
    res.losses = {g: {float(r): l for r, l in pts.items()} for g, pts in data["losses"].items()
                  if g in channels}
    res.channels = {g: c for g, c in res.channels.items() if g in channels}
    return res


def _start(pruner: SensitivityPruner, evaluate: Any, ratios: Tuple[float, ...],
           path: Optional[str], channels: Dict[str, int]) -> Dict[str, Any]:
    """The analysis file's content: resumed from `path` (checked to match), or a new one."""
    describe = evaluate.describe() if isinstance(evaluate, EvalData) else ""
    network = network_signature(pruner.net, pruner.groups)
    if path and os.path.exists(path):
        data = _read(path)
        _check_header(path, data, network, pruner.criterion.name, ratios, describe)
        data["groups"].update(channels)
        logger.info("resuming sensitivity analysis from %s", path)
        return data
    return {"format": FORMAT, "producer": "prune_callbacks", "criterion": pruner.criterion.name,
            "ratios": list(ratios), "input_shape": list(pruner.input_shape), "data": describe,
            "fingerprint": fingerprint(network), "network": network,
            "groups": channels, "baseline": None, "losses": {}}


def _baseline(runner: Runner, data: Dict[str, Any], path: Optional[str], todo: bool) -> float:
    """The unpruned metric, measured every time (it also fills the replay cache): a resumed or
    reused file must hold the baseline of these very weights, or its losses describe others."""
    metric = float(runner.baseline())
    if not math.isfinite(metric):
        raise ValueError(
            f"the unpruned network scores {metric} on the evaluation data: it has diverged (NaN "
            "or infinite outputs), so no sensitivity can be measured; lower the learning rate or "
            "analyse an earlier epoch")
    stored = data["baseline"]
    if stored is None:
        data["baseline"] = stored = metric
        _save(path, data)
    elif not math.isclose(stored, metric, rel_tol=BASELINE_RTOL, abs_tol=1e-12):
        raise ValueError(
            f"{path!r} was measured on other weights: its baseline metric is {stored!r}, these "
            f"weights score {metric!r} on the same data (the curves would not describe them); "
            f"delete it or pass another path to analyse these weights afresh")
    if stored == 0:
        raise ValueError(
            "the baseline metric is 0 on the evaluation data, so relative losses are "
            "undefined: analyse a network that has learned something (a later at_epoch) or "
            "evaluate on more samples (num_samples)")
    return stored


def _curve(pruner: SensitivityPruner, name: str, run: EvaluateFn,
           pts: Dict[str, Optional[float]], ratios: Sequence[float], baseline: float,
           max_loss: Optional[float], save: Callable[[], None]) -> int:
    """Fill the missing points of one group's curve; returns how many were filled."""
    done = 0
    for r in ratios:
        if _key(r) in pts:
            continue
        if _stopped(pts, max_loss):
            pts[_key(r)] = None
        else:
            _, drop = pruner.slices(pruner.select({name: r}))
            pts[_key(r)] = (baseline - run(drop)) / baseline
        done += 1
        save()
    return done


def _stopped(pts: Mapping[str, Optional[float]], max_loss: Optional[float]) -> bool:
    if max_loss is None:
        return False
    return any(v is None or v > max_loss for v in pts.values())


def _check_ratios(ratios: Sequence[float]) -> Tuple[float, ...]:
    try:
        out = tuple(sorted(float(r) for r in ratios))
    except (TypeError, ValueError) as e:
        raise TypeError(f"ratios must be numbers in (0, 1), got {ratios!r}") from e
    if not out or any(not 0.0 < r < 1.0 for r in out):
        raise ValueError(f"ratios must be numbers in (0, 1), got {list(ratios)!r}")
    keys = [_key(r) for r in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"ratios must be distinct (to 6 decimals, the precision of the file's keys); "
                         f"{', '.join(dupes)} appear(s) more than once in {list(ratios)!r}")
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
        _start(pruner, evaluate, _check_ratios(ratios), path, {})
