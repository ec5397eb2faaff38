"""How much of each paddle.vision classifier the engine can prune: prunable groups and channels.

For every model family of `paddle.vision.models` (10 classes, the input size its classifier
needs), traces the network and prints the prunable groups out of all groups and the prunable
channels out of all channels (a channel counted once per group), then the totals; then the same
for small networks built from standard `paddle.nn` layers the zoo does not use (a ViT-style
block, a ConvNeXt block, a decoder with transposed convs and PReLU, a CSP block, a net with an
auxiliary head that runs only in training).

    python benchmarks/zoo_coverage.py
    python benchmarks/zoo_coverage.py --models shufflenet_v2_x0_25 resnet18
"""
from __future__ import annotations

import argparse
import logging
import warnings

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
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


class ViTBlock(nn.Layer):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Conv2D(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose([0, 2, 1])
        q, k, v = self.qkv(self.norm1(t)).chunk(3, axis=-1)
        t = t + self.proj(F.softmax(q @ k.transpose([0, 2, 1]), axis=-1) @ v)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


class ConvNeXtBlock(nn.Layer):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, dim, 4, stride=4)
        self.dwconv = nn.Conv2D(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = self.create_parameter([dim])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dwconv(x).transpose([0, 2, 3, 1]))
        x = x + (self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))).transpose([0, 3, 1, 2])
        return self.head(x.mean(axis=[2, 3]))


class Decoder(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2D(3, 32, 3, stride=2, padding=1), nn.PReLU(32),
                                 nn.Conv2D(32, 64, 3, stride=2, padding=1), nn.PReLU(64))
        self.up = nn.Sequential(nn.Conv2DTranspose(64, 32, 2, stride=2), nn.BatchNorm2D(32),
                                nn.PReLU(32), nn.Conv2DTranspose(32, 16, 2, stride=2))
        self.out = nn.Conv2D(16, 2, 1)

    def forward(self, x):
        return self.out(self.up(self.enc(x)))


class CSPBlock(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 64, 3, padding=1)
        self.inner = nn.Sequential(nn.Conv2D(32, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2D(32, 32, 3, padding=1))
        self.head = nn.Sequential(nn.Conv2D(64, 64, 1), nn.AdaptiveAvgPool2D(1), nn.Flatten(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        y = F.relu(self.stem(x))
        c = y.shape[1]
        return self.head(paddle.concat([y[:, :c // 2], self.inner(y[:, c // 2:])], axis=1))


class AuxHeadNet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2D(3, 32, 3, padding=1), nn.BatchNorm2D(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2D(32, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2D(64, 5, 1)
        self.aux = nn.Sequential(nn.Conv2D(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2D(16, 5, 1))

    def forward(self, x):
        f = self.stem(x)
        out = self.head(self.body(f))
        if self.training:
            return [out, self.aux(f)]
        return out


OTHERS = {
    "vit_block": ([1, 3, 32, 32], ViTBlock),
    "convnext_block": ([1, 3, 32, 32], ConvNeXtBlock),
    "decoder": ([1, 3, 32, 32], Decoder),
    "csp_block": ([1, 3, 32, 32], CSPBlock),
    "aux_head_net": ([1, 3, 32, 32], AuxHeadNet),
}


def coverage(name: str) -> tuple:
    shape, build = ZOO[name] if name in ZOO else OTHERS[name]
    paddle.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = FilterPruner(build(), shape).groups
    ok = [g for g in groups if g.prunable]
    return len(ok), len(groups), sum(g.channels for g in ok), sum(g.channels for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO) + list(OTHERS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    totals = [0, 0, 0, 0]
    logger.info("%-22s %15s %19s", "model", "prunable groups", "prunable channels")
    for name in args.models:
        try:
            row = coverage(name)
        except Exception as e:  # an engine that cannot trace it: say so and go on
            logger.info("%-22s fails: %s: %s", name, type(e).__name__, str(e)[:80])
            continue
        totals = [t + r for t, r in zip(totals, row)]
        logger.info("%-22s %7d / %5d %9d / %7d", name, *row)
    logger.info("%-22s %7d / %5d %9d / %7d", "total", *totals)


if __name__ == "__main__":
    main()
