r"""Pruning a segmentation network inside `fit`: a small UNet with a train-only auxiliary head.

Dense prediction differs from the classification tutorial in three ways, and this script shows
the callbacks handle each: the network returns two outputs while training (main + auxiliary
logits) and one in evaluation (the auxiliary head runs only `if self.training`); the loss is a
weighted sum over both outputs; and the sensitivity metric is mean IoU over pixels, given as a
`paddle.metric.Metric`, the interface Paddle users already write metrics in.

The task is generated here, offline: random shapes (discs, squares, bars) on noise; the label of
each pixel is the shape's class (0 = background).

    python examples/segmentation.py                    # ~1-2 min on 2 CPU cores
    python examples/segmentation.py --flops 0.5 --epochs-before 4 --epochs-after 3
    python examples/segmentation.py --tiny              # a smoke run, seconds

It prints the mIoU before pruning, right after pruning and after fine-tuning, the FLOPs before and
after, and "pruned FLOPs: 40.0x% (target 40%)".
"""
from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any, List, Optional, Tuple

for _notice in ("When training, we now always track global mean",
                "To copy construct from a tensor"):
    warnings.filterwarnings("ignore", message=_notice)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import numpy as np
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F
    from paddle.static import InputSpec

    from prune_callbacks import FilterPruneCallback, SensitivityCallback, count_flops

import _cli  # the examples' shared command line (beside this file)

CLASSES = 4  # background, disc, square, bar


# -- data ---------------------------------------------------------------------------------------
class Shapes(paddle.io.Dataset):
    """`n` images [3, size, size] of shapes on noise, with per-pixel labels [size, size] int64."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        yy, xx = np.mgrid[:size, :size]
        self.x = rng.normal(0, 0.6, (n, 3, size, size)).astype("float32")
        self.y = np.zeros((n, size, size), dtype="int64")
        for i in range(n):
            for _ in range(rng.randint(1, 4)):
                cls = rng.randint(1, CLASSES)
                cy, cx, r = rng.randint(4, size - 4), rng.randint(4, size - 4), rng.randint(3, 8)
                if cls == 1:
                    m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                elif cls == 2:
                    m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                else:
                    m = (abs(yy - cy) <= 1) & (abs(xx - cx) <= 2 * r)
                self.y[i][m] = cls
                self.x[i][:, m] += rng.uniform(0.5, 1.5, (3, 1)).astype("float32") * (cls - 2)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


# -- network --------------------------------------------------------------------------------------
def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2D(cin, cout, 3, padding=1), nn.BatchNorm2D(cout), nn.ReLU(),
                         nn.Conv2D(cout, cout, 3, padding=1), nn.BatchNorm2D(cout), nn.ReLU())


class SmallUNet(nn.Layer):
    """Two-level UNet; an auxiliary head on the bottleneck supervises training only."""

    def __init__(self, width: int = 16, classes: int = CLASSES) -> None:
        super().__init__()
        self.enc1, self.enc2 = block(3, width), block(width, 2 * width)
        self.bottleneck = block(2 * width, 4 * width)
        self.dec2 = block(4 * width + 2 * width, 2 * width)
        self.dec1 = block(2 * width + width, width)
        self.head = nn.Conv2D(width, classes, 1)
        self.aux_head = nn.Sequential(nn.Conv2D(4 * width, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2D(width, classes, 1))

    def forward(self, x: paddle.Tensor) -> Any:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(paddle.concat([F.interpolate(b, scale_factor=2), e2], axis=1))
        d1 = self.dec1(paddle.concat([F.interpolate(d2, scale_factor=2), e1], axis=1))
        out = self.head(d1)
        if self.training:  # the auxiliary head exists only in training
            aux = F.interpolate(self.aux_head(b), scale_factor=4)
            return out, aux
        return out


class SegLoss(nn.Layer):
    """Pixel cross-entropy of the main output, plus `aux_weight` times that of the auxiliary."""

    def __init__(self, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.aux_weight = aux_weight

    def forward(self, *args: paddle.Tensor) -> paddle.Tensor:
        *outputs, label = args
        loss = F.cross_entropy(outputs[0], label, axis=1)
        for aux in outputs[1:]:
            loss = loss + self.aux_weight * F.cross_entropy(aux, label, axis=1)
        return loss


class MeanIoU(paddle.metric.Metric):
    """Mean intersection-over-union over classes, accumulated over batches (paddle.metric API)."""

    def __init__(self, num_classes: int = CLASSES, name: str = "miou") -> None:
        super().__init__()
        self.num_classes, self._name = num_classes, name
        self.reset()

    def reset(self) -> None:
        self.inter = np.zeros(self.num_classes)
        self.union = np.zeros(self.num_classes)

    def update(self, logits: Any, labels: Any) -> float:
        logits = logits.numpy() if isinstance(logits, paddle.Tensor) else np.asarray(logits)
        labels = labels.numpy() if isinstance(labels, paddle.Tensor) else np.asarray(labels)
        pred = logits.argmax(axis=1).ravel()
        labels = labels.reshape(-1)
        for c in range(self.num_classes):
            p, t = pred == c, labels == c
            self.inter[c] += np.sum(p & t)
            self.union[c] += np.sum(p | t)
        return self.accumulate()

    def accumulate(self) -> float:
        seen = self.union > 0
        return float(np.mean(self.inter[seen] / self.union[seen])) if seen.any() else 0.0

    def name(self) -> List[str]:
        return [self._name]


# -- the job --------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return _cli.shapes_task_args(
        argv, "Prune a small UNet (with a train-only auxiliary head) on generated shapes, inside fit, "
        "with mIoU sensitivity.", epochs=(3, 2), width_help="channels of the first level",
        tiny={"epochs_before": 1, "epochs_after": 1, "train_samples": 64, "val_samples": 32, "width": 8})


def evaluate(net: nn.Layer, data: Shapes) -> float:
    return _cli.evaluate(net, data, MeanIoU())


class Report(paddle.callbacks.Callback):
    """Prints mIoU before pruning and right after it (fit evaluates after on_epoch_end)."""

    def __init__(self, val: Shapes, at_epoch: int) -> None:
        super().__init__()
        self.val, self.at_epoch = val, at_epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.at_epoch:  # listed after FilterPruneCallback: the net is pruned now
            print(f"mIoU right after pruning: {evaluate(self.model.network, self.val):.4f}")
            self.model.network.train()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paddle.seed(args.seed)
    np.random.seed(args.seed)
    train, val = Shapes(args.train_samples, seed=args.seed), Shapes(args.val_samples, seed=99)
    net = SmallUNet(args.width)
    shape = [1, 3, 32, 32]
    model = paddle.Model(net, [InputSpec([None, 3, 32, 32], "float32", "image")],
                         [InputSpec([None, 32, 32], "int64", "label")])
    model.prepare(paddle.optimizer.Adam(2e-3, parameters=net.parameters()), SegLoss())
    at = args.epochs_before - 1
    sens = SensitivityCallback(val, at_epoch=at, metric=MeanIoU(), batch_size=32,
                               ratios=(0.2, 0.4, 0.6, 0.8))
    prune = FilterPruneCallback(flops=args.flops, at_epoch=at, sensitivity=sens)
    before = {}

    class Before(paddle.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == at:
                before["miou"] = evaluate(self.model.network, val)
                before["flops"] = count_flops(self.model.network, shape)
                self.model.network.train()

    model.fit(train, epochs=args.epochs_before + args.epochs_after, batch_size=16, verbose=0,
              callbacks=[Before(), sens, prune, Report(val, at)])
    after = count_flops(net, shape)
    print(f"mIoU before pruning: {before['miou']:.4f}")
    print(f"mIoU fine-tuned: {evaluate(net, val):.4f}")
    print(f"FLOPs before: {before['flops']:,}  after: {after:,}")
    print(f"pruned FLOPs: {100 * (1 - after / before['flops']):.2f}% "
          f"(target {100 * args.flops:.0f}%)")


if __name__ == "__main__":
    main()
