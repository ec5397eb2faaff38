r"""Accuracy kept at equal FLOPs: allocation x channel criterion x distillation, over seeds.

For each model and seed the network is trained once (`--epochs-before`); every method then starts
from a copy of that network, is pruned to each FLOPs cut, evaluated (top-1 right after pruning),
fine-tuned for the same budget (`--epochs-after`, a fresh optimizer of the same settings) and
evaluated again, with and without distillation from the unpruned network. Allocations:

- `sensitivity`: per-group ratios from the sensitivity curves (PaddleSlim's rule; the default);
- `uniform`: the same ratio in every group;
- `global`: one ranking of all channels across groups by importance normalised per group (each
  group's scores divided by their mean), the least important removed until the cut is met (the
  idea of Torch-Pruning's global pruning).

Accuracy recovery (docs/accuracy.md) adds three dimensions: `--sparsity group bn_scale` trains
the last `--sparse-epochs` epochs before pruning with SparsityCallback (a separate pretrained
network per kind, same epoch count as the plain one); `--criteria taylor activation` scores with
statistics gathered by hooks during the last pretraining epoch (no extra pass); and
`--distill-modes raw std` distils on raw (Hinton) or standardised logits.

The task is `hard_digits` (digits warped, tinted, cluttered and occluded; offline) by default, on
which the unpruned networks stay clearly below 100% top-1; `--data cifar10 --data-file ...` uses
a local CIFAR-10 tarball instead.

    python benchmarks/bench_quality.py --quick      # about 15 min on 2 CPU cores
    python benchmarks/bench_quality.py              # the full grid: hours
    python benchmarks/bench_quality.py --models resnet18 --cuts 0.5 --seeds 0 1 2

It prints one row per method (mean and spread over seeds) and writes them as CSV (`--csv`).
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import logging
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import paddle
from paddle.static import InputSpec

warnings.filterwarnings("ignore")
from prune_callbacks import (DistillCallback, FilterPruner, ImportanceStats,  # noqa: E402
                             SparsityCallback, count_flops)
from prune_callbacks.planning.importance import get_criterion  # noqa: E402
from prune_callbacks.datasets.bundled import cifar10_dataset, hard_digits_dataset, subset  # noqa: E402

SHAPE = [1, 3, 32, 32]


def load_data(args: argparse.Namespace):
    if args.data == "cifar10":
        train = cifar10_dataset("train", path=args.data_file)
        test = cifar10_dataset("test", path=args.data_file)
    else:
        train, test = hard_digits_dataset("train"), hard_digits_dataset("test")
    return subset(train, args.train_samples), subset(test, args.val_samples)


def build(name: str, width: float) -> paddle.nn.Layer:
    kwargs = {"num_classes": 10}
    if name.startswith("mobilenet"):
        kwargs["scale"] = width
    return getattr(paddle.vision.models, name)(**kwargs)


def new_model(net: paddle.nn.Layer, lr: float) -> paddle.Model:
    model = paddle.Model(net, [InputSpec([None, 3, 32, 32], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(lr, momentum=0.9, weight_decay=1e-4,
                                            parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return model


def top1(net: paddle.nn.Layer, data) -> float:
    return float(new_model(net, 0.01).evaluate(data, batch_size=256, verbose=0)["acc"])


def global_ratios(pruner: FilterPruner, cut: float) -> Dict[str, float]:
    """Per-group ratios from one ranking of all channels (importance / group mean) that remove
    `cut` of the FLOPs: the threshold on normalised importance is found by bisection."""
    groups = pruner.prunable_groups
    scores = {g.name: pruner.importance(g.name) for g in groups}
    norm = {n: s / (s.mean() + 1e-12) for n, s in scores.items()}
    base = pruner.flops({})

    def ratios_at(t: float) -> Dict[str, float]:
        out = {}
        for n, s in norm.items():
            removed = min(int((s < t).sum()), len(s) - 1)
            if removed:
                out[n] = removed / len(s)
        return out

    lo, hi = 0.0, max(float(s.max()) for s in norm.values()) + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if 1 - pruner.flops(ratios_at(mid)) / base >= cut:
            hi = mid
        else:
            lo = mid
    return ratios_at(hi)


def prune(net, allocation: str, criterion: str, cut: float, sens_data, args) -> float:
    stats = args.stats.get(args.current) if get_criterion(criterion).statistic else None
    pruner = FilterPruner(net, SHAPE, criterion=criterion, statistics=stats)
    if allocation == "global":
        pruner.prune(global_ratios(pruner, cut))
    elif allocation == "uniform":
        pruner.prune_to_flops(cut, strategy="uniform", round_to=args.round_to)
    else:  # one analysis per trained network and criterion, shared by every cut
        key = (args.current, criterion)
        if key not in args.sens_cache:
            args.sens_cache[key] = pruner.sensitivity(
                sens_data, num_samples=args.sensitivity_samples, batch_size=128)
        pruner.prune_to_flops(cut, sensitivities=args.sens_cache[key], strategy="sensitivity",
                              round_to=args.round_to)
    return 1 - count_flops(net, SHAPE) / args.flops_before


def run_method(pretrained, method: Dict[str, Any], train, test, args) -> Dict[str, Any]:
    paddle.seed(method["seed"] + 100)
    net = copy.deepcopy(pretrained)
    t0 = time.perf_counter()
    achieved = prune(net, method["allocation"], method["criterion"], method["cut"], test, args)
    after_prune = top1(net, test)
    model = new_model(net, args.lr)
    callbacks = ([DistillCallback(alpha=args.alpha, temperature=args.temperature,
                                  teacher=pretrained, standardize=method["distill"] == "std")]
                 if method["distill"] != "no" else [])
    model.fit(train, epochs=args.epochs_after, batch_size=args.batch_size, verbose=0,
              callbacks=callbacks)
    return dict(method, achieved=achieved, pruned=after_prune, finetuned=top1(net, test),
                seconds=time.perf_counter() - t0)


def grid(args: argparse.Namespace, sparsity: str) -> List[Dict[str, Any]]:
    rows = []
    for cut, allocation, criterion in itertools.product(args.cuts, args.allocations,
                                                        args.criteria):
        modes = (["no"] if False in args.distill else []) + \
            (list(args.distill_modes) if True in args.distill else [])
        for distill in modes:
            if distill != "no" and (criterion != args.criteria[0] or sparsity != "none"):
                continue  # distillation compared on the first criterion, without sparsity
            if sparsity != "none" and criterion not in args.sparse_criteria:
                continue  # sparse training compared with its matching criteria only
            rows.append(dict(cut=cut, allocation=allocation, criterion=criterion,
                             distill=distill, sparsity=sparsity))
    return rows


def summarise(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    keys = ("model", "cut", "allocation", "criterion", "distill", "sparsity")
    out = []
    for key in sorted({tuple(r[k] for k in keys) for r in results}, key=str):
        rs = [r for r in results if tuple(r[k] for k in keys) == key]
        row = dict(zip(keys, key), seeds=len(rs))
        for f in ("achieved", "pruned", "finetuned", "unpruned"):
            vals = np.array([r[f] for r in rs])
            row[f], row[f + "_sd"] = float(vals.mean()), float(vals.std())
        out.append(row)
    return out


def print_table(rows: List[Dict[str, Any]]) -> None:
    head = (f"{'model':<13} {'cut':>4} {'allocation':<11} {'criterion':<10} {'distil':<6} "
            f"{'sparsity':<8} "
            f"{'FLOPs cut':>9} {'unpruned':>13} {'after prune':>13} {'fine-tuned':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        def ms(f: str) -> str:
            return f"{r[f]:.3f}+-{r[f + '_sd']:.3f}"
        print(f"{r['model']:<13} {r['cut']:>4.1f} {r['allocation']:<11} {r['criterion']:<10} "
              f"{r['distill']:<6} {r['sparsity']:<8} {100 * r['achieved']:>8.2f}% "
              f"{ms('unpruned'):>13} {ms('pruned'):>13} {ms('finetuned'):>13}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="mobilenet_v1 (width 0.5), cut 0.5, l1 and random, 3+1 epochs, seed 0; "
                        "options given explicitly override these")
    p.add_argument("--models", nargs="+", default=["mobilenet_v1", "resnet18"])
    p.add_argument("--width", type=float, default=0.5, help="MobileNet width multiplier")
    p.add_argument("--cuts", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--allocations", nargs="+", default=["sensitivity", "uniform", "global"])
    p.add_argument("--criteria", nargs="+", default=["l1", "l2", "fpgm", "bn_scale", "random"])
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="default 0 1 2 (0 with --quick)")
    p.add_argument("--no-distill", dest="distill", action="store_const", const=[False],
                   default=[False, True], help="skip the runs with distillation")
    p.add_argument("--distill-modes", nargs="+", choices=["raw", "std"], default=["std"],
                   help="distillation on raw (Hinton) or standardised logits (the default)")
    p.add_argument("--sparsity", nargs="+", choices=["none", "group", "bn_scale"],
                   default=["none"], help="sparse training before pruning (SparsityCallback)")
    p.add_argument("--sparse-epochs", type=int, default=1,
                   help="how many of --epochs-before are regularised")
    p.add_argument("--sparse-strength", type=float, default=1e-4)
    p.add_argument("--sparse-growing", type=float, default=1e-4)
    p.add_argument("--sparse-criteria", nargs="+", default=["group_l2", "bn_scale", "l1"],
                   help="criteria compared after sparse training")
    p.add_argument("--round-to", dest="round_to", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="kept channel multiple for sensitivity/uniform ('auto': the runtime's; 1: exact)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--epochs-before", type=int, default=4)
    p.add_argument("--epochs-after", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--sensitivity-samples", type=int, default=200)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--val-samples", type=int, default=None)
    p.add_argument("--data", choices=["hard_digits", "cifar10"], default="hard_digits")
    p.add_argument("--data-file", default=None)
    p.add_argument("--csv", default="bench_quality.csv")
    args = p.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    quick = {"--models": ("models", ["mobilenet_v1"]), "--cuts": ("cuts", [0.5]),
             "--criteria": ("criteria", ["l1", "random"]), "--seeds": ("seeds", [0]),
             "--epochs-before": ("epochs_before", 3), "--epochs-after": ("epochs_after", 1)}
    for flag, (name, value) in quick.items():
        if args.quick and flag not in given:  # --quick only fills what was not given
            setattr(args, name, value)
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    return args


class _LastEpoch(paddle.callbacks.Callback):
    """Importance statistics (Taylor, activation) over the training steps of one epoch."""

    def __init__(self, stats: ImportanceStats, epoch: int) -> None:
        super().__init__()
        self.stats, self.epoch = stats, epoch

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict] = None) -> None:
        if epoch == self.epoch:
            self.stats.start()

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        self.stats.stop()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    train, test = load_data(args)
    print(f"data {args.data}: {len(train)} train, {len(test)} test; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} CPUs", flush=True)
    results = []
    t_start = time.perf_counter()
    args.stats, args.sens_cache = {}, {}
    for model_name, seed, sparsity in itertools.product(args.models, args.seeds, args.sparsity):
        methods = grid(args, sparsity)
        if not methods:
            continue
        paddle.seed(seed)
        np.random.seed(seed)
        net = build(model_name, args.width)
        args.flops_before = count_flops(net, SHAPE)
        args.current = (model_name, seed, sparsity)
        args.stats[args.current] = stats = ImportanceStats(net)  # hooks on the last epoch only
        first_sparse = max(args.epochs_before - args.sparse_epochs, 0)
        callbacks: List[Any] = [_LastEpoch(stats, args.epochs_before - 1)]
        if sparsity != "none":
            callbacks.append(SparsityCallback(kind=sparsity, strength=args.sparse_strength,
                                              growing=args.sparse_growing,
                                              start_epoch=first_sparse))
        new_model(net, args.lr).fit(train, epochs=args.epochs_before,
                                    batch_size=args.batch_size, verbose=0, callbacks=callbacks)
        unpruned = top1(net, test)
        print(f"{model_name} seed {seed} sparsity {sparsity}: unpruned top-1 {unpruned:.4f} "
              f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        for method in methods:
            r = run_method(net, dict(method, model=model_name, seed=seed), train, test, args)
            r["unpruned"] = unpruned
            results.append(r)
            print(f"  {method}: cut {100 * r['achieved']:.2f}%, after prune {r['pruned']:.4f}, "
                  f"fine-tuned {r['finetuned']:.4f} ({r['seconds']:.0f} s)", flush=True)
    rows = summarise(results)
    print()
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
