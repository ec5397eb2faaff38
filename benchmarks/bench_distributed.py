r"""Sensitivity analysis wall time with 1 and N ranks (paddle.distributed.spawn, gloo on CPU).

The same network (fixed seed) and the same evaluation samples in every setting; the script checks
that every setting gives identical curves and prints the wall time of each and the speed-up.
Ranks on one machine share its cores (each rank's evaluation threads are cores // ranks), so on a
2-core CPU the gain is bounded; with one GPU or one machine per rank it grows with the ranks.

    python benchmarks/bench_distributed.py                       # mobilenet_v1, 1 and 2 ranks
    python benchmarks/bench_distributed.py --model resnet18 --samples 400 --ranks 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import List

import paddle
import paddle.distributed as dist

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def analyse(model: str, samples: int, out: str) -> None:
    from prune_callbacks import FilterPruner
    from prune_callbacks.datasets.bundled import digits_dataset, subset
    from prune_callbacks.training.distributed import is_main

    paddle.seed(0)
    net = getattr(paddle.vision.models, model)(num_classes=10)
    data = subset(digits_dataset("test"), samples, seed=0)
    pruner = FilterPruner(net, [1, 3, 32, 32])
    start = time.perf_counter()
    result = pruner.sensitivity(data, ratios=RATIOS, batch_size=128)
    elapsed = time.perf_counter() - start
    if is_main():
        with open(out, "w") as f:
            json.dump({"seconds": elapsed,
                       "curves": {g: {str(r): v for r, v in c.items()}
                                  for g, c in result.curves().items()}}, f)


def _worker(model: str, samples: int, out: str) -> None:
    dist.init_parallel_env()
    analyse(model, samples, out)


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v1")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    print(f"sensitivity of {args.model} (untrained, seed 0), {args.samples} digits images, "
          f"{len(RATIOS)} ratios; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs")
    rows, curves = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            out = os.path.join(tmp, f"r{n}.json")
            t0 = time.perf_counter()
            if n == 1:
                analyse(args.model, args.samples, out)
            else:
                dist.spawn(_worker, args=(args.model, args.samples, out), nprocs=n,
                           backend="gloo")
            wall = time.perf_counter() - t0
            with open(out) as f:
                res = json.load(f)
            rows.append((n, res["seconds"], wall))
            curves.append(res["curves"])
    same = all(c == curves[0] for c in curves)
    base = rows[0][1]
    print(f"{'ranks':>5}  {'analysis s':>10}  {'with start-up s':>15}  {'speed-up':>8}")
    for n, secs, wall in rows:
        print(f"{n:>5}  {secs:>10.1f}  {wall:>15.1f}  {base / secs:>7.2f}x")
    print(f"identical curves in every setting: {same}")
    if not same:
        raise SystemExit("curves differ between settings")


if __name__ == "__main__":
    main()
