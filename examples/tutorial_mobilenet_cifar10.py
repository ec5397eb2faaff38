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
import warnings
from typing import Dict, List, Optional

import _cli  # the scripts' shared command line and data (beside this file)
from _cli import load_data, short

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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return _cli.parse_args(argv, "Train MobileNetV1, prune FLOPs by sensitivity and fine-tune, in one "
                           "model.fit.", data="cifar10", num_samples=256,
                           output_dir="output/tutorial_mobilenet_cifar10")


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
