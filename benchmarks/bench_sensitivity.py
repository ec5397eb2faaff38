"""Sensitivity analysis cost in eval-equivalents, per model and form, with its exactness checked.

One process, one run. For each model, trained briefly on digits (`--epochs`, 1,397 training
images; 400 held-out evaluation images): the time of one plain `paddle.Model.evaluate` of the
evaluation samples (the unit), then the analysis in three forms, each divided by that unit:
- opaque: `pruner.sensitivity(eval_fn)` where `eval_fn` runs `model.evaluate` (masks applied
  and restored around every call; the ideal is points + 1 evaluations). Its losses are plain
  masked evaluation: the reference;
- dataset: `pruner.sensitivity(EvalData(...))`, the default: the compiled path (the network
  exported once to Paddle Inference with oneDNN, the mask as an input; doubtful samples
  recomputed eagerly) where it applies;
- eager: `EvalData(..., engine="eager")`: replay of what a group cannot change, worker threads.
The dataset and eager forms' losses are compared with the opaque form's in top-1 counts: the
largest difference must be 0. The naive prune-a-copy-and-evaluate loop (what PaddleSlim does)
runs on the first model (`--no-naive` skips it).

    python benchmarks/bench_sensitivity.py            # 3 models, 400 images, 9 ratios, batch 128
    python benchmarks/bench_sensitivity.py --quick    # 3 models, 128 images, 3 ratios, no naive

Measured (2-core x86_64 VM, paddle 3.3.1, OMP_NUM_THREADS=1, load average 1-4 from other jobs),
default run, eval-equivalents:

    model          points  dataset (compiled)  eager replay  opaque (x own evals)  naive
    mobilenet_v1      126        13.5              59.6        137.1 (1.003)       131.8
    resnet18          108        21.5              48.0        117.7 (1.005)
    mobilenet_v2      225        23.4             120.2        229.3 (1.003)

Top-1 count difference from masked evaluation: 0 at every point, every model and form.
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
from prune_callbacks.datasets.bundled import digits_dataset
from prune_callbacks.sensitivity import DEFAULT_RATIOS
from prune_callbacks.sensitivity.compiled import CompiledEval

MODELS = ("mobilenet_v1", "resnet18", "mobilenet_v2")


class Images(paddle.io.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def digits_split(samples: int) -> Tuple[Images, Images]:
    """Training images, and `samples` held-out evaluation images (the digits test split, topped
    up from the end of the training split, which is then left out of training)."""
    train, test = digits_dataset("train"), digits_dataset("test")
    tx = np.stack([np.asarray(train[i][0]) for i in range(len(train))])
    ty = np.stack([np.asarray(train[i][1]) for i in range(len(train))]).reshape(-1, 1)
    vx = np.stack([np.asarray(test[i][0]) for i in range(len(test))])
    vy = np.stack([np.asarray(test[i][1]) for i in range(len(test))]).reshape(-1, 1)
    extra = max(0, samples - len(vx))
    vx, vy = np.concatenate([vx, tx[len(tx) - extra:]]), np.concatenate([vy, ty[len(ty) - extra:]])
    tx, ty = tx[:len(tx) - extra], ty[:len(ty) - extra]
    return (Images(tx.astype("float32"), ty.astype("int64")),
            Images(vx[:samples].astype("float32"), vy[:samples].astype("int64")))


def train_briefly(net: paddle.nn.Layer, train: Images, epochs: int) -> None:
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Momentum(0.02, momentum=0.9, weight_decay=1e-4,
                                            parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss())
    model.fit(train, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    net.eval()


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


class CompiledStats:
    """What the compiled path did in the last analysis (groups served, samples recomputed)."""

    last: object = None
    _build = CompiledEval.build.__func__

    @classmethod
    def install(cls) -> None:
        def build(klass: type, *a: object, **kw: object) -> object:
            cls.last = cls._build(klass, *a, **kw)
            return cls.last
        CompiledEval.build = classmethod(build)

    @classmethod
    def describe(cls) -> str:
        c = cls.last
        if c is None:
            return "eager (not compiled)"
        return f"compiled: {len(c.groups)} groups, {c.recomputed} samples recomputed eagerly"


def bench_model(name: str, args: argparse.Namespace, ratios: Sequence[float],
                run_naive: bool, data_split: Tuple[Images, Images]) -> List[str]:
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10)
    train, ds = data_split
    _, t_train = timed(lambda: train_briefly(net, train, args.epochs))
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
    CompiledStats.last = None
    data = EvalData(ds, batch_size=args.batch_size, workers=args.workers)
    fast, t_fast = timed(lambda: pruner.sensitivity(data, ratios=ratios))
    how = CompiledStats.describe()
    recorded()
    eager_data = EvalData(ds, batch_size=args.batch_size, workers=args.workers, engine="eager")
    eager, t_eager = timed(lambda: pruner.sensitivity(eager_data, ratios=ratios))
    recorded()
    opaque, t_opaque = timed(lambda: pruner.sensitivity(recorded, ratios=ratios))
    # the unit: the median plain evaluation, taken before, between and during the analyses,
    # so a change of machine load moves numerator and denominator alike
    unit = float(np.median(calls))
    inside = sum(calls[3:])
    counts, dloss = count_diff(fast.losses, opaque.losses, opaque.baseline, len(ds))
    c_eager, d_eager = count_diff(eager.losses, opaque.losses, opaque.baseline, len(ds))
    lines = [f"{name:13s} {points:4d} points, top-1 {opaque.baseline:.3f} after {args.epochs} "
             f"epoch(s) ({t_train:.0f} s)  eval {unit:6.2f} s (min {min(calls):.2f}, max "
             f"{max(calls):.2f})",
             f"{'':13s} opaque  {t_opaque / unit:6.1f} eq = {t_opaque / unit / (points + 1):.3f} x "
             f"(points+1), {t_opaque / inside:.3f} x its own evaluations",
             f"{'':13s} dataset {t_fast / unit:6.1f} eq  ({how})  top-1 count diff {counts}, "
             f"loss diff {dloss:.3g}",
             f"{'':13s} eager   {t_eager / unit:6.1f} eq  top-1 count diff {c_eager}, loss diff "
             f"{d_eager:.3g}"]
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
    ap.add_argument("--epochs", type=int, default=2, help="training epochs on digits")
    ap.add_argument("--no-naive", dest="naive", action="store_false",
                    help="skip the naive prune-a-copy loop (run on the first model by default)")
    ap.add_argument("--quick", action="store_true", help="128 images, 3 ratios, no naive loop")
    args = ap.parse_args()
    ratios = [0.3, 0.6, 0.9] if args.quick else args.ratios
    if args.quick:
        args.samples, args.naive = 128, False
    if args.size != 32:
        ap.error("--size: the digits images are 32x32")
    warnings.filterwarnings("ignore")
    logging.getLogger("prune_callbacks").setLevel(logging.WARNING)
    print(f"{args.size}x{args.size}, {args.samples} images, {len(ratios)} ratios, eval batch "
          f"{args.batch_size}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"paddle {paddle.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    CompiledStats.install()
    split = digits_split(args.samples)
    for i, name in enumerate(args.models):
        for line in bench_model(name, args, ratios, args.naive and i == 0, split):
            print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
