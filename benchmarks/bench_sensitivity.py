"""Sensitivity analysis: the naive method against ours, on the same network and data.

Naive (what PaddleSlim does and what a hand-written loop does): for every group and ratio,
physically prune a copy of the network and evaluate all of it on all the data. Ours:
`FilterPruner.sensitivity(dataset)`: reversible masks, the unchanged part of the network
replayed from one baseline pass, batches evaluated in worker threads.

Prints both wall times, the speed-up and the largest difference between the two sets of losses.

    python benchmarks/bench_sensitivity.py                 # mobilenet_v1, 32x32, 512 images
    python benchmarks/bench_sensitivity.py --samples 128 --ratios 0.3 0.6 0.9   # quicker

Measured on the 2-core CI-class machine, OMP_NUM_THREADS=1, defaults (126 points): naive 839.9 s;
ours 261.8 s on the idle machine (2 worker threads): 3.2x, largest loss difference 0.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import time
import warnings

import numpy as np
import paddle
from paddle.vision import models

from prune_callbacks import EvalData, FilterPruner
from prune_callbacks.sensitivity import DEFAULT_RATIOS, top1_metric


class Images(paddle.io.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def evaluate(net: paddle.nn.Layer, batches) -> float:
    correct = total = 0
    with paddle.no_grad():
        for x, y in batches:
            c, t = top1_metric(net(x).numpy(), y)
            correct, total = correct + c, total + t
    return correct / total


def naive(net, input_shape, batches, ratios):
    base = evaluate(net, batches)
    losses = {}
    for g in FilterPruner(net, input_shape).prunable_groups:
        for r in ratios:
            twin = copy.deepcopy(net)
            FilterPruner(twin, input_shape).prune({g.name: r})
            twin.eval()
            losses.setdefault(g.name, {})[r] = (base - evaluate(twin, batches)) / base
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v1")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    ap.add_argument("--workers", type=int, default=None, help="threads for ours (default: cores, max 4)")
    ap.add_argument("--skip-naive", action="store_true", help="time ours only")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)

    paddle.seed(0)
    rng = np.random.RandomState(0)
    net = getattr(models, args.model)(num_classes=10)
    net.eval()
    x = rng.randn(args.samples, 3, args.size, args.size).astype("float32")
    with paddle.no_grad():  # labels the network mostly gets right, so losses are informative
        y = net(paddle.to_tensor(x)).numpy().argmax(1)
    flip = rng.rand(args.samples) < 0.2
    y[flip] = rng.randint(0, 10, flip.sum())
    ds = Images(x, y.reshape(-1, 1).astype("int64"))
    shape = [1, 3, args.size, args.size]
    pruner = FilterPruner(net, shape)
    data = EvalData(ds, batch_size=args.batch_size, workers=args.workers)
    groups = len(pruner.prunable_groups)
    print(f"{args.model} {args.size}x{args.size}, {args.samples} images, {groups} groups x "
          f"{len(args.ratios)} ratios = {groups * len(args.ratios)} points; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"paddle {paddle.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"ours uses {data.workers} worker thread(s)")

    t0 = time.perf_counter()
    ours = pruner.sensitivity(data, ratios=args.ratios)
    t_ours = time.perf_counter() - t0
    print(f"ours:  {t_ours:8.1f} s")
    if args.skip_naive:
        return
    t0 = time.perf_counter()
    ref = naive(net, shape, data.batches, args.ratios)
    t_naive = time.perf_counter() - t0
    diff = max(abs(ours.losses[g][r] - ref[g][r]) for g in ref for r in args.ratios)
    print(f"naive: {t_naive:8.1f} s")
    print(f"speed-up: {t_naive / t_ours:.2f}x   largest loss difference: {diff:.3g}")


if __name__ == "__main__":
    main()
