"""Sensitivity analysis: the accuracy lost when each group loses its weakest channels.

Pure engine code: takes a pruner and an evaluation, returns plain data, never keeps a change
to the network (masks are always restored) and never touches paddle.Model or VisualDL.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from .plan import write_json_atomic

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
    """

    dataset: Any
    metric: Metric = top1_metric
    batch_size: int = 64
    num_samples: Optional[int] = None

    def __post_init__(self) -> None:
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
# Prefix caching: layers that finish before a group's first layer runs give the same outputs
# for every ratio of that group, so we replay them from a cache.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Call:
    path: str
    index: int  # n-th call of this layer within one forward
    start: int  # event counters
    end: int = -1
    parent: Optional[int] = None  # position of the enclosing call in the call list


class _CallRecorder:
    """Records the order of sublayer calls in one forward pass."""

    def __init__(self, net: nn.Layer) -> None:
        self.net = net
        self.calls: List[_Call] = []

    def record(self, x: paddle.Tensor) -> List[_Call]:
        stack: List[int] = []
        counts: Dict[str, int] = {}
        clock = [0]
        hooks = []

        def pre(path: str) -> Callable:
            def fn(layer: nn.Layer, inputs: Any) -> None:
                clock[0] += 1
                self.calls.append(_Call(path, counts.get(path, 0), clock[0],
                                        parent=stack[-1] if stack else None))
                counts[path] = counts.get(path, 0) + 1
                stack.append(len(self.calls) - 1)
            return fn

        def post(layer: nn.Layer, inputs: Any, output: Any) -> None:
            clock[0] += 1
            self.calls[stack.pop()].end = clock[0]

        for path, layer in self.net.named_sublayers():
            hooks.append(layer.register_forward_pre_hook(pre(path)))
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


class _Replay:
    """Temporarily replaces chosen layer calls by cached outputs during a forward pass."""

    def __init__(self, net: nn.Layer, calls: List[_Call], chosen: Sequence[int]) -> None:
        self.layers = dict(net.named_sublayers())
        self.calls = calls
        self.chosen = set(chosen)
        skipped = set()
        for i, c in enumerate(calls):  # calls nested in a chosen call will not happen
            p = c.parent
            while p is not None:
                if p in self.chosen:
                    skipped.add(i)
                    break
                p = calls[p].parent
        self.live: Dict[str, List[int]] = {}
        for i, c in enumerate(calls):
            if i not in skipped:
                self.live.setdefault(c.path, []).append(i)
        self.paths = sorted({calls[i].path for i in self.chosen})

    def install(self, cached: Callable[[str, int], Any]) -> None:
        for path in self.paths:
            layer = self.layers[path]
            original = type(layer).forward.__get__(layer)
            live = self.live[path]
            counter = [0]

            def forward(*args: Any, _p=path, _o=original, _live=live, _c=counter, **kw: Any) -> Any:
                k = _c[0]
                _c[0] += 1
                call = _live[k] if k < len(_live) else None
                if call is not None and call in self.chosen:
                    return cached(_p, self.calls[call].index)
                return _o(*args, **kw)

            layer.__dict__["forward"] = forward

    def uninstall(self) -> None:
        for path in self.paths:
            self.layers[path].__dict__.pop("forward", None)


def _capture(net: nn.Layer, calls: List[_Call], wanted: set) -> Tuple[List[Any], Dict]:
    """Post-hooks storing the outputs of the wanted calls (indices into `calls`) of one pass."""
    layers = dict(net.named_sublayers())
    keys = {(calls[i].path, calls[i].index) for i in wanted}
    box: Dict[Tuple[str, int], Any] = {}
    counts: Dict[str, int] = {}

    def make(path: str) -> Callable:
        def post(layer: nn.Layer, inputs: Any, output: Any) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            if (path, k) in keys:
                box[(path, k)] = output
        return post

    hooks = [layers[p].register_forward_post_hook(make(p)) for p in {k[0] for k in keys}]
    box["__counts__"] = counts  # type: ignore[index]
    return hooks, box


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

    net = pruner.net
    training = net.training
    net.eval()
    runner = _Runner(net, evaluate, cache, [g for _, g in groups])
    try:
        if data["baseline"] is None or runner.cache:
            metric = float(runner.baseline())  # also fills the prefix cache
            if data["baseline"] is None:
                data["baseline"] = metric
                _save(path, data)
        baseline = data["baseline"]
        if baseline == 0:
            raise ValueError("the baseline metric is 0: sensitivity (relative loss) is undefined")
        todo = [(gi, g) for gi, g in groups
                if len(data["losses"].get(g.name, {})) < len(ratios)
                and not _stopped(data["losses"].get(g.name, {}), max_loss)]
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
                        with pruner.mask({g.name: r}):
                            metric = runner.run()
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
    """Evaluates the network, replaying a group's unaffected prefix from a cache when it can.

    The baseline pass stores, per batch, the outputs of every layer call that some group can
    replay (up to `cache_mb`); a group whose calls were not stored captures them during its
    first ratio instead. Either way each ratio runs only the rest of the network.
    """

    def __init__(self, net: nn.Layer, evaluate: Union[Callable[[], float], EvalData],
                 cache: bool, groups: Sequence[Any] = (), cache_mb: float = 2048) -> None:
        self.net = net
        self.evaluate = evaluate
        self.cache = cache and isinstance(evaluate, EvalData)
        self.calls: List[_Call] = []
        self.prefix: Dict[str, List[int]] = {}
        self.store: Dict[Tuple[int, str, int], Any] = {}
        self.replay: Optional[_Replay] = None
        self.pending: set = set()
        self.cache_mb = cache_mb
        self._group_keys: List[Tuple[int, str, int]] = []
        self._arm: Optional[List[int]] = None
        if self.cache:
            self.calls = _CallRecorder(net).record(evaluate.batches[0][0])
            self.prefix = {g.name: _prefix_calls(self.calls, g.layers) for g in groups}

    def baseline(self) -> float:
        wanted = set().union(*self.prefix.values()) if self.prefix else set()
        return self._score(capture=wanted, budget=True)

    def run(self) -> float:
        return self._score(capture=self.pending)

    def _score(self, capture: set = frozenset(), budget: bool = False) -> float:
        if not isinstance(self.evaluate, EvalData):
            return float(self.evaluate())
        outs, used = [], 0.0
        with paddle.no_grad():
            for b, (x, _) in enumerate(self.evaluate.batches):
                hooks, box = _capture(self.net, self.calls, capture) if capture else ([], {})
                if self.replay is not None:
                    self.replay.install(lambda p, k, _b=b: self.store[(_b, p, k)])
                try:
                    y = self.net(x)
                finally:
                    if self.replay is not None:
                        self.replay.uninstall()
                    for h in hooks:
                        h.remove()
                for key, out in box.items():
                    if key != "__counts__":
                        self.store[(b,) + key] = out
                        if not budget:
                            self._group_keys.append((b,) + key)
                        used += out.numel().item() * 4 / 2**20 if budget else 0.0
                if budget and used * len(self.evaluate.batches) / (b + 1) > self.cache_mb:
                    logger.info("prefix cache would exceed %.0f MB; groups capture their own",
                                self.cache_mb)
                    self.store.clear()
                    capture, budget = set(), False
                y = y[0] if isinstance(y, (tuple, list)) else y
                outs.append(y.numpy())
        self.pending = set()
        return self.evaluate.score(outs)

    def for_group(self, group: Any) -> "_Runner":
        self._group = group
        return self

    def __enter__(self) -> "_Runner":
        chosen = self.prefix.get(self._group.name, [])
        if not chosen:
            return self
        batches = range(len(self.evaluate.batches))
        have = all((b, self.calls[i].path, self.calls[i].index) in self.store
                   for b in batches for i in chosen)
        if have:
            self.replay = _Replay(self.net, self.calls, chosen)
        else:  # the first ratio runs in full and fills the cache for the others
            self.pending = set(chosen)
            self._arm = chosen
        return self

    def after_point(self) -> None:
        """Once the first ratio has filled the cache, later ratios replay it."""
        if self.replay is None and self._arm:
            self.replay = _Replay(self.net, self.calls, self._arm)
            self._arm = None

    def __exit__(self, *exc: object) -> None:
        self.replay = None
        self._arm = None
        self.pending = set()
        for key in self._group_keys:  # keep the shared baseline cache, drop the group's own
            self.store.pop(key, None)
        self._group_keys = []
