"""Sensitivity analysis cost in eval-equivalents, per model and form, with its exactness checked.

One process, one run. For each model: the time of one plain `paddle.Model.evaluate` of the
evaluation samples (the unit), then the analysis in both forms, each divided by that unit:
- opaque: `pruner.sensitivity(eval_fn)` where `eval_fn` runs `model.evaluate` (masks applied
  and restored around every call; the ideal is points + 1 evaluations);
- dataset: `pruner.sensitivity(EvalData(...))` (replay of what a group cannot change, worker
  threads).
The dataset form's losses are compared with the opaque form's (plain masked evaluation) in top-1
counts: the largest difference must be 0. Optionally the naive prune-a-copy-and-evaluate loop
(what PaddleSlim does) runs on the first model.

The networks are untrained (training them on digits first cost more than the whole run); the
labels are the network's own predictions with 20% replaced at random, so the losses are
informative (a network that is 80% right loses accuracy when pruned).

    python benchmarks/bench_sensitivity.py            # 3 models, 400 images, 9 ratios, batch 128
    python benchmarks/bench_sensitivity.py --quick    # 3 models, 128 images, 3 ratios
    python benchmarks/bench_sensitivity.py --naive    # also the naive loop on the first model

Measured (2-core x86_64 VM, paddle 3.3.1 CPU, OMP_NUM_THREADS=1, one other job sharing the machine
at times, load average 0.3-1.1), `--quick` (128 images, 3 ratios), eval-equivalents:

    model          points  opaque (x own evals)  dataset before  dataset after (row pieces)
    mobilenet_v1       42     41.9 (1.008)            28.4            16.7
    resnet18           36     38.1 (1.017)            22.0            13.8
    mobilenet_v2       75     80.8 (1.009)            44.7            29.2

Top-1 count difference from masked evaluation: 0 at every point, before and after.
Defaults (400 images, 9 ratios), mobilenet_v1 only, after: opaque 127.2 eq (1.002 x (points+1)),
dataset 37.8 eq, top-1 count difference 0 (issue 16 measured 43.4 before, on an idle machine).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import time
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import paddle
from paddle.vision import models

from prune_callbacks import EvalData, FilterPruner
from prune_callbacks.sensitivity import DEFAULT_RATIOS

MODELS = ("mobilenet_v1", "resnet18", "mobilenet_v2")


class Images(paddle.io.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_data(net: paddle.nn.Layer, samples: int, size: int, seed: int = 0) -> Images:
    rng = np.random.RandomState(seed)
    x = rng.randn(samples, 3, size, size).astype("float32")
    with paddle.no_grad():  # labels the network mostly gets right, so losses are informative
        y = net(paddle.to_tensor(x)).numpy().argmax(1)
    flip = rng.rand(samples) < 0.2
    y[flip] = rng.randint(0, 10, flip.sum())
    return Images(x, y.reshape(-1, 1).astype("int64"))


def model_eval_fn(net: paddle.nn.Layer, ds: Images, batch_size: int) -> Callable[[], float]:
    """One plain `paddle.Model.evaluate` of `ds`: top-1 accuracy."""
    model = paddle.Model(net)
    model.prepare(metrics=paddle.metric.Accuracy())

    def run() -> float:
        return float(model.evaluate(ds, batch_size=batch_size, verbose=0)["acc"])
    return run


def timed(fn: Callable[[], object]) -> Tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def naive(net: paddle.nn.Layer, shape: Sequence[int], eval_fn: Callable[[paddle.nn.Layer], float],
          ratios: Sequence[float]) -> Dict[str, Dict[float, float]]:
    base = eval_fn(net)
    losses: Dict[str, Dict[float, float]] = {}
    for g in FilterPruner(net, shape).prunable_groups:
        for r in ratios:
            twin = copy.deepcopy(net)
            FilterPruner(twin, shape).prune({g.name: r})
            twin.eval()
            losses.setdefault(g.name, {})[r] = (base - eval_fn(twin)) / base
    return losses


def count_diff(a: Dict[str, Dict[float, float]], b: Dict[str, Dict[float, float]],
               baseline: float, n: int) -> Tuple[int, float]:
    """Largest difference in top-1 counts, and in losses, between two sets of curves."""
    counts, losses = 0, 0.0
    for g in b:
        for r in b[g]:
            ca = round((1 - a[g][r]) * baseline * n)
            cb = round((1 - b[g][r]) * baseline * n)
            counts = max(counts, abs(ca - cb))
            losses = max(losses, abs(a[g][r] - b[g][r]))
    return counts, losses


def bench_model(name: str, args: argparse.Namespace, ratios: Sequence[float],
                run_naive: bool) -> List[str]:
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10)
    net.eval()
    ds = make_data(net, args.samples, args.size)
    shape = [1, 3, args.size, args.size]
    pruner = FilterPruner(net, shape)
    points = len(pruner.prunable_groups) * len(ratios)
    plain = model_eval_fn(net, ds, args.batch_size)
    plain()  # warm-up: first-call allocations are not part of the unit
    calls: List[float] = []

    def recorded() -> float:  # every call is one plain evaluation: they give the unit
        value, t = timed(plain)
        calls.append(t)
        return value

    recorded()
    data = EvalData(ds, batch_size=args.batch_size, workers=args.workers)
    fast, t_fast = timed(lambda: pruner.sensitivity(data, ratios=ratios))
    recorded()
    opaque, t_opaque = timed(lambda: pruner.sensitivity(recorded, ratios=ratios))
    # the unit: the median plain evaluation, taken before, between and during the analyses,
    # so a change of machine load moves numerator and denominator alike
    unit = float(np.median(calls))
    inside = sum(calls[2:])
    counts, dloss = count_diff(fast.losses, opaque.losses, opaque.baseline, len(ds))
    lines = [f"{name:13s} {points:4d} points  eval {unit:6.2f} s (min {min(calls):.2f}, max "
             f"{max(calls):.2f})  opaque {t_opaque / unit:6.1f} eq = "
             f"{t_opaque / unit / (points + 1):.3f} x (points+1), {t_opaque / inside:.3f} x its "
             f"own evaluations  dataset {t_fast / unit:6.1f} eq  top-1 count diff {counts}  "
             f"loss diff {dloss:.3g}"]
    if run_naive:
        def ev(n: paddle.nn.Layer) -> float:
            return model_eval_fn(n, ds, args.batch_size)()
        ref, t_naive = timed(lambda: naive(net, shape, ev, ratios))
        c2, d2 = count_diff(fast.losses, ref, opaque.baseline, len(ds))
        lines.append(f"{'':13s} naive prune-and-evaluate {t_naive / unit:6.1f} eq "
                     f"({t_naive:.1f} s)  top-1 count diff vs dataset form {c2}, loss diff {d2:.3g}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    ap.add_argument("--workers", type=int, default=None,
                    help="threads for the dataset form (default: cores, max 4)")
    ap.add_argument("--naive", action="store_true", help="also time the naive loop (first model)")
    ap.add_argument("--quick", action="store_true", help="128 images, 3 ratios")
    args = ap.parse_args()
    ratios = [0.3, 0.6, 0.9] if args.quick else args.ratios
    if args.quick:
        args.samples = 128
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)
    print(f"{args.size}x{args.size}, {args.samples} images, {len(ratios)} ratios, eval batch "
          f"{args.batch_size}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"paddle {paddle.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f} at start; untrained networks")
    for i, name in enumerate(args.models):
        for line in bench_model(name, args, ratios, args.naive and i == 0):
            print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
