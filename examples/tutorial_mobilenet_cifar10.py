r"""PaddleSlim's filter-pruning tutorial (MobileNetV1 on CIFAR-10) as one `model.fit` with callbacks.

The tutorial trains, runs a sensitivity analysis, prunes 40% of the FLOPs with
`sensitive_prune(0.4, skip_vars=["conv2d_26.w_0"])`, watches the accuracy collapse, rebuilds the
optimizer and fine-tunes. Here `SensitivityCallback` and `FilterPruneCallback` do all of that at
the end of epoch `--epochs-before` inside a single `model.fit`, `PruneVisualDL` logs it, and the
pruned network is evaluated, summarised, saved (reloadable with `load_pruned`) and exported.

Run it:

    # the tutorial, on CIFAR-10 (downloaded into Paddle's cache if there is network)
    python examples/tutorial_mobilenet_cifar10.py --data-file ~/data/cifar-10-python.tar.gz

    # offline, on scikit-learn's digits with a half-width MobileNetV1 (~3 min on 2 CPU cores)
    python examples/tutorial_mobilenet_cifar10.py --data digits --scale 0.5

    # a smoke run (~20 s; the accuracies mean nothing at this size)
    python examples/tutorial_mobilenet_cifar10.py --data digits --scale 0.25 --epochs-before 1 \
        --epochs-after 1 --train-samples 128 --val-samples 64 --num-samples 16

It prints fit's per-epoch lines (the evaluation of epoch `--epochs-before` already shows the
pruned network, before fine-tuning), the sensitivity progress with an ETA, the pruning plan per
group, then "FLOPs before pruning: N", "FLOPs after pruning: N" and "Pruned FLOPs: 40.02%
(target 40%)" as the tutorial does, the validation accuracy before pruning and per epoch, the
final evaluation ("after fine-tuning: {...}"), `paddle.summary` of the pruned network and the
files written under `--output-dir`:

    sensitivity.json          the sensitivity curves (reused by a rerun into the same directory)
    vdl/                      VisualDL logs: `visualdl --logdir <output-dir>/vdl`
    checkpoint/pruned.*       weights, optimizer and plans: `load_pruned(mobilenet_v1(...), prefix)`
    inference/pruned.*        the pruned network for `paddle.jit.load` / `paddle.inference`
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

# Paddle's own notices, printed on every run, that say nothing about this script: that ccache
# (a C++ build cache) is missing, at import; BatchNorm's statistics; a tensor copy in paddle.Model.
for _notice in ("When training, we now always track global mean",
                "To copy construct from a tensor"):
    warnings.filterwarnings("ignore", message=_notice)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import numpy as np
    import paddle
    from paddle.static import InputSpec

    from prune_callbacks import (FilterPruneCallback, PruneVisualDL, SensitivityCallback,
                                 export, history_of, save_pruned)
    from prune_callbacks.datasets.bundled import cifar10_dataset, digits_dataset, subset

# The tutorial's skip_vars=["conv2d_26.w_0"]: MobileNetV1's last pointwise conv. The layer path
# names it whatever else the process built before; the Paddle parameter name works too.
LAST_CONV = "conv6._pointwise_conv.0"

# Training settings per data set where the option is not given.
DATA_DEFAULTS = {"cifar10": {"batch_size": 128, "lr": 0.1}, "digits": {"batch_size": 32, "lr": 0.02}}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train MobileNetV1, prune FLOPs by sensitivity and fine-tune, in one model.fit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["cifar10", "digits"], default="cifar10",
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
    p.add_argument("--num-samples", type=int, default=256,
                   help="validation images per sensitivity point (126 points for MobileNetV1)")
    p.add_argument("--train-samples", type=int, default=None, help="train on a subset (default all)")
    p.add_argument("--val-samples", type=int, default=None, help="validate on a subset (default all)")
    p.add_argument("--scale", type=float, default=1.0, help="MobileNetV1 width multiplier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="output/tutorial_mobilenet_cifar10")
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


class EvalLog(paddle.callbacks.Callback):
    """Keeps fit's validation accuracy per epoch, for the table printed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.acc: Dict[int, float] = {}

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict] = None) -> None:
        self.epoch = epoch

    def on_eval_end(self, logs: Optional[Dict] = None) -> None:
        if logs and "acc_top1" in logs:
            self.acc[self.epoch] = float(logs["acc_top1"])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # The library reports progress (sensitivity ETA, plans, files) through `logging`; importing
    # paddle installed a root handler of its own, which force=True replaces.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    paddle.set_device("cpu")
    paddle.seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    train_ds, val_ds = load_data(args)
    print(f"{args.data}: {len(train_ds)} train / {len(val_ds)} val images, "
          f"image shape {tuple(val_ds[0][0].shape)}")

    net = paddle.vision.models.mobilenet_v1(num_classes=10, scale=args.scale)
    inputs = [InputSpec([None, 3, 32, 32], "float32", "image")]
    model = paddle.Model(net, inputs, [InputSpec([None, 1], "int64", "label")])
    model.prepare(paddle.optimizer.Momentum(learning_rate=args.lr, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(topk=(1, 5)))

    prune_at = args.epochs_before - 1  # 0-based: the end of the last epoch before pruning
    sens = SensitivityCallback(val_ds, at_epoch=prune_at, num_samples=args.num_samples,
                               path=os.path.join(args.output_dir, "sensitivity.json"))
    prune = FilterPruneCallback(flops=args.flops, at_epoch=prune_at, sensitivity=sens,
                                skip=args.skip)
    vdl_dir = os.path.join(args.output_dir, "vdl")
    eval_log = EvalLog()
    model.fit(train_ds, val_ds, epochs=args.epochs_before + args.epochs_after,
              batch_size=args.batch_size, verbose=2, log_freq=20,
              callbacks=[sens, prune, PruneVisualDL(vdl_dir), paddle.callbacks.VisualDL(vdl_dir),
                         eval_log])

    plan = history_of(model).events[0].plan
    print("\nPruning plan (channels kept per group):")
    for g in plan.groups:
        print(f"  {g.name:28s} {g.channels:5d} -> {len(g.kept):5d}  (-{100 * g.ratio:.1f}%)")
    print(f"FLOPs before pruning: {plan.flops_before}")
    print(f"FLOPs after pruning: {plan.flops_after}")
    print(f"Pruned FLOPs: {round(plan.pruned_flops * 100, 2)}% (target {100 * args.flops:g}%)")
    print(f"Params: {plan.params_before} -> {plan.params_after} "
          f"(-{100 * plan.pruned_params:.1f}%)")

    print(f"\nValidation top-1 on {len(val_ds)} images:")
    print(f"  before pruning: {sens.result.baseline:.4f}  the sensitivity baseline at the end of "
          f"epoch {args.epochs_before} (first {sens.eval_data.size} images)")
    for epoch, acc in sorted(eval_log.acc.items()):
        note = ("pruned at the end of its training, not fine-tuned yet" if epoch == prune_at
                else "pruned, fine-tuning" if epoch > prune_at else "original network")
        print(f"  epoch {epoch + 1}: {acc:.4f}  {note}")

    final = "after fine-tuning" if args.epochs_after else "after pruning (no fine-tuning)"
    print(f"{final}: {short(model.evaluate(val_ds, batch_size=args.batch_size, verbose=0))}")

    paddle.summary(net, (1, 3, 32, 32))

    written = save_pruned(model, os.path.join(args.output_dir, "checkpoint", "pruned"))
    written += export(net, os.path.join(args.output_dir, "inference", "pruned"), [None, 3, 32, 32])
    print("Wrote:")
    for path in [sens.path, vdl_dir] + written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
