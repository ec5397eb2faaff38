"""Sensitivity metrics: paddle.metric.Metric objects and per-pixel labels (dense prediction)."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from prune_callbacks import FilterPruner


class _Seg(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 8, 3, padding=1)
        self.c2 = nn.Conv2D(8, 3, 1)

    def forward(self, x):
        return self.c2(nn.functional.relu(self.c1(x)))


class _PixelAccuracy(paddle.metric.Metric):
    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.right, self.total = 0, 0

    def update(self, logits, labels) -> None:
        pred = np.asarray(logits).argmax(1)
        self.right += int((pred == np.asarray(labels)).sum())
        self.total += pred.size

    def accumulate(self) -> float:
        return self.right / self.total

    def name(self):
        return ["pixel_acc"]


def _data(n=24, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 3, 6, 6).astype("float32")
    y = x.argmax(1).astype("int64")  # a label map [6, 6] per image
    return [(x[i], y[i]) for i in range(n)]


def _naive(net, data, ratios, group):
    """Mask each point by hand and score pixel accuracy over all samples at once."""
    pruner = FilterPruner(net, [1, 3, 6, 6])
    x = paddle.to_tensor(np.stack([d[0] for d in data]))
    y = np.stack([d[1] for d in data])
    net.eval()
    with paddle.no_grad():
        base = (net(x).numpy().argmax(1) == y).mean()
        out = {}
        for r in ratios:
            with pruner.mask({group: r}):
                out[r] = (base - (net(x).numpy().argmax(1) == y).mean()) / base
    return out


def test_metric_object_on_label_maps_equals_hand_masking():
    paddle.seed(3)
    net = _Seg()
    data = _data()
    pruner = FilterPruner(net, [1, 3, 6, 6])
    result = pruner.sensitivity(data, ratios=(0.25, 0.5, 0.75), metric=_PixelAccuracy(),
                                batch_size=10)
    (group,) = result.curves()
    want = _naive(net, data, (0.25, 0.5, 0.75), group)
    got = result.curves()[group]
    for r in want:
        assert abs(got[r] - want[r]) < 1e-12


def test_paddle_accuracy_metric_equals_default_top1():
    paddle.seed(0)
    net = paddle.vision.models.LeNet(num_classes=10)
    rng = np.random.RandomState(0)
    data = [(rng.randn(1, 28, 28).astype("float32"), np.array([rng.randint(10)], "int64"))
            for _ in range(40)]
    pruner = FilterPruner(net, [1, 1, 28, 28])
    default = pruner.sensitivity(data, ratios=(0.3, 0.6), batch_size=16).curves()
    with_metric = pruner.sensitivity(data, ratios=(0.3, 0.6), batch_size=16,
                                     metric=paddle.metric.Accuracy()).curves()
    assert default == with_metric and len(default) >= 2
