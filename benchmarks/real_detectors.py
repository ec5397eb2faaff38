"""Build real PaddleDetection and PaddleOCR networks as their trainers do, with a synthetic
training batch, for `detection_coverage.py --real`. Neither package is a dependency: their
sources and config files are passed as paths, and a network that cannot be built is skipped
with the reason.

PaddleDetection: `ppdet.core.workspace.load_config` + `create(cfg.architecture)` (as
tools/train.py does); the batch is what its reader gives (image, im_shape, scale_factor,
gt_bbox, gt_class, pad_gt_mask, epoch_id; YOLOv3's and FCOS's targets by ppdet's own batch
operators). The network takes a dict; `DictInput` gives it an image tensor (eval) and image plus
targets (training, returning the loss) so that `count_flops` can run it.
PaddleOCR: `ppocr.modeling.architectures.build_model(config["Architecture"])`; recognisers
train on `(images, labels)`, as tools/program.py calls them.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

# config file (relative to the configs directory) -> the kind of targets its loss reads
DETECTORS = {
    "ppyoloe_plus_crn_s.yml": "padgt",
    "picodet_s_320_lcnet.yml": "padgt",
    "fcos_r50_fpn.yml": "fcos",
    "yolov3_mobilenet_v3_large.yml": "yolo",
    "yolov3_darknet53.yml": "yolo",
    "ppyolo_tiny.yml": "yolo",
    "ppyolov2_r50vd_dcn.yml": "yolo",
    "rtdetr_r18vd.yml": "padgt",
}
OCR = {  # config -> input [C, H, W]
    "ch_PP-OCRv3_det_student.yml": [3, 320, 320],
    "PP-OCRv4_mobile_det.yml": [3, 320, 320],
    "ch_PP-OCRv3_rec.yml": [3, 48, 320],
    "ch_PP-OCRv4_rec.yml": [3, 48, 320],
    "cls_mv3.yml": [3, 48, 192],
    "rec_svtrnet.yml": [3, 64, 256],
}
ANCHORS = [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198],
           [373, 326]]


@dataclass
class RealNet:
    net: nn.Layer
    input_shape: List[int]
    train_inputs: Tuple[Any, ...]
    # the layer whose eval output pruned and masked networks are compared on: a detector's head,
    # before NMS (which may keep other boxes on ties); None: the network's output
    compared: Optional[nn.Layer] = None


class DictInput(nn.Layer):
    """A PaddleDetection architecture (forward takes a dict) called with an image tensor, and
    in training with the targets dict too (returning the loss)."""

    def __init__(self, net: nn.Layer) -> None:
        super().__init__()
        self.net = net

    def forward(self, image, targets=None):
        n, _, h, w = image.shape
        if self.training:
            inputs = dict(targets)
            inputs["image"] = image
            return self.net(inputs)["loss"]
        return self.net({"image": image, "im_shape": paddle.full([n, 2], float(h), "float32"),
                         "scale_factor": paddle.ones([n, 2], "float32")})


def _numpy1_reshape() -> None:
    """ppdet 2.6's batch operators call `np.reshape(a, newshape=...)` (removed in numpy 2)."""
    if getattr(np.reshape, "_newshape", False):
        return
    original = np.reshape

    def reshape(a: Any, *args: Any, newshape: Any = None, **kw: Any) -> Any:
        return original(a, newshape if newshape is not None else args[0], **kw)
    reshape._newshape = True  # type: ignore[attr-defined]
    np.reshape = reshape


def _det_batch(kind: str, size: int, n: int = 2) -> Tuple[paddle.Tensor, dict]:
    from ppdet.data.transform import batch_operators as ops

    _numpy1_reshape()
    rng = np.random.RandomState(0)
    samples = []
    for i in range(n):
        xy = rng.uniform(0, size * 0.6, (3, 2))
        wh = rng.uniform(size * 0.1, size * 0.4, (3, 2))
        box = np.concatenate([xy, np.minimum(xy + wh, size - 1)], 1).astype("float32")
        samples.append(dict(image=rng.normal(size=(3, size, size)).astype("float32"),
                            gt_bbox=box, gt_class=rng.randint(0, 80, (3, 1)).astype("int32"),
                            im_shape=np.array([size, size], "float32"),
                            scale_factor=np.array([1., 1.], "float32"), im_id=np.array([i]),
                            is_crowd=np.zeros((3, 1), "int32"), h=size, w=size))
    if kind == "padgt":
        samples = ops.PadGT()(samples)
    elif kind == "fcos":
        samples = ops.Gt2FCOSTarget(object_sizes_boundary=[64, 128, 256, 512],
                                    center_sampling_radius=1.5,
                                    downsample_ratios=[8, 16, 32, 64, 128],
                                    norm_reg_targets=True)(samples)
    else:  # NormalizeBox, PadBox(50), BboxXYXY2XYWH, Gt2YoloTarget, as the YOLO readers do
        for s in samples:
            b = s["gt_bbox"] / size
            b = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
            box, cls, score = (np.zeros((50, 4), "float32"), np.zeros((50, 1), "int32"),
                               np.zeros((50,), "float32"))
            box[:len(b)], cls[:len(b)], score[:len(b)] = b, s["gt_class"], 1
            s.update(gt_bbox=box, gt_class=cls, gt_score=score)
        samples = ops.Gt2YoloTarget(anchors=ANCHORS, anchor_masks=[[6, 7, 8], [3, 4, 5],
                                                                    [0, 1, 2]],
                                    downsample_ratios=[32, 16, 8], num_classes=80)(samples)
    keys = [k for k in samples[0] if k not in ("h", "w", "image")]
    targets = {k: paddle.to_tensor(np.stack([s[k] for s in samples])) for k in keys}
    targets["epoch_id"] = 0
    if kind == "padgt":  # ppdet 2.6's assigners mix int64 with these int32 labels: paddle 3
        targets["gt_class"] = targets["gt_class"].astype("int64")  # refuses, so int64
    return paddle.to_tensor(np.stack([s["image"] for s in samples])), targets


def build_detector(ppdet_src: Path, config: Path, size: int = 320) -> RealNet:
    if str(ppdet_src) not in sys.path:
        sys.path.insert(0, str(ppdet_src))
    from ppdet.core.workspace import create, load_config
    import ppdet.modeling  # noqa: F401  (registers the architectures)

    cfg = load_config(str(config))
    net = DictInput(create(cfg.architecture))
    head = next((getattr(net.net, a) for a in ("yolo_head", "head", "fcos_head", "detr_head")
                 if isinstance(getattr(net.net, a, None), nn.Layer)), None)
    return RealNet(net, [1, 3, size, size], _det_batch(DETECTORS[config.name], size), head)


def build_ocr(ppocr_src: Path, config: Path) -> RealNet:
    import yaml

    if str(ppocr_src) not in sys.path:
        sys.path.insert(0, str(ppocr_src))
    try:
        from ppocr.modeling.architectures import build_model
    except ImportError as e:
        raise ImportError(f"no ppocr.modeling under {ppocr_src} (the paddleocr wheels ship "
                          "none: pass a PaddleOCR source checkout)") from e
    arch = copy.deepcopy(yaml.safe_load(config.read_text())["Architecture"])
    chw = OCR[config.name]
    n, length = 2, 25
    rng = np.random.RandomState(0)
    if arch["model_type"] == "rec":
        chars = 37 if arch["algorithm"] == "SVTR" else 6625
        if arch["Head"]["name"] == "MultiHead":
            arch["Head"]["out_channels_list"] = {"CTCLabelDecode": chars + 1,
                                                "SARLabelDecode": chars + 3,
                                                "NRTRLabelDecode": chars + 4}
        else:
            arch["Head"]["out_channels"] = chars + 1
    net = build_model(arch)
    image = paddle.to_tensor(rng.normal(size=[n] + chw).astype("float32"))
    if arch["model_type"] != "rec":
        return RealNet(net, [1] + chw, (image,))
    labels: List[Any] = [paddle.to_tensor(rng.randint(1, 30, (n, length)).astype("int64"))]
    if arch["Head"]["name"] == "MultiHead":
        labels += [paddle.to_tensor(rng.randint(1, 30, (n, length + 2)).astype("int64")),
                   paddle.to_tensor(np.full((n,), 5, "int64")),
                   paddle.to_tensor(np.ones((n,), "float32"))]
    else:
        labels.append(paddle.to_tensor(np.full((n,), 5, "int64")))
    return RealNet(net, [1] + chw, (image, labels))


def real_networks(ppdet_src: Optional[Path], ppocr_src: Optional[Path],
                  configs: Path) -> List[Tuple[str, Callable[[], RealNet]]]:
    """(name, builder) for every known config found under `configs` (searched recursively)."""
    found = {p.name: p for p in configs.rglob("*.yml")}
    out: List[Tuple[str, Callable[[], RealNet]]] = []
    for name in DETECTORS:
        def det(name: str = name) -> RealNet:
            if ppdet_src is None:
                raise ImportError("no --ppdet path given")
            if name not in found:
                raise FileNotFoundError(f"{name} not under {configs}")
            return build_detector(ppdet_src, found[name])
        out.append((Path(name).stem, det))
    for name in OCR:
        def ocr(name: str = name) -> RealNet:
            if ppocr_src is None:
                raise ImportError("no --ppocr path given")
            if name not in found:
                raise FileNotFoundError(f"{name} not under {configs}")
            return build_ocr(ppocr_src, found[name])
        out.append((Path(name).stem, ocr))
    return out
