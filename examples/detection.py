r"""Pruning a small anchor-free detector inside `fit`: backbone, FPN, one head shared by the levels.

Detection differs from classification in ways this script shows the callbacks handle: the head
is one set of layers applied to every pyramid level (its input channels at every level are tied
into one group and the head is sliced once); the loss is computed from targets outside the
network (FCOS-style: every location inside a box, on the level its size belongs to, learns the
box's class and its distances to the four sides); and the sensitivity metric is mAP@0.5, given
as a `paddle.metric.Metric`.

The task is generated here, offline: discs, squares and crosses on noise; each image's label is
its boxes `[MAX_OBJECTS, 5]` (class, x1, y1, x2, y2; class -1 pads).

    python examples/detection.py                    # ~1-2 min on 2 CPU cores
    python examples/detection.py --flops 0.5 --epochs-before 6 --epochs-after 4
    python examples/detection.py --tiny              # a smoke run, seconds

It prints mAP@0.5 before pruning, right after pruning and after fine-tuning, the FLOPs before and
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

CLASSES = 3  # disc, square, cross
MAX_OBJECTS = 3
STRIDES = (8, 16)  # the pyramid levels P3, P4
SIZE_RANGES = ((0, 12), (12, 1e9))  # FCOS: the level whose range holds max(l, t, r, b)


# -- data ---------------------------------------------------------------------------------------
class Shapes(paddle.io.Dataset):
    """`n` images [3, size, size] of 1-3 shapes on noise, with their boxes [MAX_OBJECTS, 5]."""

    def __init__(self, n: int, size: int = 64, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        yy, xx = np.mgrid[:size, :size]
        self.x = rng.normal(0, 0.5, (n, 3, size, size)).astype("float32")
        self.y = np.full((n, MAX_OBJECTS, 5), -1.0, dtype="float32")
        for i in range(n):
            for k in range(rng.randint(1, MAX_OBJECTS + 1)):
                cls = rng.randint(CLASSES)
                r = rng.randint(5, size // 4)
                cy, cx = rng.randint(r, size - r), rng.randint(r, size - r)
                if cls == 0:
                    m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                elif cls == 1:
                    m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                else:
                    m = ((abs(yy - cy) <= r // 3) & (abs(xx - cx) <= r)) | \
                        ((abs(xx - cx) <= r // 3) & (abs(yy - cy) <= r))
                self.x[i][cls][m] += 2.0  # each class lights its own colour
                ys, xs = np.nonzero(m)
                self.y[i, k] = (cls, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


# -- network --------------------------------------------------------------------------------------
def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2D(cin, cout, 3, stride=stride, padding=1, bias_attr=False),
                         nn.BatchNorm2D(cout), nn.ReLU())


class TinyDetector(nn.Layer):
    """Backbone (strides 2-16), FPN over strides 8 and 16, and one head shared by both levels.

    Returns one tensor [N, locations, CLASSES + 4]: per location (level by level, row-major),
    class logits and the distances to the box's sides in units of the level's stride (before a
    softplus, which the loss and the metric apply).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(3, w, 2)
        self.stage2 = nn.Sequential(conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w))
        self.stage3 = nn.Sequential(conv_bn(2 * w, 3 * w, 2), conv_bn(3 * w, 3 * w))
        self.stage4 = nn.Sequential(conv_bn(3 * w, 4 * w, 2), conv_bn(4 * w, 4 * w))
        self.lateral3 = nn.Conv2D(3 * w, 2 * w, 1)
        self.lateral4 = nn.Conv2D(4 * w, 2 * w, 1)
        self.tower = nn.Sequential(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w))  # shared
        self.cls = nn.Conv2D(2 * w, CLASSES, 3, padding=1)
        self.reg = nn.Conv2D(2 * w, 4, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        c3 = self.stage3(self.stage2(self.stem(x)))
        c4 = self.stage4(c3)
        p4 = self.lateral4(c4)
        p3 = self.lateral3(c3) + F.interpolate(p4, scale_factor=2, mode="nearest")
        outs = []
        for p in (p3, p4):  # the same head on every level
            t = self.tower(p)
            out = paddle.concat([self.cls(t), self.reg(t)], axis=1)
            outs.append(out.flatten(2).transpose([0, 2, 1]))
        return paddle.concat(outs, axis=1)


def locations(size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres [L, 2] (x, y) of every location, level by level, with its stride and level."""
    pts, strides, levels = [], [], []
    for lv, s in enumerate(STRIDES):
        n = size // s
        ys, xs = np.mgrid[:n, :n]
        pts.append(np.stack([xs.ravel(), ys.ravel()], 1) * s + s / 2)
        strides.append(np.full(n * n, s))
        levels.append(np.full(n * n, lv))
    return (np.concatenate(pts).astype("float32"), np.concatenate(strides).astype("float32"),
            np.concatenate(levels))


def assign(boxes: paddle.Tensor, pts: paddle.Tensor, strides: paddle.Tensor,
           lo: paddle.Tensor, hi: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """FCOS targets: per image and location, the class (-1: background) of the smallest box
    holding the location on the level its size belongs to, and its sides in strides [N, L, 4]."""
    cls, x1, y1, x2, y2 = [boxes[:, None, :, i] for i in range(5)]  # [N, 1, M]
    px, py = pts[None, :, 0:1], pts[None, :, 1:2]  # [1, L, 1]
    ltrb = paddle.stack([px - x1, py - y1, x2 - px, y2 - py], axis=-1)  # [N, L, M, 4]
    reach = ltrb.max(axis=-1)
    ok = (ltrb.min(axis=-1) > 0) & (cls >= 0) & (reach >= lo[None, :, None]) \
        & (reach < hi[None, :, None])
    area = paddle.where(ok, (x2 - x1) * (y2 - y1), paddle.full_like(reach, 1e8))
    best = area.argmin(axis=-1)  # [N, L]
    positive = paddle.take_along_axis(ok.astype("float32"), best[..., None], axis=-1)[..., 0]
    label = paddle.take_along_axis(cls.expand_as(area), best[..., None], axis=-1)[..., 0]
    label = paddle.where(positive > 0, label, paddle.full_like(label, -1.0))
    idx = best[..., None, None].expand([best.shape[0], best.shape[1], 1, 4])
    sides = paddle.take_along_axis(ltrb, idx, axis=2)[:, :, 0] / strides[None, :, None]
    return label, sides


class DetectionLoss(nn.Layer):
    """Sigmoid focal loss over classes plus L1 on the positives' sides (in strides), from the
    boxes; computed outside the network, as `paddle.Model` does."""

    def __init__(self, size: int) -> None:
        super().__init__()
        pts, strides, levels = locations(size)
        self.pts, self.strides = paddle.to_tensor(pts), paddle.to_tensor(strides)
        self.lo = paddle.to_tensor(np.array([SIZE_RANGES[v][0] for v in levels], "float32"))
        self.hi = paddle.to_tensor(np.array([SIZE_RANGES[v][1] for v in levels], "float32"))

    def forward(self, pred: paddle.Tensor, boxes: paddle.Tensor) -> paddle.Tensor:
        label, sides = assign(boxes, self.pts, self.strides, self.lo, self.hi)
        pos = (label >= 0).astype("float32")
        npos = paddle.clip(pos.sum(), min=1.0)
        onehot = F.one_hot(paddle.clip(label, min=0).astype("int64"), CLASSES) * pos[..., None]
        cls_loss = F.sigmoid_focal_loss(pred[..., :CLASSES], onehot, normalizer=npos)
        reg = F.softplus(pred[..., CLASSES:])
        reg_loss = (paddle.abs(reg - sides).sum(-1) * pos).sum() / npos
        return cls_loss + reg_loss


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> List[int]:
    order, keep = np.argsort(-scores), []
    while len(order):
        i, order = order[0], order[1:]
        keep.append(int(i))
        order = order[box_iou(boxes[i], boxes[order]) < iou]
    return keep


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


class DetectionMAP(paddle.metric.Metric):
    """mAP at IoU 0.5 over classes (VOC all-point AP), accumulated over batches (paddle.metric
    API: `update(predictions, boxes)` with the network's output and the labels). Per image and
    class, the `top_k` locations scoring over `score` go through NMS."""

    def __init__(self, size: int = 64, score: float = 0.05, top_k: int = 20,
                 name: str = "mAP") -> None:
        super().__init__()
        self.pts, self.strides, _ = locations(size)
        self.score, self.top_k, self._name = score, top_k, name
        self.reset()

    def reset(self) -> None:
        self.dets: List[List[Tuple[float, bool]]] = [[] for _ in range(CLASSES)]
        self.n_gt = np.zeros(CLASSES)

    def update(self, pred: Any, boxes: Any) -> float:
        pred = pred.numpy() if isinstance(pred, paddle.Tensor) else np.asarray(pred)
        boxes = boxes.numpy() if isinstance(boxes, paddle.Tensor) else np.asarray(boxes)
        scores = 1 / (1 + np.exp(-pred[..., :CLASSES]))
        sides = np.logaddexp(0, pred[..., CLASSES:]) * self.strides[None, :, None]
        decoded = np.concatenate([self.pts - sides[..., :2], self.pts + sides[..., 2:]], -1)
        for img in range(len(pred)):
            gts = boxes[img][boxes[img][:, 0] >= 0]
            for c in range(CLASSES):
                gt = gts[gts[:, 0] == c][:, 1:]
                self.n_gt[c] += len(gt)
                s = scores[img, :, c]
                cand = np.flatnonzero(s > self.score)
                cand = cand[np.argsort(-s[cand])[:self.top_k]]
                keep = cand[_nms(decoded[img, cand], s[cand])] if len(cand) else cand
                used = np.zeros(len(gt), bool)
                for i in keep[np.argsort(-s[keep])]:
                    ious = box_iou(decoded[img, i], gt) if len(gt) else np.zeros(0)
                    j = int(ious.argmax()) if len(ious) else -1
                    hit = j >= 0 and ious[j] >= 0.5 and not used[j]
                    if hit:
                        used[j] = True
                    self.dets[c].append((float(s[i]), hit))
        return self.accumulate()

    def accumulate(self) -> float:
        aps = []
        for c in range(CLASSES):
            if not self.n_gt[c]:
                continue
            d = sorted(self.dets[c], key=lambda t: -t[0])
            hits = np.array([h for _, h in d], dtype=float)
            tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
            recall = tp / self.n_gt[c] if len(d) else np.zeros(0)
            precision = tp / np.maximum(tp + fp, 1e-9) if len(d) else np.zeros(0)
            mrec = np.concatenate([[0], recall, [1]])
            mpre = np.concatenate([[0], precision, [0]])
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]
            aps.append(float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:])))
        return float(np.mean(aps)) if aps else 0.0

    def name(self) -> List[str]:
        return [self._name]


# -- the job --------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return _cli.shapes_task_args(
        argv, "Prune a small anchor-free detector (FPN, head shared across levels) on generated "
        "shapes, inside fit, with mAP sensitivity.", epochs=(6, 3), width_help="channels of the stem",
        tiny={"epochs_before": 2, "epochs_after": 1, "train_samples": 128, "val_samples": 32, "width": 8})


def evaluate(net: nn.Layer, data: Shapes) -> float:
    return _cli.evaluate(net, data, DetectionMAP())


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paddle.seed(args.seed)
    np.random.seed(args.seed)
    train, val = Shapes(args.train_samples, seed=args.seed), Shapes(args.val_samples, seed=99)
    net = TinyDetector(args.width)
    shape = [1, 3, 64, 64]
    model = paddle.Model(net, [InputSpec([None, 3, 64, 64], "float32", "image")],
                         [InputSpec([None, MAX_OBJECTS, 5], "float32", "boxes")])
    model.prepare(paddle.optimizer.Adam(3e-3, parameters=net.parameters()), DetectionLoss(64))
    at = args.epochs_before - 1
    sens = SensitivityCallback(val, at_epoch=at, metric=DetectionMAP(), batch_size=32,
                               ratios=(0.25, 0.5, 0.75))
    prune = FilterPruneCallback(flops=args.flops, at_epoch=at, sensitivity=sens)
    seen = {}

    class Report(paddle.callbacks.Callback):
        """mAP and FLOPs before pruning (listed first) and right after it (listed last)."""

        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == at:
                seen[self.key] = (evaluate(self.model.network, val),
                                  count_flops(self.model.network, shape))
                self.model.network.train()

    model.fit(train, epochs=args.epochs_before + args.epochs_after, batch_size=16, verbose=0,
              callbacks=[Report("before"), sens, prune, Report("after")])
    (map_before, flops_before), (map_pruned, _) = seen["before"], seen["after"]
    after = count_flops(net, shape)
    head = [g for g in prune.plans[0].groups if g.name.startswith(("lateral", "tower"))]
    print(f"mAP@0.5 before pruning: {map_before:.4f}")
    print(f"mAP@0.5 right after pruning: {map_pruned:.4f}")
    print(f"mAP@0.5 fine-tuned: {evaluate(net, val):.4f}")
    print(f"shared head: tower conv {list(net.tower[0][0].weight.shape)} "
          f"({', '.join(f'{g.name} keeps {len(g.kept)}/{g.channels}' for g in head) or 'unpruned'}"
          ")")
    print(f"FLOPs before: {flops_before:,}  after: {after:,}")
    print(f"pruned FLOPs: {100 * (1 - after / flops_before):.2f}% (target {100 * args.flops:.0f}%)")


if __name__ == "__main__":
    main()
