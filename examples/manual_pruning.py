r"""PaddleSlim's filter-pruning tutorial step by step with the engine alone (`FilterPruner`).

The same flow as the tutorial, cell by cell, with no pruning callback: build MobileNetV1
(`paddle.summary`) and train it with `paddle.Model.fit`; evaluate; `pruner.sensitive(eval_func=...,
sen_file=...)`; FLOPs before; `pruner.sensitive_prune(0.4, skip_vars=[...])`; evaluate (the
accuracy collapses); rebuild the optimizer over the pruned parameters (`rebuild_optimizer` keeps
the momentum of the kept channels) and `prepare` again; fine-tune; evaluate; `paddle.summary`;
save (`save_pruned`, reloaded here with `load_pruned` to show it round-trips) and export.

Run it (offline by default, on scikit-learn's digits upscaled to 3x32x32):

    python examples/manual_pruning.py --scale 0.5            # ~3 min on 2 CPU cores
    python examples/manual_pruning.py --scale 0.25 --epochs-before 1 --epochs-after 1 \
        --train-samples 128 --val-samples 64 --num-samples 16  # a smoke run, ~15 s
    python examples/manual_pruning.py --data cifar10 --data-file ~/data/cifar-10-python.tar.gz

It prints each step under a "== n. ... ==" heading: the summaries, the evaluations
("before pruning", "before fine-tuning", "after fine-tuning"), the sensitivity table (relative
accuracy loss per group and pruning ratio), "FLOPs before pruning: N", "FLOPs after pruning: N",
"Pruned FLOPs: 40.01% (target 40%)", and the files written under `--output-dir` (sensitivity.json,
checkpoint/pruned.{pdparams,pdopt,prune.json}, inference/pruned.*). Options: `--help`.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from typing import Dict, List, Optional

import _cli  # the scripts' shared command line and data (beside this file)
from _cli import INPUT_SHAPE, load_data, short

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

    from prune_callbacks import (FilterPruner, count_flops, count_params, export,
                                 load_pruned, rebuild_optimizer, save_pruned)
    from prune_callbacks.datasets.bundled import subset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return _cli.parse_args(argv, "Train MobileNetV1, analyse sensitivity, prune FLOPs and fine-tune, "
                           "by hand.", data="digits", num_samples=128, output_dir="output/manual_pruning")


def step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def print_sensitivity(sen: Dict[str, Dict[float, float]]) -> None:
    """One row per group: the relative accuracy loss at each pruning ratio."""
    ratios = sorted({r for pts in sen.values() for r in pts})
    print(f"  {'group':28s}" + "".join(f"{r:>7.1f}" for r in ratios))
    for group, pts in sen.items():
        print(f"  {group:28s}" + "".join(f"{pts[r]:7.3f}" if r in pts else f"{'-':>7s}"
                                         for r in ratios))


def build_net(args: argparse.Namespace) -> paddle.nn.Layer:
    return paddle.vision.models.mobilenet_v1(num_classes=10, scale=args.scale)


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

    step("1. Model")
    net = build_net(args)
    paddle.summary(net, tuple(INPUT_SHAPE))

    step("2. Data")
    train_ds, val_ds = load_data(args)
    print(f"train samples count: {len(train_ds)}")
    print(f"val samples count: {len(val_ds)}")
    image, label = train_ds[0]
    print(f"image shape: {tuple(image.shape)}; label: {label}")

    step("3. Train")
    inputs = [InputSpec([None, 3, 32, 32], "float32", "image")]
    model = paddle.Model(net, inputs, [InputSpec([None, 1], "int64", "label")])
    optimizer = paddle.optimizer.Momentum(learning_rate=args.lr, parameters=net.parameters())
    loss, metric = paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(topk=(1, 5))
    model.prepare(optimizer, loss, metric)
    model.fit(train_ds, epochs=args.epochs_before, batch_size=args.batch_size, verbose=2,
              log_freq=20)
    print(f"before pruning: {short(model.evaluate(val_ds, batch_size=args.batch_size, verbose=0))}")

    step("4.1 Sensitivity")
    pruner = FilterPruner(net, INPUT_SHAPE)
    sens_ds = subset(val_ds, args.num_samples, args.seed)

    def eval_fn() -> float:  # the tutorial's wrapper around model.evaluate
        return model.evaluate(sens_ds, batch_size=args.batch_size, verbose=0)["acc_top1"]

    # Passing the dataset instead, `pruner.sensitivity(sens_ds, path=...)`, gives the same
    # numbers faster: the engine batches once and replays the layers a group cannot change.
    sen_file = os.path.join(args.output_dir, "sensitivity.json")
    sen = pruner.sensitive(eval_func=eval_fn, sen_file=sen_file)
    print(f"relative accuracy loss per pruning ratio ({len(sens_ds)} images; "
          f"{sen_file}):")
    print_sensitivity(sen)

    step("4.2 Prune")
    flops = count_flops(net, INPUT_SHAPE)
    params = count_params(net)
    print(f"FLOPs before pruning: {flops}")
    plan = pruner.sensitive_prune(args.flops, skip_vars=args.skip)
    flops = count_flops(net, INPUT_SHAPE)
    print(f"FLOPs after pruning: {flops}")
    print(f"Pruned FLOPs: {round(plan.pruned_flops * 100, 2)}% (target {100 * args.flops:g}%)")
    print(f"Params: {params} -> {count_params(net)} (-{100 * plan.pruned_params:.1f}%)")
    for g in plan.groups:
        print(f"  {g.name:28s} {g.channels:5d} -> {len(g.kept):5d}  (-{100 * g.ratio:.1f}%)")
    print(f"before fine-tuning: {short(model.evaluate(val_ds, batch_size=args.batch_size, verbose=0))}")

    step("5. Fine-tune")
    # The old optimizer holds the old, larger parameters' state; rebuild it over the pruned ones.
    optimizer = rebuild_optimizer(optimizer, net, plan.param_slices)
    model.prepare(optimizer, loss, metric)
    model.fit(train_ds, epochs=args.epochs_after, batch_size=args.batch_size, verbose=2,
              log_freq=20)
    print(f"after fine-tuning: {short(model.evaluate(val_ds, batch_size=args.batch_size, verbose=0))}")
    paddle.summary(net, tuple(INPUT_SHAPE))

    step("6. Save, reload, export")
    prefix = os.path.join(args.output_dir, "checkpoint", "pruned")
    written = save_pruned(model, prefix)  # the plan was recorded on `net` by sensitive_prune
    fresh = load_pruned(build_net(args), prefix)  # re-applies the plan to an unpruned MobileNetV1
    x = paddle.to_tensor(np.stack([val_ds[i][0] for i in range(min(8, len(val_ds)))]))
    net.eval()
    fresh.eval()
    same = bool(np.allclose(net(x).numpy(), fresh(x).numpy(), atol=1e-5))
    print(f"reloaded {prefix} into a new MobileNetV1: same outputs: {same}")
    written += export(net, os.path.join(args.output_dir, "inference", "pruned"), [None, 3, 32, 32])
    print("Wrote:")
    for path in [sen_file] + written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
