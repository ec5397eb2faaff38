"""Sensitivity analysis: the accuracy lost when each group loses its weakest channels.

Pure engine code: takes a pruner and an evaluation, returns plain data, never keeps a change
to the network (masks are always restored) and never touches paddle.Model or VisualDL.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from .plan import write_json_atomic
from .surgery import Mask

logger = logging.getLogger(__name__)

FORMAT = "prune_callbacks.sensitivity/1"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SensitivityResult:
    """Losses per group and ratio: `(baseline - metric) / baseline` (PaddleSlim's definition).

    `losses[group][ratio]` is None for a point that was not evaluated (early stop by `max_loss`).
    """

    baseline: float
    ratios: Tuple[float, ...]
    losses: Dict[str, Dict[float, Optional[float]]] = field(default_factory=dict)
    channels: Dict[str, int] = field(default_factory=dict)
    criterion: str = "l1"

    def curves(self) -> Dict[str, Dict[float, float]]:
        """Evaluated points only, as `{group: {ratio: loss}}` (PaddleSlim's `sensitive()` format)."""
        return {
            g: {r: l for r, l in pts.items() if l is not None} for g, pts in self.losses.items()
        }

    @property
    def complete(self) -> bool:
        return all(len(self.losses.get(g, {})) == len(self.ratios) for g in self.channels)

    @classmethod
    def load(cls, path: str) -> "SensitivityResult":
        """Read an analysis written by `analyse` (complete or not)."""
        data = _read(path)
        res = cls(baseline=data["baseline"], ratios=tuple(data["ratios"]),
                  channels=dict(data["groups"]), criterion=data["criterion"])
        res.losses = {g: {float(r): l for r, l in pts.items()}
                      for g, pts in data["losses"].items()}
        return res


# ---------------------------------------------------------------------------------------------
# Evaluation: a user callable, or a dataset the engine batches (and may cache) itself
# ---------------------------------------------------------------------------------------------

Metric = Callable[[np.ndarray, np.ndarray], Tuple[float, int]]


def top1_metric(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, int]:
    """Correct top-1 predictions and count, for a batch."""
    pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return float((pred == labels.reshape(-1)).sum()), len(pred)


@dataclass
class EvalData:
    """A dataset turned into ready batches, evaluated with a metric (default: top-1 accuracy).

    Args:
        dataset: a `paddle.io.Dataset` (or any indexable) of (input, label) samples.
        metric: `metric(logits, labels) -> (correct, count)` over numpy arrays, summed over
            batches; default top-1 accuracy.
        batch_size: evaluation batch size.
        num_samples: use only the first `num_samples` samples (all when None).
        workers: threads evaluating batches in parallel (default: CPU cores, at most 4).
    """

    dataset: Any
    metric: Metric = top1_metric
    batch_size: int = 64
    num_samples: Optional[int] = None
    workers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = _default_workers()
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive int or None, got {self.workers!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.num_samples is not None and (not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise ValueError(f"num_samples must be a positive int or None, got {self.num_samples!r}")
        n = len(self.dataset)
        if n == 0:
            raise ValueError("the evaluation dataset is empty")
        n = min(n, self.num_samples or n)
        xs, ys = [], []
        for i in range(n):
            sample = self.dataset[i]
            xs.append(np.asarray(sample[0], dtype=np.float32))
            ys.append(np.asarray(sample[1]).reshape(-1)[:1])
        x, y = np.stack(xs), np.concatenate(ys)
        self.batches: List[Tuple[paddle.Tensor, np.ndarray]] = [
            (paddle.to_tensor(x[i:i + self.batch_size]), y[i:i + self.batch_size])
            for i in range(0, n, self.batch_size)
        ]
        self.size = n

    def describe(self) -> str:
        return f"{type(self.dataset).__name__}: {self.size} samples"

    def score(self, outputs: Sequence[np.ndarray]) -> float:
        correct = total = 0.0
        for out, (_, y) in zip(outputs, self.batches):
            c, t = self.metric(out, y)
            correct, total = correct + c, total + t
        return correct / total


# ---------------------------------------------------------------------------------------------
# Replaying what a group cannot change
#
# While one group is masked, a layer call gives its baseline output when its input does not
# depend on the group (every call that ends before the group's first layer runs, and parallel
# branches), and gives its baseline output with the group's removed channels zeroed when it is
# one of the group's producers or per-channel layers (conv filters, BatchNorm, depthwise conv)
# that runs before the first layer mixing the group's channels (a consumer conv or Linear). So
# for each ratio only the network from that first consumer on is computed; the rest is replayed
# from one baseline pass. The results are bit-for-bit those of the masked network.
# ---------------------------------------------------------------------------------------------

_OUT_AXIS: Dict[type, Callable[[nn.Layer], int]] = {}


def register_output_axis(*types: type) -> Callable:
    """Register where a layer type puts its output channels (so its output can be masked).

    Examples:
        >>> @register_output_axis(MyConv)
        ... def _(layer): return 1
    """
    def deco(fn: Callable[[nn.Layer], int]) -> Callable[[nn.Layer], int]:
        for t in types:
            _OUT_AXIS[t] = fn
        return fn
    return deco


def _output_axis(layer: nn.Layer) -> Optional[int]:
    for cls in type(layer).__mro__:
        if cls in _OUT_AXIS:
            return _OUT_AXIS[cls](layer)
    return None


def _data_format_axis(layer: nn.Layer) -> int:
    return -1 if str(getattr(layer, "_data_format", "NCHW")).endswith("C") else 1


register_output_axis(nn.Conv1D, nn.Conv2D, nn.Conv3D, nn.layer.norm._BatchNormBase, nn.BatchNorm,
                     nn.layer.norm._InstanceNormBase)(_data_format_axis)
register_output_axis(nn.Linear)(lambda layer: -1)


@dataclass
class _Call:
    path: str
    index: int  # n-th call of this layer within one forward
    start: int  # event counters
    end: int = -1
    parent: Optional[int] = None  # position of the enclosing call in the call list
    leaf: bool = False
    mb: float = 0.0  # output size for the recorded batch


class _CallRecorder:
    """Records the order (and output sizes) of sublayer calls in one forward pass."""

    def __init__(self, net: nn.Layer) -> None:
        self.net = net
        self.calls: List[_Call] = []

    def record(self, x: paddle.Tensor) -> List[_Call]:
        stack: List[int] = []
        counts: Dict[str, int] = {}
        clock = [0]
        hooks = []

        def pre(path: str, leaf: bool) -> Callable:
            def fn(layer: nn.Layer, inputs: Any) -> None:
                clock[0] += 1
                self.calls.append(_Call(path, counts.get(path, 0), clock[0],
                                        parent=stack[-1] if stack else None, leaf=leaf))
                counts[path] = counts.get(path, 0) + 1
                stack.append(len(self.calls) - 1)
            return fn

        def post(layer: nn.Layer, inputs: Any, output: Any) -> None:
            clock[0] += 1
            call = self.calls[stack.pop()]
            call.end = clock[0]
            if isinstance(output, paddle.Tensor):
                call.mb = output.numel().item() * output.element_size() / 2**20

        for path, layer in self.net.named_sublayers():
            leaf = not layer.sublayers()
            hooks.append(layer.register_forward_pre_hook(pre(path, leaf)))
            hooks.append(layer.register_forward_post_hook(post))
        try:
            with paddle.no_grad():
                self.net(x)
        finally:
            for h in hooks:
                h.remove()
        return self.calls


def _prefix_calls(calls: List[_Call], layers: Sequence[str]) -> List[int]:
    """Maximal calls that end before the first call of any layer in `layers` (or inside them)."""
    def is_member(path: str) -> bool:
        return any(path == l or path.startswith(l + ".") for l in layers)

    first = next((c.start for c in calls if is_member(c.path)), None)
    if first is None:
        return []
    done = {i for i, c in enumerate(calls) if c.end != -1 and c.end < first}
    return [i for i in sorted(done) if calls[i].parent not in done]


@dataclass
class _GroupReplay:
    """What one group replays: call index -> None (baseline) or (output axis, member key)."""

    calls: Dict[int, Optional[Tuple[int, Tuple[str, int]]]]

    @property
    def needed(self) -> set:
        return set(self.calls)


def _group_replay(calls: List[_Call], net: nn.Layer, gi: int, group: Any,
                  param_axes: Mapping[Tuple[str, int], Any], region: bool) -> _GroupReplay:
    """Calls to replay for group `gi`: its prefix, then (with `region`) the leaf calls up to
    the first layer that mixes the group's channels."""
    prefix = _prefix_calls(calls, group.layers)
    out: Dict[int, Optional[Tuple[int, Tuple[str, int]]]] = {i: None for i in prefix}
    if not region or not prefix and not group.layers:
        return _GroupReplay(out)
    layers = dict(net.named_sublayers())
    roles: Dict[str, List[Tuple[str, Tuple[str, int]]]] = {}
    for (key, axis), pa in param_axes.items():
        if np.any(pa.group == gi):
            roles.setdefault(key.rpartition(".")[0], []).append((pa.role, (key, axis)))
    first = next((c.start for c in calls if c.path in roles), None)
    if first is None:
        return _GroupReplay(out)
    inside = set(prefix)
    for i, c in enumerate(calls):
        if c.start < first:
            continue
        member = roles.get(c.path)
        if member is not None:
            if any(role == "in" for role, _ in member):
                break  # the first layer mixing the group's channels: live from here on
            axis = _output_axis(layers[c.path]) if c.leaf else None
            if axis is None:
                break  # a member whose output we cannot mask: stop replaying here
            out[i] = (axis, member[0][1])
        elif c.leaf and not _nested_in(calls, i, inside) and _has_params(layers[c.path]):
            out[i] = None  # a parallel branch: its input does not depend on the group
    return _GroupReplay(out)


def _nested_in(calls: List[_Call], i: int, chosen: set) -> bool:
    p = calls[i].parent
    while p is not None:
        if p in chosen:
            return True
        p = calls[p].parent
    return False


def _has_params(layer: nn.Layer) -> bool:
    return bool(layer.parameters(include_sublayers=False))


class _Replay:
    """Replaces chosen layer calls by cached (and possibly masked) outputs, per thread."""

    def __init__(self, net: nn.Layer, calls: List[_Call], chosen: Mapping[int, Any],
                 local: threading.local) -> None:
        self.layers = dict(net.named_sublayers())
        self.calls = calls
        self.chosen = dict(chosen)
        self.local = local
        skipped = {i for i in range(len(calls)) if _nested_in(calls, i, set(self.chosen))}
        self.live: Dict[str, List[int]] = {}
        for i, c in enumerate(calls):
            if i not in skipped:
                self.live.setdefault(c.path, []).append(i)
        self.paths = sorted({calls[i].path for i in self.chosen})

    def install(self, cached: Callable[[int], Any]) -> None:
        for path in self.paths:
            layer = self.layers[path]
            original = type(layer).forward.__get__(layer)
            live = self.live[path]
            local = self.local

            def forward(*args: Any, _p=path, _o=original, _live=live, **kw: Any) -> Any:
                counts = local.counts
                k = counts.get(_p, 0)
                counts[_p] = k + 1
                call = _live[k] if k < len(_live) else None
                if call is not None and call in self.chosen:
                    return cached(call)
                return _o(*args, **kw)

            layer.__dict__["forward"] = forward

    def uninstall(self) -> None:
        for path in self.paths:
            self.layers[path].__dict__.pop("forward", None)


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"sensitivity file {path!r} is corrupt ({e}); it was left untouched: move or delete "
            "it, or pass another path, to start afresh") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a sensitivity file of this version (format {data.get('format')!r} "
            f"if a dict, expected {FORMAT!r}); delete it or pass another path to start afresh")
    return data


def _key(r: float) -> str:
    return repr(round(float(r), 6))


def _check_header(path: str, data: Dict[str, Any], channels: Dict[str, int], criterion: str,
                  ratios: Sequence[float], describe: str) -> None:
    fix = "delete it or pass another path to start afresh"
    if data["criterion"] != criterion:
        raise ValueError(f"{path!r} was made with criterion {data['criterion']!r}, not "
                         f"{criterion!r}; {fix}")
    if [_key(r) for r in data["ratios"]] != [_key(r) for r in ratios]:
        raise ValueError(f"{path!r} was made for ratios {data['ratios']}, not {list(ratios)}; {fix}")
    for g, c in data["groups"].items():
        if channels.get(g) != c:
            now = channels.get(g)
            what = "no such group" if now is None else f"{now} channels"
            raise ValueError(f"{path!r} was made for a different network: group {g!r} had {c} "
                             f"channels there, this network has {what}; {fix}")
    if describe and data.get("data") and data["data"] != describe:
        raise ValueError(f"{path!r} was made on other data ({data['data']!r}, now {describe!r}); "
                         f"{fix}")


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


def analyse(pruner: Any, evaluate: Union[Callable[[], float], EvalData],
            ratios: Sequence[float] = DEFAULT_RATIOS, path: Optional[str] = None,
            skip: Sequence[str] = (), max_loss: Optional[float] = None,
            cache: bool = True) -> SensitivityResult:
    """Loss of the metric when each prunable group loses each ratio of its weakest channels.

    Args:
        pruner: a FilterPruner over the network.
        evaluate: `eval_fn() -> float` (higher is better), or an `EvalData`, which lets the
            engine batch once and replay the unaffected start of the network from a cache.
        ratios: ratios to try, each in (0, 1).
        path: JSON file, rewritten atomically after every point; an existing file is resumed.
        skip: groups (names or parameter names) not to analyse.
        max_loss: stop a group's curve once its loss exceeds this; later ratios stay None.
        cache: replay unaffected layers from a cache (EvalData only). Same numbers either way.

    Returns:
        SensitivityResult. The network's parameters are bit-for-bit unchanged afterwards.

    Raises:
        ValueError: bad ratios, a corrupt file, or a file made for another network, criterion,
            ratio set or data.
    """
    ratios = _check_ratios(ratios)
    skip_idx = {pruner.group_index(s) for s in skip}
    groups = [(i, g) for i, g in enumerate(pruner.groups) if g.prunable and i not in skip_idx]
    channels = {g.name: g.channels for _, g in groups}
    describe = evaluate.describe() if isinstance(evaluate, EvalData) else ""
    data: Dict[str, Any]
    if path and os.path.exists(path):
        data = _read(path)
        _check_header(path, data, channels, pruner.criterion.name, ratios, describe)
        data["groups"].update(channels)
        logger.info("resuming sensitivity analysis from %s", path)
    else:
        data = {"format": FORMAT, "producer": "prune_callbacks", "criterion": pruner.criterion.name,
                "ratios": list(ratios), "input_shape": list(pruner.input_shape), "data": describe,
                "groups": channels, "baseline": None, "losses": {}}

    todo = [(gi, g) for gi, g in groups
            if len(data["losses"].get(g.name, {})) < len(ratios)
            and not _stopped(data["losses"].get(g.name, {}), max_loss)]
    net = pruner.net
    training = net.training
    net.eval()
    try:
        runner = _Runner(net, evaluate, cache and bool(todo), groups, pruner.graph.param_axes)
        if data["baseline"] is None or (runner.cache and todo):
            metric = float(runner.baseline())  # also fills the replay cache
            if data["baseline"] is None:
                data["baseline"] = metric
                _save(path, data)
        baseline = data["baseline"]
        if baseline == 0:
            raise ValueError(
                "the baseline metric is 0 on the evaluation data, so relative losses are "
                "undefined: analyse a network that has learned something (a later at_epoch) or "
                "evaluate on more samples (num_samples)")
        total = sum(len(ratios) - len(data["losses"].get(g.name, {})) for _, g in todo)
        done, t0 = 0, time.perf_counter()
        for n, (gi, g) in enumerate(todo, 1):
            pts = data["losses"].setdefault(g.name, {})
            with runner.for_group(g):
                for r in ratios:
                    if _key(r) in pts:
                        continue
                    if _stopped(pts, max_loss):
                        pts[_key(r)] = None
                    else:
                        _, drop = pruner.slices(pruner.select({g.name: r}))
                        with Mask(net, drop):
                            metric = runner.run(drop)
                        runner.after_point()
                        pts[_key(r)] = (baseline - metric) / baseline
                    done += 1
                    _save(path, data)
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (total - done) if done else 0.0
            logger.info("sensitivity [%d/%d] %s: %d/%d points done, %d left, ETA %.0fs",
                        n, len(todo), g.name, done, total, total - done, eta)
    finally:
        if training:
            net.train()
    res = SensitivityResult(baseline=baseline, ratios=tuple(ratios),
                            channels=dict(data["groups"]), criterion=data["criterion"])
    res.losses = {g: {float(r): l for r, l in pts.items()} for g, pts in data["losses"].items()
                  if g in channels}
    res.channels = {g: c for g, c in res.channels.items() if g in channels}
    return res


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
    return out


def _save(path: Optional[str], data: Dict[str, Any]) -> None:
    if path:
        write_json_atomic(path, data)


class _Runner:
    """Evaluates the network on `EvalData` batches, in worker threads, replaying from a cache.

    The baseline pass stores, per batch, the outputs of every call some group replays (prefix
    and region, see `_group_replay`) when they fit in `cache_mb`; otherwise each group replays
    only its prefix, which it captures during its first ratio. Paddle's kernels release the
    GIL, so batches run in parallel threads on a multi-core CPU.
    """

    def __init__(self, net: nn.Layer, evaluate: Union[Callable[[], float], EvalData],
                 cache: bool, groups: Sequence[Tuple[int, Any]] = (),
                 param_axes: Optional[Mapping[Tuple[str, int], Any]] = None,
                 cache_mb: float = 2048) -> None:
        self.net = net
        self.evaluate = evaluate
        self.cache = cache and isinstance(evaluate, EvalData)
        self.local = threading.local()
        self.layers = dict(net.named_sublayers())
        self.calls: List[_Call] = []
        self.plans: Dict[str, _GroupReplay] = {}
        self.store: Dict[Tuple[int, int], Any] = {}
        self.shared: set = set()  # calls stored by the baseline pass, kept for every group
        self.replay: Optional[_Replay] = None
        self.plan: Optional[_GroupReplay] = None
        self.pending: set = set()
        self._arm = False
        if not self.cache:
            return
        ev = evaluate
        self.calls = _CallRecorder(net).record(ev.batches[0][0])
        full = {g.name: _group_replay(self.calls, net, gi, g, param_axes or {}, region=True)
                for gi, g in groups}
        need = set().union(*(p.needed for p in full.values())) if full else set()
        scale = ev.size / len(ev.batches[0][1])
        mb = sum(self.calls[i].mb for i in need) * scale
        if mb <= cache_mb:
            self.plans, self.shared = full, need
        else:
            logger.info("replay cache would take %.0f MB (> %.0f MB): each group replays only "
                        "its prefix", mb, cache_mb)
            self.plans = {g.name: _group_replay(self.calls, net, gi, g, {}, region=False)
                          for gi, g in groups}

    def baseline(self) -> float:
        return self._score(capture=self.shared)

    def run(self, drop: Optional[Mapping[str, Mapping[int, Any]]] = None) -> float:
        """Score the (masked) network; `drop` names the zeroed channels, to mask replays."""
        return self._score(capture=self.pending, drop=drop or {})

    def _score(self, capture: set = frozenset(), drop: Mapping = {}) -> float:
        if not isinstance(self.evaluate, EvalData):
            return float(self.evaluate())
        ev = self.evaluate
        local = self.local
        hooks = self._capture_hooks(capture) if capture else []
        if self.replay is not None:
            keep = self._keep_vectors(drop)
            self.replay.install(lambda i: self._cached(i, keep))
        outs: List[Any] = [None] * len(ev.batches)

        def work(b: int) -> None:
            local.batch, local.counts, local.seen = b, {}, {}
            with paddle.no_grad():
                y = self.net(ev.batches[b][0])
            y = y[0] if isinstance(y, (tuple, list)) else y
            outs[b] = y.numpy()

        try:
            with paddle.no_grad():
                workers = min(ev.workers, len(ev.batches))
                if workers > 1:
                    with ThreadPoolExecutor(workers) as pool:
                        list(pool.map(work, range(len(ev.batches))))
                else:
                    for b in range(len(ev.batches)):
                        work(b)
        finally:
            if self.replay is not None:
                self.replay.uninstall()
            for h in hooks:
                h.remove()
        self.pending = set()
        return ev.score(outs)

    def _capture_hooks(self, capture: set) -> List[Any]:
        by_path: Dict[str, Dict[int, int]] = {}
        for i in capture:
            by_path.setdefault(self.calls[i].path, {})[self.calls[i].index] = i
        local = self.local

        def make(path: str, index: Dict[int, int]) -> Callable:
            def post(layer: nn.Layer, inputs: Any, output: Any) -> None:
                k = local.seen.get(path, 0)
                local.seen[path] = k + 1
                if k in index:
                    self.store[(local.batch, index[k])] = output
            return post

        return [self.layers[p].register_forward_post_hook(make(p, idx))
                for p, idx in by_path.items()]

    def _keep_vectors(self, drop: Mapping[str, Mapping[int, Any]]) -> Dict[int, paddle.Tensor]:
        """Per masked replay call, a 0/1 tensor shaped to broadcast along its channel axis."""
        keep: Dict[int, paddle.Tensor] = {}
        for i, spec in (self.plan.calls.items() if self.plan else ()):
            if spec is None:
                continue
            axis, (key, pax) = spec
            removed = drop.get(key, {}).get(pax)
            if not removed:
                continue
            ref = self.store[(0, i)]
            vec = np.ones(ref.shape[axis], dtype=np.float32)
            vec[np.asarray(removed, dtype=np.int64)] = 0.0
            shape = [1] * ref.ndim
            shape[axis] = -1
            keep[i] = paddle.to_tensor(vec.reshape(shape)).astype(ref.dtype)
        return keep

    def _cached(self, i: int, keep: Mapping[int, paddle.Tensor]) -> Any:
        out = self.store[(self.local.batch, i)]
        return out * keep[i] if i in keep else out

    def for_group(self, group: Any) -> "_Runner":
        self._group = group
        return self

    def __enter__(self) -> "_Runner":
        plan = self.plans.get(self._group.name)
        if not plan or not plan.calls:
            return self
        self.plan = plan
        if plan.needed <= self.shared:
            self.replay = _Replay(self.net, self.calls, plan.calls, self.local)
        else:  # the first ratio runs in full and captures the prefix for the others
            self.pending = plan.needed
            self._arm = True
        return self

    def after_point(self) -> None:
        """Once the first ratio has filled the cache, later ratios replay it."""
        if self.replay is None and self._arm and self.plan is not None:
            self.replay = _Replay(self.net, self.calls, self.plan.calls, self.local)
            self._arm = False

    def __exit__(self, *exc: object) -> None:
        self.replay = None
        self.plan = None
        self._arm = False
        self.pending = set()
        for key in [k for k in self.store if k[1] not in self.shared]:
            del self.store[key]  # keep the shared baseline cache, drop the group's own
