"""How much of each paddle.vision classifier the engine can prune: prunable groups and channels.

For every model of `paddle.vision.models` (10 classes, the input size its classifier needs),
traces the network and prints the prunable groups out of all groups and the prunable channels
out of all channels (a channel counted once per group), then the totals.

    python benchmarks/zoo_coverage.py
    python benchmarks/zoo_coverage.py --models shufflenet_v2_x0_25 resnet18
"""
from __future__ import annotations

import argparse
import logging
import warnings

import paddle
from paddle.vision import models

from prune_callbacks import FilterPruner

logger = logging.getLogger("zoo_coverage")

# one builder per family and width; input sizes their classifiers need
ZOO = {
    "lenet": ([1, 1, 28, 28], lambda: models.LeNet(num_classes=10)),
    "alexnet": ([1, 3, 223, 223], lambda: models.alexnet(num_classes=10)),
    "vgg16": ([1, 3, 32, 32], lambda: models.vgg16(num_classes=10)),
    "resnet18": ([1, 3, 32, 32], lambda: models.resnet18(num_classes=10)),
    "resnet50": ([1, 3, 32, 32], lambda: models.resnet50(num_classes=10)),
    "wide_resnet50_2": ([1, 3, 32, 32], lambda: models.wide_resnet50_2(num_classes=10)),
    "resnext50_32x4d": ([1, 3, 32, 32], lambda: models.resnext50_32x4d(num_classes=10)),
    "mobilenet_v1": ([1, 3, 32, 32], lambda: models.mobilenet_v1(num_classes=10)),
    "mobilenet_v2": ([1, 3, 32, 32], lambda: models.mobilenet_v2(num_classes=10)),
    "mobilenet_v3_small": ([1, 3, 32, 32], lambda: models.mobilenet_v3_small(num_classes=10)),
    "mobilenet_v3_large": ([1, 3, 32, 32], lambda: models.mobilenet_v3_large(num_classes=10)),
    "squeezenet1_1": ([1, 3, 64, 64], lambda: models.squeezenet1_1(num_classes=10)),
    "densenet121": ([1, 3, 32, 32], lambda: models.densenet121(num_classes=10)),
    "shufflenet_v2_x0_25": ([1, 3, 32, 32], lambda: models.shufflenet_v2_x0_25(num_classes=10)),
    "shufflenet_v2_x1_0": ([1, 3, 32, 32], lambda: models.shufflenet_v2_x1_0(num_classes=10)),
    "shufflenet_v2_swish": ([1, 3, 32, 32], lambda: models.shufflenet_v2_swish(num_classes=10)),
    "inception_v3": ([1, 3, 75, 75], lambda: models.inception_v3(num_classes=10)),
    "googlenet": ([1, 3, 189, 189], lambda: models.googlenet(num_classes=10)),
}


def coverage(name: str) -> tuple:
    shape, build = ZOO[name]
    paddle.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = FilterPruner(build(), shape).groups
    ok = [g for g in groups if g.prunable]
    return len(ok), len(groups), sum(g.channels for g in ok), sum(g.channels for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    totals = [0, 0, 0, 0]
    logger.info("%-22s %15s %19s", "model", "prunable groups", "prunable channels")
    for name in args.models:
        row = coverage(name)
        totals = [t + r for t, r in zip(totals, row)]
        logger.info("%-22s %7d / %5d %9d / %7d", name, *row)
    logger.info("%-22s %7d / %5d %9d / %7d", "total", *totals)


if __name__ == "__main__":
    main()
