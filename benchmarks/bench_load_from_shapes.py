"""Loading a pruned checkpoint without a plan file: the architecture read from the weights' shapes.

For each model (224x224, 1000 classes): prune 30-60% of every prunable group with FilterPruner,
save `net.state_dict()` with `paddle.save`; then the median of `--runs` runs of, on a freshly built
network each time:
  shapes: `load_pruned(fresh, prefix, input_shape=...)` with no plan file (trace, solve the kept
          counts, shrink, load the weights);
  plan:   the same checkpoint with its plan file (`save_pruned`): re-apply the plans, load.
and checks that both give the pruned network's outputs exactly.

    python benchmarks/bench_load_from_shapes.py
    python benchmarks/bench_load_from_shapes.py --models resnet18 --runs 5
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import paddle

from prune_callbacks import FilterPruner, load_pruned, save_pruned

MODELS = {
    "mobilenet_v1": lambda: paddle.vision.models.mobilenet_v1(),
    "resnet18": lambda: paddle.vision.models.resnet18(),
    "shufflenet_v2_x1_0": lambda: paddle.vision.models.shufflenet_v2_x1_0(),
}
SHAPE = [1, 3, 224, 224]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    warnings.simplefilter("ignore")
    print(f"paddle {paddle.__version__}, python {platform.python_version()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, median of {args.runs} run(s)")
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype("float32"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paddle.seed(0)
            net = MODELS[name]()
            pruner = FilterPruner(net, SHAPE)
            pruner.prune({g.name: (0.3, 0.45, 0.6)[i % 3] for i, g in enumerate(pruner.prunable_groups)})
            net.eval()
            want = net(x).numpy()
            bare, planned = os.path.join(tmp, name), os.path.join(tmp, name + "_plan")
            paddle.save(net.state_dict(), bare + ".pdparams")
            save_pruned(net, planned)
            times = {"shapes": [], "plan": []}
            for _ in range(args.runs):
                for kind, prefix in (("shapes", bare), ("plan", planned)):
                    fresh = MODELS[name]()
                    t0 = time.perf_counter()
                    load_pruned(fresh, prefix, input_shape=SHAPE)
                    times[kind].append(time.perf_counter() - t0)
                    fresh.eval()
                    assert np.array_equal(fresh(x).numpy(), want), (name, kind)
            print(f"{name:20s} from shapes {statistics.median(times['shapes']):6.2f} s   "
                  f"with plan file {statistics.median(times['plan']):6.2f} s   (outputs identical)")


if __name__ == "__main__":
    main()
