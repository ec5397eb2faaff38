"""Engine speed: tracing a network into channel groups, and pruning 30% of every prunable group.

For each model (224x224, 1000 classes), on a freshly built network per run, the median of
`--runs` runs of:
  trace: `FilterPruner(net, [1, 3, 224, 224])` (PIR program + channel groups);
  prune: `pruner.prune({every prunable group: 0.3})` (selection, slicing, layer sync, and the
         analytic FLOPs and parameter counts that go into the returned plan).
The first trace in a process also pays paddle's one-off source conversion; it is shown apart.
Then MobileNetV1's multiply-accumulates at 224x224 against the published 569M.

    python benchmarks/bench_engine.py
    python benchmarks/bench_engine.py --models resnet50 --runs 5

Measured on the 2-core CI machine, OMP_NUM_THREADS=1 (two runs, the spread is machine noise):
trace mobilenet_v1 0.10-0.15 s, resnet50 0.27-0.45 s, densenet121 0.87-1.19 s (before the
tracer was vectorised and stopped recording op call stacks and running an eager shape check:
0.4, 1.3 and 3.1-3.4 s); prune 30% 0.08 s, 0.44 s, 1.00 s (0.28, 1.0-1.3 and 1.8-2.3 s while the
plan's FLOPs came from two eager count_flops passes); MobileNetV1 568.7M MACs (-0.05% from 569M).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings

import paddle
from paddle.vision import models

from prune_callbacks import FilterPruner, count_flops

SHAPE = [1, 3, 224, 224]
PUBLISHED_MOBILENET_V1_MACS = 569e6  # Howard et al. 2017, table 8


def bench(name: str, runs: int) -> dict:
    build = getattr(models, name)
    traces, prunes = [], []
    cold = None
    groups = 0
    for i in range(runs + 1):
        paddle.seed(i)
        net = build(num_classes=1000)
        t0 = time.perf_counter()
        pruner = FilterPruner(net, SHAPE)
        t1 = time.perf_counter()
        ratios = {g.name: 0.3 for g in pruner.prunable_groups}
        t2 = time.perf_counter()
        plan = pruner.prune(ratios)
        t3 = time.perf_counter()
        if i == 0:
            cold = t1 - t0  # paddle converts each forward's source once per process
        else:
            traces.append(t1 - t0)
            prunes.append(t3 - t2)
        groups = len(ratios)
    return {"model": name, "groups": groups, "total": len(pruner.groups), "cold": cold,
            "trace": statistics.median(traces), "prune": statistics.median(prunes),
            "flops": (plan.flops_before, plan.flops_after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v1", "resnet50", "densenet121"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)

    print(f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"paddle {paddle.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"input {SHAPE}, median of {args.runs} runs")
    print(f"{'model':<14}{'groups':>10}{'1st trace':>11}{'trace':>9}{'prune 30%':>11}"
          f"{'MACs before -> after':>28}")
    for name in args.models:
        r = bench(name, args.runs)
        before, after = r["flops"]
        print(f"{r['model']:<14}{r['groups']:>5}/{r['total']:<4}{r['cold']:>10.2f}s"
              f"{r['trace']:>8.2f}s{r['prune']:>10.2f}s"
              f"{before / 1e6:>14.1f}M -> {after / 1e6:.1f}M")

    net = models.mobilenet_v1(num_classes=1000)
    macs = count_flops(net, SHAPE)
    analytic = FilterPruner(net, SHAPE).flops()
    err = (macs - PUBLISHED_MOBILENET_V1_MACS) / PUBLISHED_MOBILENET_V1_MACS
    print(f"mobilenet_v1 224x224: count_flops {macs / 1e6:.1f}M MACs, analytic "
          f"{analytic / 1e6:.1f}M, published 569M ({100 * err:+.2f}%)")


if __name__ == "__main__":
    main()
