"""Latency cut against FLOPs cut of pruned networks, exported and run where they are deployed.

For each model and input size, a freshly built network (seed 0, 1000 classes at 224x224, 10 at
32x32) is pruned to each FLOPs cut with each `round_to`, strategy "uniform" (the same ratio in
every group, criterion l1: no data here for sensitivity curves). Baseline and pruned network are
each exported (paddle.jit.save in eval mode, free batch size; ONNX through paddle2onnx) and timed
by `prune_callbacks.deploy.latency.time_runners`: `--warmup` untimed calls each, then `--repeats` rounds
that time one call of each, alternating (so load from other processes falls on both), median
kept; `--clock cpu` times the calling thread's CPU time (right with `--threads 1`, where the
engines compute in that thread), so time the scheduler gives other processes drops out.
Backends: `pi` Paddle Inference without oneDNN, `pi-onednn` with it, `ort` ONNX Runtime. Each row
prints the FLOPs cut, the latency cut, latency cut / FLOPs cut, and that ratio from the 10th
percentiles. Goal: >= 0.95 (PaddleSlim 2.6's pruned MobileNetV1 got 0.83-0.90 on this machine kind).

    python benchmarks/bench_latency.py --quick --clock cpu       # about 4 minutes
    python benchmarks/bench_latency.py                           # everything: hours on 2 shared cores
    python benchmarks/bench_latency.py --models mobilenet_v1 --sizes 224 --batches 1 --backends ort
    python benchmarks/bench_latency.py --search 0.6 --models mobilenet_v1 --sizes 224 --round-to 16
    python benchmarks/bench_latency.py --models vit_tiny --sizes 32 --backends pi-onednn ort --flops 0.4 0.6

`--defaults` prunes MobileNetV1, MobileNetV2 and ResNet18 (10 classes) with every setting at its
default (FilterPruner(net, shape, runtime=R).prune_to_flops(f): strategy uniform without curves,
criterion l1, round_to "auto") at 30/50/70% FLOPs for each runtime R (`ort`: onnxruntime, `pi-onednn`:
paddle_inference), at batch 1 224x224 and batch 64 32x32, one thread, CPU time, baseline and the three
pruned copies timed alternately; prints latency cut / FLOPs cut per row (see docs/latency.md):

    python benchmarks/bench_latency.py --defaults                    # about 10 minutes
    python benchmarks/bench_latency.py --defaults --round-to 1       # the old default, for comparison

`--defaults --latency-aware` measures the latency table on each runtime and model first (about 50
exports), then times, per FLOPs cut, the baseline, the default plan and the latency-aware plan
(`plan(f, latency_table=table)`) alternately; prints both ratios and what the table predicted:

    python benchmarks/bench_latency.py --defaults --latency-aware --models mobilenet_v1 mobilenet_v2 --batches 1

`--search T` runs the latency search instead (`plan_for_latency`, target share T, each backend,
batch and round_to; tolerance 0.02, at most 8 trials) and prints its trials, time and outcome.

Measured on the 2-core CI machine (AMD EPYC, AVX-512), 1 thread, --clock cpu, FLOPs cut 0.40,
while 4 other agents ran tests and training (load average 4-5): ratio latency cut / FLOPs cut

                      round_to   1      8     16
    MobileNetV1 224 bs1  ort   -0.21   0.85   0.93    pi-onednn 0.71 0.76 0.84
    ResNet18    224 bs1  ort    0.56   0.92   0.99    pi-onednn 0.62 0.87 0.92
    MobileNetV2 224 bs1  ort   -1.21   0.70   0.89    pi-onednn 0.58 0.66 0.81
    MobileNetV1  32 bs64 ort   -7.05   0.86   1.00    pi-onednn 0.82 0.93 0.93
    ResNet18     32 bs64 ort   -2.18   1.01   1.06    pi-onednn 0.52 0.83 0.86

ONNX Runtime runs convolutions in its blocked NCHWc layout only when channel counts are multiples
of the SIMD width (16 floats with AVX-512): at round_to 1, 26 of MobileNetV1's 27 convs fall back
to plain kernels and the pruned model is slower than the original. At 32x32, batch 1, the fixed
cost per call (about 1.5 ms in Paddle Inference) hides the saving (ratios 0.4-0.75).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
import warnings
from typing import Dict, List, Tuple

import paddle
from paddle.vision import models

from prune_callbacks import FilterPruner
from prune_callbacks.app.vit import vit_tiny
from prune_callbacks.deploy.kernels import resolve_round_to
from prune_callbacks.deploy.latency import (CLOCKS, LatencyMeter, LatencyOptions, LatencyStats, Runner, build_runner,
                                     plan_for_latency, time_runners)
from prune_callbacks.deploy.latency_table import measure_latency_table, verify_latency_plan

BACKENDS: Dict[str, Tuple[str, bool]] = {  # name -> (latency backend, oneDNN)
    "pi": ("paddle_inference", False),
    "pi-onednn": ("paddle_inference", True),
    "ort": ("onnxruntime", False),
}
QUICK = {"models": ["mobilenet_v1", "resnet18"], "sizes": [32], "flops": [0.4], "round_to": [1, 8, 16],
         "backends": ["pi-onednn", "ort", "pi"], "batches": [1, 64], "repeats": 15, "warmup": 3}


def build_model(name: str, size: int, num_classes: int) -> paddle.nn.Layer:
    """A `paddle.vision.models` network by name, or `vit_tiny` (the app's ViT: patch 4, width
    64, 4 blocks of 4 heads) at `size`x`size`."""
    if name == "vit_tiny":
        return vit_tiny(num_classes=num_classes, image_size=size)
    return getattr(models, name)(num_classes=num_classes)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = "absent"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), load average {load}, paddle {paddle.__version__}, "
            f"onnxruntime {ort}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


def _pruned(net: paddle.nn.Layer, shape: List[int], flops: float, round_to: int) -> Tuple[paddle.nn.Layer, float]:
    copy_ = copy.deepcopy(net)
    plan = FilterPruner(copy_, shape).prune_to_flops(flops, strategy="uniform", round_to=round_to)
    return copy_, plan.pruned_flops


def _row(model: str, size: int, batch: int, backend: str, target: float, round_to: int, flops_cut: float,
         base: LatencyStats, cand: LatencyStats) -> str:
    lat_cut = 1.0 - cand.median / base.median
    fast_cut = 1.0 - cand.p10 / base.p10  # the fast end: least touched by other processes' load
    return (f"{model:<13}{size:>4}{batch:>4}  {backend:<10}{target:>5.2f}{round_to:>4}{100 * flops_cut:>9.1f}%"
            f"{1e3 * base.median:>10.2f}{1e3 * cand.median:>10.2f}{100 * lat_cut:>8.1f}%"
            f"{lat_cut / flops_cut:>7.2f}{fast_cut / flops_cut:>7.2f}")


def bench_model(name: str, size: int, args: argparse.Namespace) -> List[float]:
    """Print one row per (batch, backend, FLOPs cut, round_to); return the ratios."""
    paddle.seed(0)
    net = build_model(name, size, 1000 if size >= 224 else 10)
    net.eval()
    shape = [1, 3, size, size]
    pruned = {(f, r): _pruned(net, shape, f, r) for f in args.flops for r in args.round_to}
    ratios = []
    for batch in args.batches:
        for key in args.backends:
            backend, onednn = BACKENDS[key]
            kw = dict(batch=batch, backend=backend, threads=args.threads, onednn=onednn)
            base: Runner = build_runner(net, shape, **kw)
            for (f, r), (cand, cut) in pruned.items():
                b, c = time_runners([base, build_runner(cand, shape, **kw)], warmup=args.warmup,
                                    repeats=args.repeats, clock=CLOCKS[args.clock])
                print(_row(name, size, batch, key, f, r, cut, b, c), flush=True)
                ratios.append((1.0 - c.median / b.median) / cut)
    return ratios


DEFAULT_RUNTIMES = {"ort": "onnxruntime", "pi-onednn": "paddle_inference"}
DEFAULT_GRID = ((1, 224), (64, 32))  # (batch, input size)


def defaults_model(name: str, args: argparse.Namespace) -> List[float]:
    """The default settings' pruned copies at each FLOPs cut, timed against the original, per runtime."""
    ratios = []
    for batch, size in DEFAULT_GRID:
        if args.batches != [1, 64] and batch not in args.batches:
            continue
        paddle.seed(0)
        net = build_model(name, size, 10)
        net.eval()
        shape = [1, 3, size, size]
        for key in args.backends:
            runtime = DEFAULT_RUNTIMES[key]
            backend, onednn = BACKENDS[key]
            kw = dict(batch=batch, backend=backend, threads=args.threads, onednn=onednn)
            pruned = []
            for f in args.flops:
                copy_ = copy.deepcopy(net)
                pruner = FilterPruner(copy_, shape, runtime=runtime)
                plan = pruner.prune_to_flops(f) if args.round_to is None else \
                    pruner.prune_to_flops(f, round_to=args.round_to[0])
                pruned.append((f, plan.pruned_flops, build_runner(copy_, shape, **kw)))
            stats = time_runners([build_runner(net, shape, **kw)] + [r for _, _, r in pruned],
                                 warmup=args.warmup, repeats=args.repeats, clock=CLOCKS[args.clock])
            rnd = args.round_to[0] if args.round_to is not None else 0
            for (f, cut, _), cand in zip(pruned, stats[1:]):
                print(_row(name, size, batch, key, f, rnd, cut, stats[0], cand), flush=True)
                ratios.append((1.0 - cand.median / stats[0].median) / cut)
    return ratios


def latency_aware_model(name: str, args: argparse.Namespace) -> List[Tuple[float, float]]:
    """The default FLOPs plan against the latency-aware one (`latency_table=`, the table measured on
    the runtime first), at each FLOPs cut: baseline, plain and latency-aware copies timed
    alternately. Returns (plain ratio, latency-aware ratio) per row."""
    rows = []
    for batch, size in DEFAULT_GRID:
        if args.batches != [1, 64] and batch not in args.batches:
            continue
        paddle.seed(0)
        net = build_model(name, size, 10)
        net.eval()
        shape = [1, 3, size, size]
        for key in args.backends:
            runtime = DEFAULT_RUNTIMES[key]
            backend, onednn = BACKENDS[key]
            kw = dict(batch=batch, backend=backend, threads=args.threads, onednn=onednn)
            options = LatencyOptions(warmup=args.warmup, repeats=args.repeats, clock=args.clock, **kw)
            start = time.perf_counter()
            table = measure_latency_table(FilterPruner(net, shape, runtime=runtime), options,
                                          round_to=resolve_round_to("auto", runtime))
            print(f"# {name} {size}px bs{batch} {key}: table of {table.exports} exports in "
                  f"{time.perf_counter() - start:.0f} s; {_machine()}", flush=True)
            base = build_runner(net, shape, **kw)
            for f in args.flops:
                copies = []
                for lt in (None, table):
                    copy_ = copy.deepcopy(net)
                    pruner = FilterPruner(copy_, shape, runtime=runtime)
                    kept = pruner.plan(f, latency_table=lt)
                    predicted = pruner.latency_share(table, kept, interpolate=True)
                    plan = pruner.apply(kept)
                    copies.append((plan.pruned_flops, predicted, build_runner(copy_, shape, **kw)))
                b, plain, aware = time_runners([base, copies[0][2], copies[1][2]], warmup=args.warmup,
                                               repeats=args.repeats, clock=CLOCKS[args.clock])
                (pc, pp, _), (ac, ap, _) = copies
                pl, al = 1.0 - plain.median / b.median, 1.0 - aware.median / b.median
                print(f"{name:<13}{size:>4}{batch:>4}  {key:<10}{f:>5.2f}  plain {100 * pc:5.1f}% "
                      f"{1e3 * plain.median:8.2f} ms ratio {pl / pc:5.2f} (pred {1 - pp:.3f}/{pl:.3f})  "
                      f"aware {100 * ac:5.1f}% {1e3 * aware.median:8.2f} ms ratio {al / ac:5.2f} "
                      f"(pred {1 - ap:.3f}/{al:.3f})  base {1e3 * b.median:.2f} ms", flush=True)
                rows.append((pl / pc, al / ac))
    return rows


def search_model(name: str, size: int, args: argparse.Namespace) -> None:
    """Run the latency search for each (batch, backend, round_to) and print what it cost."""
    paddle.seed(0)
    net = build_model(name, size, 1000 if size >= 224 else 10)
    shape = [1, 3, size, size]
    for batch in args.batches:
        for key in args.backends:
            backend, onednn = BACKENDS[key]
            options = LatencyOptions(batch=batch, backend=backend, threads=args.threads, onednn=onednn,
                                     warmup=args.warmup, repeats=args.repeats, clock=args.clock)
            if args.method == "table":
                _table_search(net, shape, key, options, args)
                continue
            for r in args.round_to:
                pruner = FilterPruner(net, shape)
                start = time.perf_counter()
                found = plan_for_latency(pruner, args.search,
                                         lambda f: pruner.plan(f, strategy="uniform", round_to=r), options)
                took = time.perf_counter() - start
                trials = ", ".join(f"{t.flops:.3f}->{t.share:.3f}" for t in found.trials)
                print(f"{name} {size}px bs{batch} {key} round_to {r}: target {args.search:.2f}, "
                      f"FLOPs cut {found.flops:.3f}, share {found.share:.3f} ({'met' if found.met else 'NOT met'}), "
                      f"{len(found.trials)} trials in {took:.1f} s [{trials}]", flush=True)


def _table_search(net: paddle.nn.Layer, shape: List[int], key: str, options: LatencyOptions,
                  args: argparse.Namespace) -> None:
    """A latency target the table's way: measure the per-group table, then at most two verifications."""
    pruner = FilterPruner(net, shape, runtime=DEFAULT_RUNTIMES.get(key, "paddle_inference"))
    start = time.perf_counter()
    table = measure_latency_table(pruner, options, round_to=resolve_round_to("auto", pruner.runtime))
    took_table = time.perf_counter() - start

    def plan_at(share: float):
        kept = pruner.plan_latency(share, table, strategy="uniform")
        return kept, pruner.latency_share(table, kept)

    found = verify_latency_plan(pruner, args.search, plan_at, LatencyMeter(net, shape, options),
                                tolerance=options.tolerance)
    took = time.perf_counter() - start
    trials = ", ".join(f"FLOPs cut {t.flops:.3f}->share {t.share:.3f}" for t in found.trials)
    print(f"{type(net).__name__} {shape[-1]}px bs{options.batch} {key} table: target {args.search:.2f}, "
          f"share {found.share:.3f} ({'met' if found.met else 'NOT met'}), FLOPs cut {found.flops:.3f}; "
          f"table {table.exports} exports in {took_table:.0f} s, {len(found.trials)} verification(s) "
          f"[{trials}], {took:.0f} s in all", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"a smaller grid: {QUICK}")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v1", "mobilenet_v2", "resnet18"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 32])
    ap.add_argument("--flops", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--round-to", dest="round_to", nargs="+", type=int, default=None,
                    help="default [1, 8, 16]; with --defaults: none (round_to 'auto', printed as 0)")
    ap.add_argument("--defaults", action="store_true",
                    help="MobileNetV1/V2, ResNet18 pruned with default settings at 30/50/70%% FLOPs, "
                         "ort and pi-onednn, bs1 224px and bs64 32px, CPU clock, 1 thread")
    ap.add_argument("--latency-aware", dest="latency_aware", action="store_true",
                    help="with --defaults: measure the latency table on each runtime, then compare the "
                         "FLOPs plan with the latency-aware one (plan(f, latency_table=...)) per FLOPs cut")
    ap.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time (with --threads 1 the engines "
                         "compute in the calling thread, so time other processes take drops out)")
    ap.add_argument("--search", type=float, default=None, metavar="SHARE",
                    help="run the latency search to this share of the original latency instead")
    ap.add_argument("--method", choices=["search", "table"], default="search",
                    help="with --search: the FLOPs-cut search, or the latency table + 2 verifications")
    args = ap.parse_args()
    if args.defaults:
        given = {a.dest for a in ap._actions if a.default != getattr(args, a.dest, a.default)}
        for k, v in {"flops": [0.3, 0.5, 0.7], "backends": ["ort", "pi-onednn"], "clock": "cpu",
                     "repeats": 15, "warmup": 3}.items():
            if k not in given:
                setattr(args, k, v)
    elif args.round_to is None:
        args.round_to = [1, 8, 16]
    if args.quick:
        given = {a.dest for a in ap._actions if a.default != getattr(args, a.dest, a.default)}
        for k, v in QUICK.items():
            if k not in given:  # explicit flags still win over --quick
                setattr(args, k, v)
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)
    logging.getLogger("paddle2onnx").setLevel(logging.WARNING)

    start = time.perf_counter()
    print(_machine())
    if args.search is not None:
        for name in args.models:
            for size in args.sizes:
                search_model(name, size, args)
        print(f"{time.perf_counter() - start:.0f} s; {_machine()}")
        return
    print(f"{args.clock} clock, warm-up {args.warmup}, median of {args.repeats} alternating calls, "
          f"{args.threads} thread(s), "
          f"strategy uniform, criterion l1{', round_to auto (rnd 0)' if args.defaults and args.round_to is None else ''}")
    print(f"{'model':<13}{'px':>4}{'bs':>4}  {'backend':<10}{'tgt':>5}{'rnd':>4}{'FLOPs cut':>10}"
          f"{'base ms':>10}{'pruned ms':>10}{'lat cut':>9}{'ratio':>7}{'(p10)':>7}")
    if args.defaults and args.latency_aware:
        rows = [r for name in args.models for r in latency_aware_model(name, args)]
        print(f"median ratio: plain {statistics.median(r[0] for r in rows):.2f}, latency-aware "
              f"{statistics.median(r[1] for r in rows):.2f}; aware better in "
              f"{sum(r[1] > r[0] for r in rows)} of {len(rows)} rows; {time.perf_counter() - start:.0f} s; "
              f"{_machine()}")
        return
    ratios = []
    for name in args.models:
        if args.defaults:
            ratios += defaults_model(name, args)
            continue
        for size in args.sizes:
            ratios += bench_model(name, size, args)
    print(f"median ratio {statistics.median(ratios):.2f} over {len(ratios)} rows; "
          f"{time.perf_counter() - start:.0f} s; {_machine()}")


if __name__ == "__main__":
    main()
