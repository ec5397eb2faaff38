"""Measured latency of an exported network, and the search for the FLOPs cut that meets a latency target.

Latency is timed where models are served: the network exported in eval mode and run by Paddle
Inference or ONNX Runtime (or eagerly, for comparison). The search prunes deep copies only: it
never changes the live network, and returns the plan for the caller to apply.

Noise: each timed call is preceded by `warmup` untimed ones; baseline and candidate are timed
alternately, call by call (their order flipping every round), so a burst of load from other
processes falls on both; a share is the ratio of their medians; the search takes any share within
`tolerance` of the target as meeting it, since the noise cannot tell those apart. On a shared
machine, time with `clock="cpu"` (`time.thread_time`) and `threads=1`: the engines then compute in
the calling thread, so time the scheduler gives other processes drops out of the measurement.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ..utils.modes import eval_mode
from .onnx import export_onnx, require_onnx, save_inference
from ..layers.surgery import apply_slices, copy_for_pruning

logger = logging.getLogger(__name__)

__all__ = ["Backend", "CLOCKS", "LatencyStats", "LatencyOptions", "LatencyMeter", "LatencySearch", "Trial",
           "build_runner", "time_runners", "measure_latency", "pruned_copy", "search_latency",
           "plan_for_latency", "check_latency_target"]

Clock = Callable[[], float]
Runner = Callable[[], Any]
"""One inference call on a fixed input: what is timed."""
Kept = Dict[int, np.ndarray]


class SlicingPruner(Protocol):
    """What the latency search reads of a pruner (`FilterPruner` is one): the live network and
    the parameter slices (keep, drop) that a selection of kept channels gives."""

    net: nn.Layer

    def slices(self, kept: Kept) -> Tuple[Dict[str, Dict[int, Any]], Dict[str, Dict[int, Any]]]: ...
CLOCKS: Dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.thread_time}
"""Timers by name: wall time, or the calling thread's CPU time (only with one engine thread)."""
RunnerFactory = Callable[..., Runner]
_RESOLUTION = 0.005  # FLOPs shares closer than this give (nearly) the same plan: stop refining
_INNER = 0.2  # a guess keeps this share of the bracket's width from each measured end
_OPEN_INNER = 0.05  # ... and only this much from the lower end while the upper one is untried


class Backend(str, Enum):
    """Where the latency is measured."""

    PADDLE_INFERENCE = "paddle_inference"  # paddle.jit.save + paddle.inference predictor
    ONNXRUNTIME = "onnxruntime"  # paddle2onnx + onnxruntime InferenceSession (the 'onnx' extra)
    EAGER = "eager"  # the dygraph network itself, eval mode, no_grad


BACKENDS = tuple(b.value for b in Backend)
METHODS = ("table", "search")  # how a latency target is planned (LatencyOptions.method)


@dataclass(frozen=True)
class LatencyStats:
    """Timings of repeated inference calls, in seconds.

    Args:
        median: the median call.
        p10: 10th percentile (the fast end: closest to an idle machine).
        p90: 90th percentile (the slow end: where other load shows).
        runs: every timed call, in order.
    """

    median: float
    p10: float
    p90: float
    runs: Tuple[float, ...]

    @classmethod
    def from_runs(cls, runs: Sequence[float]) -> "LatencyStats":
        arr = np.asarray(runs, dtype=np.float64)
        p10, med, p90 = np.percentile(arr, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), tuple(float(r) for r in runs))


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _backend(backend: Any) -> Backend:
    try:
        return Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}") from None


def check_latency_target(latency: Any) -> float:
    """The latency target as a float: the share of the original latency to reach, in (0, 1).

    Raises:
        ValueError: not a number in (0, 1).
    """
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not 0.0 < float(latency) < 1.0:
        raise ValueError(f"latency must be the share of the original latency to reach, in (0, 1) such as "
                         f"0.6 (the pruned network runs in at most 60% of the time); got {latency!r}")
    return float(latency)


@dataclass(frozen=True)
class LatencyOptions:
    """How latency is measured and searched (the benchmark's way by default).

    Args:
        batch: batch size of the timed input.
        backend: "paddle_inference", "onnxruntime" or "eager" (see `Backend`).
        threads: CPU threads of the inference engine (Paddle Inference's math library, ONNX
            Runtime's intra-op pool); the eager backend keeps the process's own setting.
        onednn: Paddle Inference with oneDNN kernels.
        warmup: untimed calls before timing, per network.
        repeats: timed calls per network; the median is kept.
        tolerance: a measured share within this of the target meets it (noise).
        max_trials: pruned copies measured at most by the search.
        max_flops: the largest FLOPs cut the search tries.
        clock: "wall" (`time.perf_counter`) or "cpu" (`time.thread_time`, this thread's CPU time:
            robust to other processes' load, and right only with `threads=1`).
        method: how a latency target is planned: "table" (a per-group latency table measured
            once, then at most two verification exports: `deploy.latency_table`) or "search"
            (FLOPs cuts tried by exporting whole plans, up to `max_trials`).

    Raises:
        ValueError: a value out of range, naming it.
    """

    batch: int = 1
    backend: str = Backend.PADDLE_INFERENCE.value
    threads: int = 1
    onednn: bool = False
    warmup: int = 5
    repeats: int = 30
    tolerance: float = 0.02
    max_trials: int = 8
    max_flops: float = 0.9
    clock: str = "wall"
    method: str = "table"

    def __post_init__(self) -> None:
        _positive_int("batch", self.batch)
        _backend(self.backend)
        _positive_int("threads", self.threads)
        if not isinstance(self.onednn, bool):
            raise ValueError(f"onednn must be True or False, got {self.onednn!r}")
        _positive_int("warmup", self.warmup, 0)
        _positive_int("repeats", self.repeats)
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not 0.0 <= self.tolerance < 0.5:
            raise ValueError(f"tolerance must be a latency share in [0, 0.5) such as 0.02, "
                             f"got {self.tolerance!r}")
        _positive_int("max_trials", self.max_trials)
        if isinstance(self.max_flops, bool) or not isinstance(self.max_flops, (int, float)) \
                or not 0.0 < self.max_flops < 1.0:
            raise ValueError(f"max_flops must be a FLOPs share in (0, 1) such as 0.9, got {self.max_flops!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {self.clock!r}")
        if self.clock == "cpu" and (self.threads != 1 or self.backend == Backend.EAGER.value):
            raise ValueError("clock='cpu' times only the calling thread: use it with threads=1 and the "
                             "paddle_inference or onnxruntime backend, or use clock='wall'")

    def measure_kwargs(self) -> Dict[str, Any]:
        return {"batch": self.batch, "backend": self.backend, "threads": self.threads, "onednn": self.onednn}


# -- runners: one inference call each ------------------------------------------------------------
def _input(input_shape: Sequence[int], batch: int) -> np.ndarray:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or len(input_shape) < 2 \
            or not all(isinstance(d, (int, np.integer)) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be one input's shape, batch first, such as [1, 3, 32, 32]; "
                         f"got {input_shape!r}")
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *input_shape[1:])).astype("float32")


def _paddle_inference_runner(model: str, params: str, x: np.ndarray, threads: int, onednn: bool) -> Runner:
    config = paddle.inference.Config(model, params)
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(threads)
    if onednn:
        config.enable_onednn()
    else:
        config.disable_onednn()
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    outputs = [predictor.get_output_handle(n) for n in predictor.get_output_names()]

    def run() -> List[np.ndarray]:  # input copy and output fetch included: what a server pays
        handle.reshape(list(x.shape))
        handle.copy_from_cpu(x)
        predictor.run()
        return [o.copy_to_cpu() for o in outputs]
    return run


def _onnxruntime_runner(path: str, x: np.ndarray, threads: int) -> Runner:
    ort = require_onnx("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def _eager_runner(net: nn.Layer, x: np.ndarray) -> Runner:
    tensor = paddle.to_tensor(x)

    def run() -> Any:
        with eval_mode(net), paddle.no_grad():
            out = net(tensor)
        return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else out.numpy()
    return run


def build_runner(net: nn.Layer, input_shape: Sequence[int], *, batch: int = 1,
                 backend: str = "paddle_inference", threads: int = 1, onednn: bool = False) -> Runner:
    """One inference call of the exported `net` on a fixed random input, ready to be timed.

    The network is exported (eval mode, free batch size) into a temporary folder, loaded by the
    backend, and the folder removed; later changes to `net` do not reach the runner (except eager).

    Args:
        net: the network.
        input_shape: one input's shape, batch first (`[1, 3, 32, 32]`); the batch is `batch`.
        batch, backend, threads, onednn: see `LatencyOptions`.

    Returns:
        A callable running one inference call (input copy and output fetch included).

    Raises:
        ValueError: a bad shape, backend or count. ImportError: onnxruntime without the extra.
    """
    kind = _backend(backend)
    _positive_int("batch", batch)
    _positive_int("threads", threads)
    x = _input(input_shape, batch)
    if kind is Backend.EAGER:
        return _eager_runner(net, x)
    spec = [InputSpec([None, *x.shape[1:]], "float32", "x")]
    with tempfile.TemporaryDirectory(prefix="prune_latency_") as tmp:
        prefix = os.path.join(tmp, "model")
        if kind is Backend.ONNXRUNTIME:
            return _onnxruntime_runner(export_onnx(net, prefix, spec), x, threads)
        model, params = save_inference(net, prefix, spec)
        return _paddle_inference_runner(model, params, x, threads, onednn)


def time_runners(runners: Sequence[Runner], *, warmup: int = 5, repeats: int = 30,
                 clock: Clock = time.perf_counter) -> List[LatencyStats]:
    """Time several runners call by call, alternating, so load from elsewhere falls on all alike.

    Each runner first gets `warmup` untimed calls; then `repeats` rounds time one call of each,
    the order reversed every other round (a call can warm the caches for the next).

    Args:
        runners: the calls to time.
        warmup: untimed calls per runner.
        repeats: timed calls per runner.
        clock: the timer (seconds); injected by tests.

    Returns:
        The LatencyStats of each runner, in order.
    """
    _positive_int("warmup", warmup, 0)
    _positive_int("repeats", repeats)
    for run in runners:
        for _ in range(warmup):
            run()
    times: List[List[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(repeats):
        for i in (order if r % 2 == 0 else order[::-1]):
            start = clock()
            runners[i]()
            times[i].append(clock() - start)
    return [LatencyStats.from_runs(t) for t in times]


def measure_latency(net: nn.Layer, input_shape: Sequence[int], *, batch: int = 1,
                    backend: str = "paddle_inference", threads: int = 1, onednn: bool = False,
                    warmup: int = 5, repeats: int = 30, clock: Clock = time.perf_counter) -> LatencyStats:
    """Latency of the exported network: `warmup` untimed calls, then `repeats` timed ones.

    Args:
        net: the network (exported in eval mode; its modes are restored).
        input_shape: one input's shape, batch first, e.g. [1, 3, 32, 32]; the batch is `batch`.
        batch, backend, threads, onednn, warmup, repeats: see `LatencyOptions`.
        clock: the timer (seconds).

    Returns:
        LatencyStats (seconds): the median is the number to compare; p10/p90 show the noise.

    Raises:
        ValueError: a bad shape, backend or count. ImportError: onnxruntime without the extra.

    Examples:
        >>> stats = measure_latency(net, [1, 3, 32, 32], backend="onnxruntime", batch=64)
        >>> f"{1000 * stats.median:.2f} ms"
    """
    run = build_runner(net, input_shape, batch=batch, backend=backend, threads=threads, onednn=onednn)
    return time_runners([run], warmup=warmup, repeats=repeats, clock=clock)[0]


class LatencyMeter:
    """Latency share of a candidate network: its median over the baseline's, timed alternately.

    The baseline runner is built once; each candidate is exported, then timed call by call
    against it (`time_runners`), so both see the same machine load.

    Args:
        baseline: the original network (exported once, now).
        input_shape: one input's shape, batch first.
        options: batch, backend, threads, oneDNN, warm-up and repeats.
        clock: the timer (default: `options.clock`); runner_factory: `build_runner` (tests inject fakes).

    Examples:
        >>> meter = LatencyMeter(net, [1, 3, 32, 32])
        >>> meter(pruned_copy(pruner, kept))   # e.g. 0.62: the copy runs in 62% of the time
    """

    def __init__(self, baseline: nn.Layer, input_shape: Sequence[int],
                 options: LatencyOptions = LatencyOptions(), clock: Optional[Clock] = None,
                 runner_factory: RunnerFactory = build_runner) -> None:
        self.input_shape = list(input_shape)
        self.options = options
        self.clock = clock if clock is not None else CLOCKS[options.clock]
        self.factory = runner_factory
        self.baseline = runner_factory(baseline, self.input_shape, **options.measure_kwargs())
        self.last: Optional[Tuple[LatencyStats, LatencyStats]] = None  # (baseline, candidate)

    def __call__(self, candidate: nn.Layer) -> float:
        run = self.factory(candidate, self.input_shape, **self.options.measure_kwargs())
        base, cand = time_runners([self.baseline, run], warmup=self.options.warmup,
                                  repeats=self.options.repeats, clock=self.clock)
        self.last = (base, cand)
        return cand.median / base.median


# -- the search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One step of the search: the FLOPs cut asked of the planner and the measured latency share
    (NaN when the planner could not reach that cut); `reused` when an earlier trial had the same
    channel counts, so it was not measured again."""

    flops: float
    share: float
    reused: bool = False


@dataclass(frozen=True)
class LatencySearch:
    """The outcome of `search_latency`.

    Args:
        flops: the FLOPs cut asked of the planner for the returned plan (the plan may cut a little
            more, e.g. with a coarse `round_to`: see the applied plan's `pruned_flops`).
        kept: that plan (group index -> kept channels), for `FilterPruner.apply`.
        share: its measured latency share of the original.
        met: whether `share` is within tolerance of, or under, the target.
        trials: every trial, in order.
    """

    flops: float
    kept: Kept
    share: float
    met: bool
    trials: Tuple[Trial, ...]


def pruned_copy(pruner: SlicingPruner, kept: Kept) -> nn.Layer:
    """A deep copy of `pruner.net` pruned to `kept`; the network itself is not touched.

    Uses the pruner's traced slices (`pruner.slices(kept)`), so the copy has exactly the shapes
    `pruner.apply(kept)` would give the network, without tracing the copy again.
    """
    net = copy_for_pruning(pruner.net)
    keep, _ = pruner.slices(kept)
    apply_slices(net, keep)
    return net


def _counts(kept: Mapping[int, np.ndarray]) -> Tuple[Tuple[int, int], ...]:
    return tuple(sorted((int(gi), len(k)) for gi, k in kept.items()))  # latency depends on shapes only


def _next_guess(lo: float, lo_share: float, hi: float, hi_share: Optional[float], target: float,
                hi_tried: bool = False) -> float:
    """Where the share should cross the target, by linear interpolation, kept inside the bracket.

    Unmeasured upper end: extrapolate the line from the original (0, 1) through `lo`; `hi` itself
    may be tried unless `hi_tried` (it could not be planned). Otherwise the guess stays `_INNER`
    of the width away from each end, so the bracket shrinks every step even when latency does not
    follow FLOPs (bisection's guarantee, faster when it does).
    """
    width = hi - lo
    if hi_share is None:
        slope = (1.0 - lo_share) / lo if lo > 0 and lo_share < 1.0 else 1.0
        guess = lo + (lo_share - target) / slope
        return min(max(guess, lo + _OPEN_INNER * width), hi - _INNER * width if hi_tried else hi)
    if lo_share <= hi_share:  # noise inverted the bracket: bisect
        return lo + width / 2
    guess = lo + (lo_share - target) * width / (lo_share - hi_share)
    return min(max(guess, lo + _INNER * width), hi - _INNER * width)


def search_latency(pruner: SlicingPruner, target: float, plan_for_flops: Callable[[float], Kept],
                   measure: Callable[[nn.Layer], float], *, tolerance: float = 0.02,
                   max_trials: int = 8, max_flops: float = 0.9) -> LatencySearch:
    """The smallest FLOPs cut whose pruned copy runs in at most `target` of the original latency.

    Searches the FLOPs cut `f` given to `plan_for_flops` (so the allocation, strategy, skip and
    round_to are the planner's): the first trial is `f = 1 - target` (latency following FLOPs),
    then a bracket [more than target, target met] is narrowed by interpolation, safeguarded like
    bisection. Each trial prunes a deep copy (`pruned_copy`) and measures it; plans with the same
    channel counts are measured once. It stops at a share within `tolerance` of the target, after
    `max_trials` trials, or when the bracket is narrower than 0.005.

    Cost: at most `max_trials` x (copy + export + (warmup + repeats) x (baseline + candidate call)).

    Args:
        pruner: a FilterPruner over the live network (see `SlicingPruner`).
        target: latency share to reach, in (0, 1), e.g. 0.6.
        plan_for_flops: FLOPs cut -> kept channels, e.g.
            `lambda f: pruner.plan(f, sens, skip, strategy, round_to)`.
        measure: pruned copy -> its latency share of the original (e.g. a `LatencyMeter`).
        tolerance: shares within this of the target meet it.
        max_trials: trials at most.
        max_flops: the largest FLOPs cut tried.

    Returns:
        LatencySearch: the smallest measured cut that met the target (`met=True`); if none did, the
        trial with the lowest share (`met=False`, with a warning).

    Raises:
        ValueError: bad arguments; no trial could be planned.

    Examples:
        >>> found = search_latency(pruner, 0.6, lambda f: pruner.plan(f, strategy="uniform"),
        ...                        LatencyMeter(pruner.net, pruner.input_shape))
        >>> pruner.apply(found.kept)
    """
    target = check_latency_target(target)
    LatencyOptions(tolerance=tolerance, max_trials=max_trials, max_flops=max_flops)  # validates them
    lo, lo_share, hi, hi_share, hi_tried = 0.0, 1.0, float(max_flops), None, False
    f = min(max(1.0 - target, _RESOLUTION), hi)
    seen: Dict[Tuple[Tuple[int, int], ...], float] = {}
    trials: List[Trial] = []
    measured: List[Tuple[float, Kept, float]] = []
    for _ in range(max_trials):
        try:
            kept = plan_for_flops(f)
        except ValueError as e:  # beyond what the planner can reach: search below it
            logger.info("latency search: a %.3f FLOPs cut cannot be planned (%s)", f, e)
            trials.append(Trial(f, math.nan))
            hi, hi_share, hi_tried = f, None, True
        else:
            key = _counts(kept)
            reused = key in seen
            share = seen[key] if reused else float(measure(pruned_copy(pruner, kept)))
            seen[key] = share
            trials.append(Trial(f, share, reused))
            measured.append((f, kept, share))
            logger.info("latency search trial %d: FLOPs cut %.3f -> latency share %.3f (target %.3f)",
                        len(trials), f, share, target)
            if abs(share - target) <= tolerance:
                break
            if share > target:
                lo, lo_share = f, share
            else:
                hi, hi_share, hi_tried = f, share, True
        if hi - lo < _RESOLUTION:
            break
        f = _next_guess(lo, lo_share, hi, hi_share, target, hi_tried)
    return _outcome(measured, trials, target, tolerance)


def _outcome(measured: List[Tuple[float, Kept, float]], trials: List[Trial], target: float,
             tolerance: float) -> LatencySearch:
    if not measured:
        raise ValueError(f"no FLOPs cut tried by the latency search could be planned "
                         f"({[round(t.flops, 3) for t in trials]}); lower max_flops or skip fewer groups")
    met = [m for m in measured if m[2] <= target + tolerance]
    if met:
        f, kept, share = min(met, key=lambda m: m[0])
    else:
        f, kept, share = min(measured, key=lambda m: m[2])
        logger.warning("latency target %.3f not met after %d trials: the best, a %.3f FLOPs cut, runs in "
                       "%.3f of the original time; raise max_flops or max_trials, or lower the target",
                       target, len(trials), f, share)
    return LatencySearch(f, kept, share, bool(met), tuple(trials))


def plan_for_latency(pruner: Any, target: float, plan_for_flops: Callable[[float], Kept],
                     options: LatencyOptions = LatencyOptions(), clock: Optional[Clock] = None,
                     runner_factory: RunnerFactory = build_runner) -> LatencySearch:
    """`search_latency` measured by a `LatencyMeter` on `pruner.net` at `pruner.input_shape`.

    Args:
        pruner: a FilterPruner over the live network (not pruned here).
        target: latency share to reach, in (0, 1).
        plan_for_flops: FLOPs cut -> kept channels (the planner, with its strategy and round_to).
        options: measurement and search settings.
        clock: the timer (default: `options.clock`); runner_factory: injected by tests.

    Returns:
        LatencySearch; apply it with `pruner.apply(found.kept)`.

    Examples:
        >>> found = plan_for_latency(pruner, 0.6, lambda f: pruner.plan(f, strategy="uniform", round_to=8))
        >>> plan = pruner.apply(found.kept)
    """
    target = check_latency_target(target)
    start = time.perf_counter()
    meter = LatencyMeter(pruner.net, pruner.input_shape, options, clock, runner_factory)
    found = search_latency(pruner, target, plan_for_flops, meter, tolerance=options.tolerance,
                           max_trials=options.max_trials, max_flops=options.max_flops)
    logger.info("latency search: %d trials in %.1f s -> a %.3f FLOPs cut, latency share %.3f (target %.3f)",
                len(found.trials), time.perf_counter() - start, found.flops, found.share, target)
    return found
