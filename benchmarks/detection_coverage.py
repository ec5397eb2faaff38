"""How much of detection- and OCR-style networks the engine can prune.

Small plain-paddle networks, one per pattern real detectors and OCR models use: an FPN with a
head shared by every level (FCOS/RetinaNet/GFL), convs under a tensor-dependent `if` (PP-YOLOE+'s
head), deformable convs with their offset convs (PP-YOLOv2's DCN), feature clean-up with
`where`/`isnan`/`clip` (PP-OCRv4), RT-DETR-style query selection (`topk`, `gather_nd`), a loss
computed inside the network from targets (every PaddleDetection architecture), and a recogniser
whose training-only decoder reads the backbone and the targets (PP-OCR's NRTR/SAR heads). For
each: prunable groups out of all groups, prunable channels out of all channels, and whether
predicted FLOPs equal counted FLOPs.

Run it with this branch's engine, and with an older one to compare (the script only needs
`FilterPruner` and `count_flops`; `train_inputs` is passed where the engine takes it):

    python benchmarks/detection_coverage.py
    PYTHONPATH=/path/to/older/checkout python benchmarks/detection_coverage.py

With `--real`, the real networks instead (`real_detectors.py`: PP-YOLOE+, PicoDet, FCOS, YOLOv3,
PP-YOLO tiny, PP-YOLOv2, RT-DETR; PP-OCR det, rec and cls, SVTR), built from their sources and
config files, which are not dependencies of this project; those it cannot build are skipped
with the reason. Each runs in its own process:

    python benchmarks/detection_coverage.py --real --ppdet SRC --ppocr SRC --configs DIR
"""
from __future__ import annotations

import argparse
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.vision.ops import DeformConv2D

from prune_callbacks import FilterPruner, count_flops

logger = logging.getLogger("detection_coverage")
SHAPE = [1, 3, 64, 64]


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2D(cin, cout, 3, stride=stride, padding=1, bias_attr=False),
                         nn.BatchNorm2D(cout), nn.ReLU())


class Backbone(nn.Layer):
    """Strides 8, 16, 32 with 32, 64, 128 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2), cbr(32, 32, 2))
        self.s2 = nn.Sequential(cbr(32, 64, 2), cbr(64, 64))
        self.s3 = nn.Sequential(cbr(64, 128, 2), cbr(128, 128))

    def forward(self, x):
        c3 = self.s1(x)
        c4 = self.s2(c3)
        return c3, c4, self.s3(c4)


class FPN(nn.Layer):
    def __init__(self, out: int = 48) -> None:
        super().__init__()
        self.lat = nn.LayerList([nn.Conv2D(c, out, 1) for c in (32, 64, 128)])
        self.smooth = nn.LayerList([nn.Conv2D(out, out, 3, padding=1) for _ in range(3)])

    def forward(self, feats):
        p5 = self.lat[2](feats[2])
        p4 = self.lat[1](feats[1]) + F.interpolate(p5, scale_factor=2)
        p3 = self.lat[0](feats[0]) + F.interpolate(p4, scale_factor=2)
        return [s(p) for s, p in zip(self.smooth, (p3, p4, p5))]


class FCOSLike(nn.Layer):
    """One tower and one set of predictors for every level."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.fpn = Backbone(), FPN()
        self.tower = nn.Sequential(cbr(48, 48), cbr(48, 48))
        self.cls, self.reg = nn.Conv2D(48, 4, 3, padding=1), nn.Conv2D(48, 4, 3, padding=1)

    def forward(self, x):
        outs = []
        for p in self.fpn(self.backbone(x)):
            t = self.tower(p)
            outs += [self.cls(t), self.reg(t)]
        return outs


class IfHead(nn.Layer):
    """A head whose branch depends on a tensor (`pd_op.if`), as PP-YOLOE+'s does."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.stem = cbr(128, 64)
        self.a, self.b = cbr(64, 64), nn.Conv2D(64, 64, 1)
        self.pred = nn.Conv2D(64, 8, 1)

    def forward(self, x):
        f = self.stem(self.backbone(x)[2])
        if x.mean() > 0:
            f = self.a(f)
        else:
            f = F.relu(self.b(f))
        return self.pred(f)


class DCNNet(nn.Layer):
    """Deformable convs with offset and mask convs (PP-YOLOv2's DCN backbone stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, 2), cbr(16, 32, 2))
        self.offset = nn.Conv2D(32, 18, 3, padding=1)
        self.mask = nn.Conv2D(32, 9, 3, padding=1)
        self.dcn = DeformConv2D(32, 64, 3, padding=1)
        self.bn = nn.BatchNorm2D(64)
        self.head = nn.Conv2D(64, 8, 1)

    def forward(self, x):
        f = self.stem(x)
        y = F.relu(self.bn(self.dcn(f, self.offset(f), F.sigmoid(self.mask(f)))))
        return self.head(y)


class CleanUpNet(nn.Layer):
    """Feature clean-up between convs, as PP-OCRv4's detection neck does."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = cbr(128, 64)
        self.head = nn.Conv2D(64, 1, 1)

    def forward(self, x):
        f = self.neck(self.backbone(x)[2])
        f = paddle.where(paddle.isnan(f) | paddle.isinf(f), paddle.zeros_like(f), f)
        f = paddle.clip(f, 0.0, 6.0) * (f > 0.1).astype("float32")
        return self.head(f)


class LossInside(nn.Layer):
    """Computes its loss from targets in training (every PaddleDetection architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.fpn = Backbone(), FPN()
        self.head = nn.Conv2D(48, 4, 1)

    def forward(self, x, targets=None):
        outs = [self.head(p) for p in self.fpn(self.backbone(x))]
        if self.training:
            return sum(((o - t) ** 2).mean() for o, t in zip(outs, targets))
        return outs


class RecWithTrainDecoder(nn.Layer):
    """A recogniser with a training-only decoder fed by the backbone and the targets (PP-OCR's
    NRTR/SAR-style heads): traced in eval mode only, its backbone's last conv looks free."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.ctc = nn.Conv2D(128, 10, 1)
        self.embed = nn.Conv2D(10, 128, 1)
        self.decoder = nn.Sequential(cbr(128, 64), nn.Conv2D(64, 10, 1))

    def forward(self, x, targets=None):
        f = self.backbone(x)[2]
        logits = self.ctc(f)
        if self.training:
            return ((logits - targets) ** 2).mean() + \
                ((self.decoder(f + self.embed(targets)) - targets) ** 2).mean()
        return logits


class QuerySelection(nn.Layer):
    """RT-DETR-style: score every encoder token, keep the top k (topk, gather_nd), decode them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.proj = nn.Conv2D(128, 64, 1)
        self.score, self.box = nn.Linear(64, 4), nn.Linear(64, 4)

    def forward(self, x):
        tokens = self.proj(self.backbone(x)[2]).flatten(2).transpose([0, 2, 1])
        _, idx = paddle.topk(self.score(tokens).max(-1), k=3, axis=1)
        batch = paddle.arange(x.shape[0]).unsqueeze(1).expand_as(idx)
        return self.box(paddle.gather_nd(tokens, paddle.stack([batch, idx], axis=-1)))


def _fpn_targets():
    return (paddle.randn([2, 3, 64, 64]),
            [paddle.randn([2, 4, s, s]) for s in (8, 4, 2)])


NETS = {
    "fcos_shared_head": (FCOSLike, None),
    "if_on_tensor_head": (IfHead, None),
    "deformable_conv": (DCNNet, None),
    "where_isnan_clip": (CleanUpNet, None),
    "query_selection": (QuerySelection, None),
    "loss_inside_fpn": (LossInside, _fpn_targets),
    "rec_train_decoder": (RecWithTrainDecoder,
                          lambda: (paddle.randn([2, 3, 64, 64]), paddle.randn([2, 10, 2, 2]))),
    # no training inputs: the groups that may feed the decoder are held whole, with a warning
    "rec_no_train_inputs": (RecWithTrainDecoder, None),
}


def coverage(name: str) -> tuple:
    build, train_inputs = NETS[name]
    paddle.seed(0)
    net = build()
    kwargs = {}
    if train_inputs is not None and "train_inputs" in inspect.signature(FilterPruner).parameters:
        kwargs["train_inputs"] = train_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, SHAPE, **kwargs)
        groups = pruner.groups
        exact = pruner.flops() == count_flops(net, SHAPE)
    ok = [g for g in groups if g.prunable]
    return (len(ok), len(groups), sum(g.channels for g in ok), sum(g.channels for g in groups),
            "yes" if exact else "NO")


def real_coverage(real: "real_detectors.RealNet") -> tuple:
    """Groups with parameters (prunable / all), their channels, FLOPs exact at full width and
    after a uniform 30% cut, and pruned == masked (eval outputs) after that cut."""
    net, shape = real.net, real.input_shape
    randomise(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = FilterPruner(net, shape, train_inputs=real.train_inputs)
        groups = [g for g in pruner.groups if g.members]
        ok = [g for g in groups if g.prunable]
        exact = pruner.flops() == count_flops(net, shape)
        ratios = {g.name: 0.3 for g in ok}
        x = paddle.randn(shape)
        with pruner.mask(ratios):
            masked = _eval_outputs(net, x, real.compared)
        predicted = pruner.flops(ratios)
        pruner.prune(ratios)
        pruned = _eval_outputs(net, x, real.compared)
        exact = exact and predicted == count_flops(net, shape)
    same = len(pruned) == len(masked) and all(
        p.shape == m.shape and float(np.abs(p - m).max()) <= 1e-4 * max(float(np.abs(m).max()), 1e-12)
        for p, m in zip(pruned, masked))
    return (len(ok), len(groups), sum(g.channels for g in ok), sum(g.channels for g in groups),
            "yes" if exact else "NO", "yes" if same else "NO")


def randomise(net: nn.Layer) -> None:
    """Distinct per-channel scales and statistics, and random weights where a layer starts
    constant, so a channel sliced wrongly shows."""
    rng = np.random.default_rng(0)
    for p in net.parameters():
        if p.ndim > 1 and p.dtype == paddle.float32 and float(p.max()) == float(p.min()):
            # constant-initialised predictors (PP-YOLOE+'s zero convs): outputs would be too
            p.set_value(rng.normal(0, 0.05, p.shape).astype("float32"))
        if p.ndim == 1 and p.shape[0] > 1 and p.dtype == paddle.float32:
            p.set_value(rng.uniform(0.5, 1.5, p.shape).astype("float32"))


def _eval_outputs(net: nn.Layer, x: paddle.Tensor, compared: "nn.Layer | None") -> list:
    """The float outputs of the eval forward, or of `compared` in it (a detector's head: NMS
    after it may keep other boxes on ties), as arrays."""
    got: list = []
    hook = compared.register_forward_post_hook(lambda layer, i, o: got.append(o)) \
        if compared is not None else None
    net.eval()
    try:
        with paddle.no_grad():
            out = net(x)
    finally:
        if hook is not None:
            hook.remove()
    flat, stack = [], [got[0] if got else out]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            stack = [item[k] for k in sorted(item)] + stack
        elif isinstance(item, (list, tuple)):
            stack = list(item) + stack
        elif isinstance(item, paddle.Tensor) and item.dtype == paddle.float32:
            flat.append(item.numpy())
    return flat


def main_real(args: argparse.Namespace) -> None:
    """One child process per network (PaddleDetection's config registry is global)."""
    import subprocess
    import sys
    import time

    from real_detectors import real_networks

    nets = dict(real_networks(args.ppdet, args.ppocr, args.configs))
    if args.only:
        build = nets[args.only]
        try:
            real = build()
        except Exception as e:  # noqa: BLE001  (their code, their dependencies)
            print(f"SKIP {type(e).__name__}: {str(e).strip().splitlines()[-1][:150] if str(e) else ''}")
            return
        row = real_coverage(real)
        print("ROW " + " ".join(str(v) for v in row))
        return
    logger.info("%-28s %15s %19s %12s %14s %7s", "network", "groups (params)", "channels",
                "FLOPs exact", "pruned=masked", "time")
    for name in nets:
        start = time.time()
        cmd = [sys.executable, __file__, "--real", "--configs", str(args.configs), "--only", name]
        for flag, path in (("--ppdet", args.ppdet), ("--ppocr", args.ppocr)):
            if path is not None:
                cmd += [flag, str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("ROW ", "SKIP "))]
        took = f"{time.time() - start:.0f}s"
        if lines and lines[-1].startswith("ROW "):
            v = lines[-1].split()[1:]
            logger.info("%-28s %7s / %5s %9s / %7s %12s %14s %7s", name, *v, took)
        elif lines:
            logger.info("%-28s skipped: %s", name, lines[-1][5:])
        else:
            err = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            logger.info("%-28s fails: %s", name, (err[-1] if err else "no output")[:150])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(NETS))
    parser.add_argument("--real", action="store_true",
                        help="real PaddleDetection / PaddleOCR networks instead of the replicas")
    parser.add_argument("--ppdet", type=Path, help="directory holding the ppdet package")
    parser.add_argument("--ppocr", type=Path,
                        help="directory holding the ppocr package (with ppocr/modeling)")
    parser.add_argument("--configs", type=Path, default=Path("."),
                        help="directory searched for the config .yml files")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("prune_callbacks", "ppdet"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.real:
        main_real(args)
        return
    totals = [0, 0, 0, 0]
    logger.info("%-20s %15s %19s %14s", "network", "prunable groups", "prunable channels",
                "FLOPs exact")
    for name in args.models:
        try:
            row = coverage(name)
        except Exception as e:  # an engine that cannot trace it: say so and go on
            msg = str(e).strip().splitlines()
            logger.info("%-20s fails: %s: %s", name, type(e).__name__,
                        (msg[-1] if msg else "")[:90])
            continue
        totals = [t + r for t, r in zip(totals, row[:4])]
        logger.info("%-20s %7d / %5d %9d / %7d %14s", name, *row)
    logger.info("%-20s %7d / %5d %9d / %7d", "total", *totals)


if __name__ == "__main__":
    main()
