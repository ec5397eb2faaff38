"""Latency: timing with warm-up and alternation, the backends, and the search for a latency target."""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from typing import Any, Callable, List

import numpy as np
import paddle
import pytest

from prune_callbacks import FilterPruner, count_flops, recorded_plans
from prune_callbacks.deploy.latency import (LatencyMeter, LatencyOptions, LatencyStats, _next_guess,
                                     check_latency_target, measure_latency, plan_for_latency,
                                     pruned_copy, search_latency, time_runners)

SHAPE = [1, 3, 12, 12]
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("paddle2onnx", "onnxruntime"))


class FakeClock:
    """A clock that moves only when a fake runner says its call took some time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_runners_discards_warmup_and_alternates() -> None:
    clock, calls = FakeClock(), []

    def runner(name: str, seconds: List[float]) -> Callable[[], None]:
        it = iter(seconds)

        def run() -> None:
            calls.append(name)
            clock.advance(next(it))
        return run

    # warm-up calls are slow (10 s): none of them may reach the statistics
    a = runner("a", [10.0] * 2 + [1.0, 3.0, 2.0, 9.0, 2.0])
    b = runner("b", [10.0] * 2 + [0.5] * 5)
    sa, sb = time_runners([a, b], warmup=2, repeats=5, clock=clock)
    assert sa.runs == (1.0, 3.0, 2.0, 9.0, 2.0) and sa.median == 2.0
    assert sb.median == 0.5 and len(sb.runs) == 5
    assert sa.p10 <= sa.median <= sa.p90
    assert calls[4:] == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # order flips each round


def test_stats_from_runs() -> None:
    s = LatencyStats.from_runs([0.004, 0.001, 0.002, 0.003, 0.1])
    assert s.median == 0.003 and s.runs[-1] == 0.1 and s.p90 > s.median > s.p10


@pytest.mark.parametrize("backend, onednn", [
    ("paddle_inference", False), ("paddle_inference", True), ("eager", False),
    pytest.param("onnxruntime", False, marks=pytest.mark.skipif(
        not HAS_ORT, reason='paddle2onnx/onnxruntime not installed: pip install -e ".[onnx]"')),
])
def test_measure_latency_backends(tiny_net, backend, onednn) -> None:
    net = tiny_net()
    net.train()
    weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    stats = measure_latency(net, SHAPE, batch=4, backend=backend, onednn=onednn, warmup=1, repeats=5)
    assert len(stats.runs) == 5 and all(0 < r < 5 for r in stats.runs)
    assert stats.p10 <= stats.median <= stats.p90
    assert net.training  # exported in eval mode, modes given back
    assert all(np.array_equal(v.numpy(), weights[k]) for k, v in net.state_dict().items())


def test_cpu_clock_times_the_calling_thread(tiny_net) -> None:
    """With one engine thread the work runs in the caller: its CPU time is the latency, load aside."""
    net = tiny_net()
    cpu = measure_latency(net, SHAPE, batch=8, warmup=1, repeats=5, clock=time.thread_time)
    wall = measure_latency(net, SHAPE, batch=8, warmup=1, repeats=5)
    assert 0 < cpu.median < 1 and 0 < wall.median < 1
    assert cpu.median > 0.05 * wall.median  # not a clock that sat still while the engine ran


def test_measure_latency_errors_name_the_fix(tiny_net) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tvm'; choose one of"):
        measure_latency(tiny_net(), SHAPE, backend="tvm")
    with pytest.raises(ValueError, match="batch first, such as"):
        measure_latency(tiny_net(), [3, "12"], backend="eager")
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        measure_latency(tiny_net(), SHAPE, backend="eager", repeats=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\) such as 0.6"):
        check_latency_target(1.5)
    with pytest.raises(ValueError, match="tolerance must be"):
        LatencyOptions(tolerance=0.7)
    with pytest.raises(ValueError, match="max_flops must be"):
        LatencyOptions(max_flops=1.0)
    with pytest.raises(ValueError, match="clock='cpu' times only the calling thread"):
        LatencyOptions(clock="cpu", threads=2)
    with pytest.raises(ValueError, match="clock must be one of"):
        LatencyOptions(clock="sundial")


# -- the search ------------------------------------------------------------------------------------
def _flops_law(pruner: FilterPruner, fixed: float = 0.3) -> Callable[[Any], float]:
    """A fake device: latency = fixed overhead + a part proportional to FLOPs."""
    base = count_flops(pruner.net, SHAPE)
    return lambda net: fixed + (1 - fixed) * count_flops(net, SHAPE) / base


def _uniform(pruner: FilterPruner, round_to: int = 1) -> Callable[[float], Any]:
    return lambda f: pruner.plan(f, strategy="uniform", round_to=round_to)


@pytest.mark.parametrize("round_to", [1, 4])
def test_search_reaches_target_on_copies_and_respects_round_to(tiny_net, round_to) -> None:
    net = tiny_net()
    pruner = FilterPruner(net, SHAPE)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    law, seen = _flops_law(pruner), []

    def measure(candidate: Any) -> float:
        assert candidate is not net
        seen.append(candidate)
        return law(candidate)

    found = search_latency(pruner, 0.65, _uniform(pruner, round_to), measure, tolerance=0.01, max_trials=8)
    assert found.met and found.share <= 0.65 + 0.01
    assert 1 <= len(found.trials) <= 8 and len(seen) == sum(not t.reused for t in found.trials)
    # the live network is untouched; the returned plan is the planner's, rounded as asked
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == shapes and not recorded_plans(net)
    for gi, kept in found.kept.items():
        channels = pruner.groups[gi].channels
        assert len(kept) == channels or len(kept) % round_to == 0
    expected = _uniform(pruner, round_to)(found.flops)
    assert {gi: list(k) for gi, k in found.kept.items()} == {gi: list(k) for gi, k in expected.items()}
    plan = pruner.apply(found.kept)  # the caller applies it: same shapes as the measured copy
    assert abs(law(net) - found.share) < 1e-9 and plan.pruned_flops >= found.flops - 1e-9


def test_search_gives_up_within_max_trials_and_says_so(tiny_net, caplog) -> None:
    pruner = FilterPruner(tiny_net(), SHAPE)
    calls = []

    def stubborn(net: Any) -> float:  # no cut helps: per-call overhead dominates
        calls.append(net)
        return 0.99

    with caplog.at_level(logging.WARNING, logger="prune_callbacks.deploy.latency"):
        found = search_latency(pruner, 0.5, _uniform(pruner), stubborn, max_trials=5, max_flops=0.8)
    assert not found.met and len(found.trials) <= 5 and len(calls) <= 5
    assert "latency target 0.500 not met" in caplog.text
    assert max(t.flops for t in found.trials) <= 0.8 + 1e-12


def test_search_measures_a_plan_once(tiny_net) -> None:
    pruner = FilterPruner(tiny_net(), SHAPE)
    fixed = pruner.plan(0.3, strategy="uniform")
    calls = []
    found = search_latency(pruner, 0.5, lambda f: fixed, lambda n: calls.append(n) or 0.8, max_trials=6)
    assert len(calls) == 1 and all(t.reused for t in found.trials[1:]) and len(found.trials) <= 6


def test_search_below_a_cut_the_planner_cannot_reach(tiny_net) -> None:
    pruner = FilterPruner(tiny_net(), SHAPE)
    law = _flops_law(pruner, fixed=0.0)

    def capped(f: float) -> Any:
        if f > 0.45:
            raise ValueError("cannot be reached")
        return pruner.plan(f, strategy="uniform")

    found = search_latency(pruner, 0.3, capped, law, max_trials=6, max_flops=0.9)
    assert any(math.isnan(t.share) for t in found.trials) and found.flops <= 0.45
    assert not found.met  # 0.3 needs a 0.7 cut: the best plannable one is returned


def test_next_guess_stays_inside_the_bracket() -> None:
    assert _next_guess(0.4, 0.7, 0.9, None, 0.6) == pytest.approx(0.4 + 0.1 / 0.75)  # line from (0, 1)
    assert _next_guess(0.0, 1.0, 0.7, None, 0.3) == pytest.approx(0.7)  # max_flops may be tried
    assert _next_guess(0.4, 0.628, 0.9, None, 0.6) == pytest.approx(0.4 + 0.028 / 0.93)  # a small step
    assert _next_guess(0.0, 1.0, 0.7, None, 0.3, hi_tried=True) == pytest.approx(0.56)  # not twice
    g = _next_guess(0.4, 0.7, 0.5, 0.69, 0.6)  # a flat stretch: interpolation would leave the bracket
    assert 0.4 < g < 0.5 and g == pytest.approx(0.5 - 0.2 * 0.1)
    assert _next_guess(0.4, 0.6, 0.5, 0.7, 0.65) == pytest.approx(0.45)  # noise inverted it: bisect


def test_plan_for_latency_with_a_fake_clock(tiny_net) -> None:
    """The whole path, meter included, on a fake device whose time follows FLOPs plus overhead."""
    net = tiny_net()
    pruner = FilterPruner(net, SHAPE)
    clock, base = FakeClock(), count_flops(net, SHAPE)
    built = []

    def factory(candidate: Any, input_shape: List[int], **kwargs: Any) -> Callable[[], None]:
        built.append((input_shape, kwargs))
        seconds = 0.002 + 0.008 * count_flops(candidate, SHAPE) / base
        return lambda: clock.advance(seconds)

    options = LatencyOptions(batch=8, tolerance=0.02, max_trials=6, warmup=1, repeats=3)
    found = plan_for_latency(pruner, 0.5, _uniform(pruner, 2), options, clock, factory)
    # channel counts move in steps of 2 here: no plan lands within 0.02 of 0.5, so the smallest
    # cut under it is returned
    assert found.met and found.share <= 0.5 + 0.02 and len(found.trials) <= 6
    assert all(t.flops >= found.flops for t in found.trials if t.share <= 0.52)
    assert built[0] == (SHAPE, {"batch": 8, "backend": "paddle_inference", "threads": 1, "onednn": False})
    assert len(built) == 1 + sum(not t.reused for t in found.trials)  # the baseline is built once
    assert 0.55 < found.flops < 0.7  # 0.2 + 0.8 * (1 - f) = 0.5 -> f = 0.625


def test_meter_times_baseline_and_candidate_alternately(tiny_net) -> None:
    net = tiny_net()
    pruner = FilterPruner(net, SHAPE)
    clock = FakeClock()
    meter = LatencyMeter(net, SHAPE, LatencyOptions(warmup=0, repeats=4), clock,
                         lambda n, s, **kw: (lambda: clock.advance(0.01 if n is net else 0.004)))
    share = meter(pruned_copy(pruner, pruner.plan(0.5, strategy="uniform")))
    assert share == pytest.approx(0.4) and meter.last[0].median == pytest.approx(0.01)


@pytest.mark.parametrize("method", ["table", "search"])
def test_filter_prune_callback_prunes_toward_a_latency_target(method):
    """FilterPruneCallback(latency=...) in a real fit: the latency table or the search measures
    pruned copies (eager backend: cheap) and the network is pruned once, to its plan."""
    import paddle.nn as nn
    from paddle.static import InputSpec

    from prune_callbacks import FilterPruneCallback
    from prune_callbacks.deploy.latency import LatencyOptions

    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2D(64, 64, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(64, 4))
    model = paddle.Model(net, [InputSpec([None, 3, 16, 16], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.SGD(0.01, parameters=net.parameters()), nn.CrossEntropyLoss())
    rng = np.random.RandomState(0)
    from prune_callbacks.datasets.bundled import ArrayDataset
    data = ArrayDataset(rng.randn(16, 3, 16, 16).astype("float32"), np.arange(16) % 4)
    cb = FilterPruneCallback(latency=0.8, strategy="uniform", latency_options=LatencyOptions(
        backend="eager", batch=8, warmup=1, repeats=5, max_trials=4, method=method))
    model.fit(data, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.search is not None and 1 <= len(cb.search.trials) <= (2 if method == "table" else 4)
    assert (cb.table is not None) == (method == "table")
    assert 0 < cb.flops <= 0.9 and len(cb.plans) == 1
    assert min(net[0].weight.shape[0], net[2].weight.shape[0]) < 64  # the live network was pruned, once
    with pytest.raises(ValueError, match="give exactly one of flops"):
        FilterPruneCallback(flops=0.4, latency=0.6)
