"""The replay engine of the sensitivity analysis: evaluate a masked network, computing only
what the mask can change and replaying the rest from one baseline pass.

Every patch it makes (a layer's instance `forward`, forward hooks) lasts one evaluation and is
undone exactly, even on error; the network's parameters are never changed for good.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from ..layers.registry import output_channel_axis
from ..layers.surgery import Mask
from .compiled import CompiledEval, compilable
from .evaluation import EvalData, main_output, work_pieces

logger = logging.getLogger(__name__)

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

# Which axis of a layer's output carries its channels comes from the layer registry
# (`prune_callbacks.layers.registry`), the one place a layer type is described.


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
            axis = output_channel_axis(layers[c.path]) if c.leaf else None
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

    @contextlib.contextmanager
    def installed(self, cached: Callable[[int], Any]) -> Iterator[None]:
        """Route the chosen layers' calls to `cached` for the block, then undo it exactly.

        Paddle calls `self.forward`, so an instance attribute takes precedence over the class's
        method; a `forward` the user set on the instance is called for live calls and put back
        afterwards, and a layer that had none is left with none.
        """
        saved: Dict[str, Any] = {}
        try:
            for path in self.paths:
                layer = self.layers[path]
                own = layer.__dict__.get("forward", _MISSING)
                saved[path] = own
                original = own if own is not _MISSING else type(layer).forward.__get__(layer)
                layer.__dict__["forward"] = self._forward(path, original, cached)
            yield
        finally:
            for path, own in saved.items():
                if own is _MISSING:
                    self.layers[path].__dict__.pop("forward", None)
                else:
                    self.layers[path].__dict__["forward"] = own

    def _forward(self, path: str, original: Callable, cached: Callable[[int], Any]) -> Callable:
        live, local, chosen = self.live[path], self.local, self.chosen

        def forward(*args: Any, **kw: Any) -> Any:
            counts = local.counts
            k = counts.get(path, 0)
            counts[path] = k + 1
            call = live[k] if k < len(live) else None
            if call is not None and call in chosen:
                return cached(call)
            return original(*args, **kw)
        return forward


_MISSING = object()

ParamSlices = Mapping[str, Mapping[int, Any]]
EvaluateFn = Callable[[ParamSlices], float]


class Runner:
    """Evaluates the network on `EvalData` batches, in worker threads, replaying from a cache.

    The baseline pass stores, per piece of a batch (`work_pieces`), the outputs of every call some group replays (prefix
    and region, see `_group_replay`) when they fit in `cache_mb`; otherwise each group replays
    only its prefix, which it captures during its first ratio. Paddle's kernels release the
    GIL, so batches run in parallel threads on a multi-core CPU.

    Use: `runner.baseline()` once, then per group `with runner.group(g) as evaluate:` and
    `evaluate(drop)` per ratio; `evaluate` masks the dropped channels itself and the context
    owns every piece of per-group state, so no step can be forgotten or done out of order.
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
        self.pieces: Optional[List[Tuple[int, int, paddle.Tensor]]] = None  # see _pieces
        self.compiled: Optional[CompiledEval] = None
        self._compile = (list(groups), param_axes or {}) if self.cache and compilable(evaluate) \
            else None
        self._outputs: List[Any] = []
        if self.cache:
            self._plan_replays(groups, param_axes or {}, cache_mb)

    def _plan_replays(self, groups: Sequence[Tuple[int, Any]],
                      param_axes: Mapping[Tuple[str, int], Any], cache_mb: float) -> None:
        ev = self.evaluate
        net = self.net
        self.calls = _CallRecorder(net).record(ev.batches[0][0])
        full = {g.name: _group_replay(self.calls, net, gi, g, param_axes, region=True)
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
        """Score the unmasked network, filling the shared replay cache, and export the compiled
        path (`sensitivity.compiled`) when the evaluation allows it."""
        metric = self._score(capture=self.shared)
        if self._compile is not None and self._compile[0]:
            groups, param_axes = self._compile
            compiled = CompiledEval.build(self.net, self.evaluate, groups, param_axes)
            if compiled is not None and compiled.calibrate(self._outputs):
                self.compiled = compiled
        self._compile = None
        return metric

    @contextlib.contextmanager
    def group(self, group: Any) -> Iterator[EvaluateFn]:
        """Evaluate masked variants of one group: yields `evaluate(drop) -> metric`.

        `drop` maps parameter keys to the channel indices to zero per axis (the second value of
        `FilterPruner.slices`). The first call of a group that needs its own prefix runs in full
        and captures it; later calls replay it. The group's own cache is dropped on exit.
        """
        plan = self.plans.get(group.name)
        plan = plan if plan and plan.calls else None
        state: Dict[str, Any] = {"replay": None, "pending": set()}
        if plan is not None:
            if plan.needed <= self.shared:
                state["replay"] = _Replay(self.net, self.calls, plan.calls, self.local)
            else:  # the first ratio runs in full and captures the prefix for the others
                state["pending"] = plan.needed

        compiled = self.compiled if self.compiled and self.compiled.covers(group.name) else None
        verify = True  # the group's first compiled point is also checked eagerly

        def evaluate(drop: ParamSlices) -> float:
            nonlocal compiled, verify
            if compiled is not None:
                outs = compiled.outputs(drop, verify)
                verify = False
                if outs is not None:
                    return self.evaluate.score(outs)
                logger.info("group %s: compiled outputs disagree with eager masking; "
                            "evaluating it eagerly", group.name)
                compiled = None
            with Mask(self.net, drop):
                metric = self._score(state["pending"], drop, plan, state["replay"])
            if state["pending"]:  # captured now: later ratios replay it
                state["pending"] = set()
                state["replay"] = _Replay(self.net, self.calls, plan.calls, self.local)
            return metric

        try:
            yield evaluate
        finally:
            for key in [k for k in self.store if k[1] not in self.shared]:
                del self.store[key]  # keep the shared baseline cache, drop the group's own

    def _score(self, capture: set = frozenset(), drop: Optional[ParamSlices] = None,
               plan: Optional[_GroupReplay] = None, replay: Optional[_Replay] = None) -> float:
        if not isinstance(self.evaluate, EvalData):
            return float(self.evaluate())
        ev = self.evaluate
        outs: List[Any] = [None] * len(ev.batches)
        with contextlib.ExitStack() as stack:
            if capture:
                stack.callback(_remove_all, self._capture_hooks(capture))
            if replay is not None:
                keep = self._keep_vectors(plan, drop or {})
                stack.enter_context(replay.installed(lambda i: self._cached(i, keep)))
            self._run_batches(outs)
        self._outputs = outs
        return ev.score(outs)

    def _run_batches(self, outs: List[Any]) -> None:
        """Every batch's output into `outs`, computed in pieces (`work_pieces`) so the worker
        threads stay equally busy; each piece is one replay-cache slot."""
        ev = self.evaluate
        local = self.local
        pieces = self._pieces()
        parts: List[Any] = [None] * len(pieces)

        def work(k: int) -> None:
            local.batch, local.counts, local.seen = k, {}, {}
            with paddle.no_grad():
                y = self.net(pieces[k][2])
            y = y[0] if isinstance(y, (tuple, list)) else y
            parts[k] = main_output(y).numpy()

        with paddle.no_grad():
            workers = min(ev.workers, len(pieces))
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(work, range(len(pieces))))
            else:
                for k in range(len(pieces)):
                    work(k)
        for b in range(len(ev.batches)):
            mine = sorted((a, k) for k, (pb, a, _) in enumerate(pieces) if pb == b)
            outs[b] = parts[mine[0][1]] if len(mine) == 1 else np.concatenate(
                [parts[k] for _, k in mine])

    def _pieces(self) -> List[Tuple[int, int, paddle.Tensor]]:
        """(batch index, first row, input rows) per piece; cut once."""
        if self.pieces is None:
            ev = self.evaluate
            cuts = work_pieces([len(y) for _, y in ev.batches], ev.workers)
            x = [xb for xb, _ in ev.batches]
            self.pieces = [(b, a, x[b] if (a, z) == (0, len(x[b])) else x[b][a:z])
                           for b, a, z in cuts]
        return self.pieces

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

        hooks: List[Any] = []
        try:
            for p, idx in by_path.items():
                hooks.append(self.layers[p].register_forward_post_hook(make(p, idx)))
        except BaseException:
            _remove_all(hooks)
            raise
        return hooks

    def _keep_vectors(self, plan: Optional[_GroupReplay],
                      drop: ParamSlices) -> Dict[int, paddle.Tensor]:
        """Per masked replay call, a 0/1 tensor shaped to broadcast along its channel axis."""
        keep: Dict[int, paddle.Tensor] = {}
        for i, spec in (plan.calls.items() if plan else ()):
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


def _remove_all(hooks: Sequence[Any]) -> None:
    for h in hooks:
        h.remove()
