"""What the example scripts share: the MobileNetV1 tutorials' command line, data and how they
print an evaluation (`tutorial_mobilenet_cifar10.py`, `manual_pruning.py`), and the command line
of the generated-shapes tasks (`detection.py`, `segmentation.py`). Run as scripts, they import this
file from beside them; not part of the library.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # paddle's import-time notices (ccache)
    import numpy as np
    import paddle

    from prune_callbacks.datasets.bundled import cifar10_dataset, digits_dataset, subset

# The tutorial's skip_vars=["conv2d_26.w_0"]: MobileNetV1's last pointwise conv. The layer path
# names it whatever else the process built before; the Paddle parameter name works too.
LAST_CONV = "conv6._pointwise_conv.0"
INPUT_SHAPE = [1, 3, 32, 32]

# Training settings per data set where the option is not given.
DATA_DEFAULTS = {"cifar10": {"batch_size": 128, "lr": 0.1}, "digits": {"batch_size": 32, "lr": 0.02}}


def parse_args(argv: Optional[List[str]], description: str, data: str, num_samples: int,
               output_dir: str) -> argparse.Namespace:
    """The scripts' options, with `data`, `num_samples` and `output_dir` as each one's defaults."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["cifar10", "digits"], default=data,
                   help="cifar10: the tutorial's data; digits: scikit-learn's digits, offline")
    p.add_argument("--data-file", default=None,
                   help="local cifar-10-python.tar.gz; without it, Paddle's cache (one download)")
    p.add_argument("--epochs-before", type=int, default=2, help="epochs before pruning")
    p.add_argument("--epochs-after", type=int, default=2, help="fine-tuning epochs after pruning")
    p.add_argument("--flops", type=float, default=0.4, help="share of FLOPs to remove, in (0, 1)")
    p.add_argument("--skip", nargs="*", default=[LAST_CONV],
                   help="groups never pruned (layer paths or names such as conv2d_26.w_0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 128 for cifar10 (the tutorial's), 32 for digits")
    p.add_argument("--lr", type=float, default=None,
                   help="Momentum learning rate; default: 0.1 for cifar10 (the tutorial's), 0.02 for "
                        "digits (0.1 leaves BatchNorm's running statistics behind on 1,437 images)")
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help="validation images per sensitivity point (126 points for MobileNetV1)")
    p.add_argument("--train-samples", type=int, default=None, help="train on a subset (default all)")
    p.add_argument("--val-samples", type=int, default=None, help="validate on a subset (default all)")
    p.add_argument("--scale", type=float, default=1.0, help="MobileNetV1 width multiplier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=output_dir)
    args = p.parse_args(argv)
    for name, value in DATA_DEFAULTS[args.data].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 < args.flops < 1.0:
        p.error(f"--flops {args.flops} must be in (0, 1), e.g. 0.4")
    if args.epochs_before < 1 or args.epochs_after < 0:
        p.error("--epochs-before must be >= 1 and --epochs-after >= 0")
    for name in ("batch_size", "num_samples", "train_samples", "val_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.scale <= 0:
        p.error(f"--scale {args.scale} must be > 0")
    return args


def shapes_task_args(argv: Optional[List[str]], description: str, epochs: Tuple[int, int],
                     tiny: Dict[str, Any], width_help: str) -> argparse.Namespace:
    """The generated-shapes examples' options: `epochs` (before, after pruning) are the defaults,
    `tiny` the settings of a `--tiny` smoke run."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flops", type=float, default=0.4, help="share of FLOPs to remove")
    p.add_argument("--epochs-before", type=int, default=epochs[0])
    p.add_argument("--epochs-after", type=int, default=epochs[1])
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--val-samples", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help=width_help)
    p.add_argument("--tiny", action="store_true", help="a smoke run: tiny data, few epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in tiny.items():
            setattr(args, name, value)
    if not 0 < args.flops < 1:
        p.error(f"--flops must be in (0, 1), got {args.flops}")
    return args


def evaluate(net: paddle.nn.Layer, data: Any, metric: Any, batch_size: int = 64) -> float:
    """`metric` (a paddle.metric.Metric taking the network's outputs and the labels) over a
    generated-shapes set (`data.x`, `data.y`), in eval mode without gradients."""
    net.eval()
    metric.reset()
    with paddle.no_grad():
        for i in range(0, len(data), batch_size):
            metric.update(net(paddle.to_tensor(data.x[i:i + batch_size])),
                          data.y[i:i + batch_size])
    return metric.accumulate()


def load_data(args: argparse.Namespace) -> Tuple[paddle.io.Dataset, paddle.io.Dataset]:
    """Train and validation sets as (float32 [3, 32, 32] in [-1, 1], int64 [1]) samples."""
    if args.data == "digits":
        train, val = digits_dataset("train"), digits_dataset("test")
    else:
        try:  # Transpose + Normalize([127.5], [127.5]), as in the tutorial
            train = cifar10_dataset("train", path=args.data_file)
            val = cifar10_dataset("test", path=args.data_file)
        except (FileNotFoundError, RuntimeError) as e:
            sys.exit(f"error: {e}\nPass the file with --data-file, or run offline with --data digits.")
    return subset(train, args.train_samples, args.seed), subset(val, args.val_samples, args.seed)


def short(result: Dict[str, Any]) -> str:
    """model.evaluate's result, rounded (its loss is the last batch's, as Paddle prints it)."""
    loss = float(np.ravel(result["loss"])[0])
    return (f"{{'loss': {loss:.4f}, 'acc_top1': {result['acc_top1']:.4f}, "
            f"'acc_top5': {result['acc_top5']:.4f}}}")
