"""The measured latency of the exported network before and after pruning, for the results table.

One short timing on the backend the run deploys to (`prune.runtime`, or `prune.latency_options.backend`
when set); `trainer.measure_latency` turns it off. The unpruned architecture is built afresh: latency depends on the shapes, not on the
weights. Never changes the trained network.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Optional

import paddle.nn as nn
from omegaconf import DictConfig

from ..deploy.kernels import check_runtime, latency_kwargs
from ..deploy.latency import CLOCKS, LatencyOptions, build_runner, time_runners
from ..utils.errors import about
from .model import build_network, input_shape

log = logging.getLogger(__name__)

WARMUP = 3
MIN_REPEATS, MAX_REPEATS = 15, 400
BUDGET_S = 1.5
"""Timed calls per network, alternating, as many as fit in about BUDGET_S of timing (within the
bounds): a short timing, not a benchmark (see benchmarks/). A small network at batch 1 runs in
about a millisecond, and 15 calls of it measure mostly noise."""


def run_latency_options(cfg: DictConfig) -> LatencyOptions:
    """The run's `LatencyOptions`: `prune.latency_options`, measured on `prune.runtime` unless
    they name a backend themselves (for `latency=` targets and the results' latency line alike)."""
    options = dict(cfg.prune.latency_options)
    runtime = cfg.prune.get("runtime")
    if "backend" not in options:
        with about("runtime"):
            options = {**latency_kwargs(runtime or "paddle_inference"), **options}
    return LatencyOptions(**options)


def exported_latency(cfg: DictConfig, pruned: nn.Layer) -> Optional[Dict[str, Any]]:
    """Median latency (ms) of the exported unpruned and pruned networks, timed call by call
    alternately; None when switched off or when the backend cannot run here (logged)."""
    if not cfg.trainer.get("measure_latency", True):
        return None
    runtime = cfg.prune.get("runtime")
    if runtime and check_runtime(runtime).gpu:
        log.warning("latency of the exported model not measured: runtime %s is not measured on this "
                    "machine (CPU runtimes only); trainer.measure_latency=false skips this line", runtime)
        return None
    opts = run_latency_options(cfg)
    if "clock" not in cfg.prune.latency_options and opts.threads == 1 and opts.backend != "eager":
        # this thread's CPU time: other processes' load does not count (the engine computes here)
        opts = dataclasses.replace(opts, clock="cpu")
    shape = input_shape(cfg)
    try:
        original = build_network(cfg)
        runners = [build_runner(net, shape, **opts.measure_kwargs()) for net in (original, pruned)]
        clock = CLOCKS[opts.clock]
        probe = time_runners(runners, warmup=WARMUP, repeats=3, clock=time.perf_counter)
        per_round = sum(s.median for s in probe)
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, BUDGET_S / max(per_round, 1e-9))))
        before, after = time_runners(runners, warmup=0, repeats=repeats, clock=clock)
    except (ImportError, RuntimeError, ValueError, OSError) as exc:
        log.warning("latency of the exported model not measured (%s: %s); trainer.measure_latency=false "
                    "skips it", type(exc).__name__, exc)
        return None
    log.info("latency of the exported model (%s, batch %d, %d thread(s)): %.3f ms -> %.3f ms", opts.backend,
             opts.batch, opts.threads, 1000 * before.median, 1000 * after.median)
    return {"backend": opts.backend, "batch": opts.batch, "threads": opts.threads, "clock": opts.clock,
            "repeats": repeats, "before_ms": 1000 * before.median, "after_ms": 1000 * after.median}
