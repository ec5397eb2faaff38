"""Train, prune and fine-tune a `paddle.vision` classifier in one `model.fit`, driven by Hydra.

`python train.py prune.flops=0.4` trains for `trainer.epochs_before` epochs, analyses
sensitivity and prunes at the end of epoch `prune.at_epoch`, fine-tunes for `trainer.epochs_after`
epochs, and prints a results table (also `results.json` in the run dir). `train(cfg)` is the
whole app; tests call it directly. The config is checked before anything is built.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import hydra
import numpy as np
import paddle
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from prune_callbacks.data import subset

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
RESULTS_FILE = "results.json"
SWEEP_CSV = "results.csv"


# --------------------------------------------------------------------------------------------
# Schema: registered in Hydra's ConfigStore as `config_schema`, the first entry of config.yaml's
# defaults, so composition itself rejects unknown keys and wrong types with the key's full name.
# Ranges and names that a type cannot express are checked in `validate_config`.
# --------------------------------------------------------------------------------------------


class Criterion(Enum):
    """Filter importance criteria (prune.criterion)."""

    l1 = "l1"
    l2 = "l2"
    fpgm = "fpgm"
    bn_scale = "bn_scale"
    random = "random"


class Strategy(Enum):
    """How per-group ratios are chosen (prune.strategy)."""

    sensitivity = "sensitivity"
    uniform = "uniform"


@dataclass
class DataConf:
    """A data set pair: `train` and `val` are `_target_` nodes returning a `paddle.io.Dataset`."""

    name: str = MISSING
    num_classes: int = MISSING
    image_size: int = 32
    path: Optional[str] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    train: Any = MISSING
    val: Any = MISSING


@dataclass
class PruneConf:
    flops: float = 0.4
    criterion: Criterion = Criterion.l1
    strategy: Strategy = Strategy.sensitivity
    at_epoch: Optional[int] = None
    steps: int = 1
    skip: List[str] = field(default_factory=list)
    ratios: List[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    round_to: int = 1
    sensitivity_samples: Optional[int] = 64
    sensitivity_file: Optional[str] = None
    max_loss: Optional[float] = None


@dataclass
class CallbacksConf:
    visualdl: bool = True
    training_curves: bool = True
    checkpoint: bool = True
    export: bool = True


@dataclass
class TrainerConf:
    epochs_before: int = 2
    epochs_after: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    log_freq: int = 10
    verbose: int = 2


@dataclass
class Config:
    """The whole app config. `model` and `optim` are `_target_` nodes checked in `validate_config`."""

    model: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    optim: Any = MISSING
    prune: PruneConf = field(default_factory=PruneConf)
    callbacks: CallbacksConf = field(default_factory=CallbacksConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    output_dir: Optional[str] = None


ConfigStore.instance().store(name="config_schema", node=Config)


def _options(group: str) -> List[str]:
    folder = os.path.join(CONFIG_DIR, group)
    if not os.path.isdir(folder):
        return []
    return sorted(f[: -len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))


class ConfigError(ValueError):
    """A config value out of range or an unknown name; the message names the key and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_known_keys(node: Mapping[str, Any], schema: type, prefix: str) -> None:
    """Reject keys a dataclass does not declare: Hydra's `+key=value` can slip them past the schema."""
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        _check(
            key in allowed,
            f"{prefix}{key} is not a known key; allowed keys{' in ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(allowed)}",
        )


def _locate(target: str, key: str, group: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
        if not callable(found):
            raise TypeError(target)
        return found
    except (ImportError, AttributeError, TypeError, ValueError):
        raise ConfigError(
            f"{key}={target!r} cannot be imported as a callable. Pick a config from the "
            f"'{group}' group ({', '.join(_options(group))}), e.g. {group}={_options(group)[0]}, "
            f"or give the dotted path of a callable."
        ) from None


def _check_optim(optim: DictConfig) -> None:
    import inspect

    target = optim.get("_target_")
    _check(isinstance(target, str), "optim._target_ is missing: choose optim=" + "|".join(_options("optim")))
    cls = _locate(target, "optim._target_", "optim")
    _check(
        isinstance(cls, type) and issubclass(cls, paddle.optimizer.Optimizer),
        f"optim._target_={target!r} is not a paddle.optimizer.Optimizer subclass",
    )
    _check(
        optim.get("_partial_") is True,
        "optim._partial_ must be true: the optimizer is built over net.parameters() by train.py "
        "and rebuilt over the pruned parameters",
    )
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "parameters")]
    for key in optim:
        if key in ("_target_", "_partial_"):
            continue
        _check(
            key in allowed,
            f"optim.{key} is not an argument of {target}; allowed: {', '.join(allowed)}",
        )
    lr = optim.get("learning_rate")
    _check(
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
        f"optim.learning_rate={lr!r} must be a positive number, e.g. 0.02",
    )


def validate_config(cfg: DictConfig) -> DictConfig:
    """Type-check `cfg` against `Config` and check ranges and names, before anything is built.

    Args:
        cfg: a composed config (from `@hydra.main` or `hydra.compose`) or any DictConfig.

    Returns:
        The config merged onto the schema (typed: enums for criterion and strategy).

    Raises:
        omegaconf.errors.ValidationError / ConfigKeyError: a wrong type or an unknown key
            (the message names the full key).
        ConfigError (a ValueError): a value out of range, an unknown name or an unknown key
            added with `+`; the message names the key, the value and what is allowed.
    """
    # Through a plain container: `cfg` may be typed by another copy of this module's schema
    # (train.py imported both as __main__ and as `train`), which OmegaConf would refuse to merge.
    raw = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg
    # Unknown keys first, with the allowed ones listed (OmegaConf's merge would only name the key).
    _check_known_keys(raw, Config, "")
    for key, schema in (("data", DataConf), ("prune", PruneConf), ("callbacks", CallbacksConf),
                        ("trainer", TrainerConf)):
        if isinstance(raw.get(key), Mapping):
            _check_known_keys(raw[key], schema, key + ".")
    typed = OmegaConf.merge(OmegaConf.structured(Config), raw)
    OmegaConf.set_struct(typed, True)
    t, p, d = typed.trainer, typed.prune, typed.data

    _check(
        0.0 < p.flops < 1.0,
        f"prune.flops={p.flops} is outside (0, 1): set prune.flops to a fraction of FLOPs to "
        f"remove, e.g. 0.4",
    )
    _check(len(p.ratios) > 0, "prune.ratios is empty: give the pruning ratios to try, e.g. [0.1, 0.3, 0.5]")
    for r in p.ratios:
        _check(0.0 < r < 1.0, f"prune.ratios contains {r}: every ratio must be in (0, 1)")
    _check(p.steps >= 1, f"prune.steps={p.steps} must be >= 1")
    _check(p.round_to >= 1, f"prune.round_to={p.round_to} must be >= 1 (1: any channel count)")
    _check(
        p.sensitivity_samples is None or p.sensitivity_samples >= 1,
        f"prune.sensitivity_samples={p.sensitivity_samples} must be >= 1 or null (all val images)",
    )
    _check(p.max_loss is None or p.max_loss > 0, f"prune.max_loss={p.max_loss} must be > 0 or null")

    _check(t.epochs_before >= 1, f"trainer.epochs_before={t.epochs_before} must be >= 1 (pruning needs a trained net)")
    _check(t.epochs_after >= 0, f"trainer.epochs_after={t.epochs_after} must be >= 0")
    epochs = t.epochs_before + t.epochs_after
    if p.at_epoch is not None:
        _check(
            0 <= p.at_epoch < epochs,
            f"prune.at_epoch={p.at_epoch} must be in [0, {epochs - 1}] (0-based, within "
            f"trainer.epochs_before + trainer.epochs_after = {epochs} epochs), or null for "
            f"trainer.epochs_before - 1",
        )
    for key in ("batch_size", "eval_batch_size", "log_freq"):
        _check(t[key] >= 1, f"trainer.{key}={t[key]} must be >= 1")
    _check(t.num_workers >= 0, f"trainer.num_workers={t.num_workers} must be >= 0")
    _check(t.verbose in (0, 1, 2), f"trainer.verbose={t.verbose} must be 0, 1 or 2")
    _check(
        re.fullmatch(r"cpu|gpu(:\d+)?", t.device) is not None,
        f"trainer.device={t.device!r} is not one of cpu, gpu, gpu:N",
    )

    _check(d.num_classes >= 1, f"data.num_classes={d.num_classes} must be >= 1")
    _check(d.image_size >= 8, f"data.image_size={d.image_size} must be >= 8")
    if d.name == "cifar10":
        _check(d.image_size == 32, f"data.image_size={d.image_size}: CIFAR-10 images are 32x32")
    for key in ("train_samples", "val_samples"):
        _check(d[key] is None or d[key] >= 1, f"data.{key}={d[key]} must be >= 1 or null (all)")
    for key in ("train", "val"):
        node = d[key]
        _check(
            isinstance(node, DictConfig) and isinstance(node.get("_target_"), str),
            f"data.{key} needs a _target_ (a function returning a paddle.io.Dataset); "
            f"choose data={'|'.join(_options('data'))}",
        )
        _locate(node._target_, f"data.{key}._target_", "data")

    _check(
        isinstance(typed.model, DictConfig) and isinstance(typed.model.get("_target_"), str),
        "model._target_ is missing: choose model=" + "|".join(_options("model")),
    )
    _locate(typed.model._target_, "model._target_", "model")
    _check(isinstance(typed.optim, DictConfig), "optim is missing: choose optim=" + "|".join(_options("optim")))
    _check_optim(typed.optim)
    return typed


# --------------------------------------------------------------------------------------------
# Measuring inside the single fit: timestamps and evaluations around the pruning callbacks.
# --------------------------------------------------------------------------------------------


def evaluate_net(net: paddle.nn.Layer, dataset: paddle.io.Dataset, batch_size: int) -> Dict[str, float]:
    """Loss, top-1 and top-5 of `net` on `dataset`, leaving the net in the mode it was in.

    A plain loop rather than `paddle.Model.evaluate`: called from `on_epoch_end` inside `fit`,
    `evaluate` would overwrite the `logs` dict that fit passes on to later callbacks (fit's
    `_run_one_epoch` shares a mutable default), and reset `model._test_dataloader`.
    """
    was_training = net.training
    net.eval()
    loss_fn = paddle.nn.CrossEntropyLoss(reduction="sum")
    metric = paddle.metric.Accuracy(topk=(1, 5))
    total_loss, count = 0.0, 0
    loader = paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    try:
        with paddle.no_grad():
            for images, labels in loader:
                logits = net(images)
                total_loss += float(loss_fn(logits, labels))
                count += int(labels.shape[0])
                metric.update(metric.compute(logits, labels))
    finally:
        if was_training:
            net.train()
    top1, top5 = metric.accumulate()
    return {"loss": total_loss / max(count, 1), "top1": float(top1), "top5": float(top5)}


class _TrainSpan(paddle.callbacks.Callback):
    """Mark "start" and "end" of fit."""

    def __init__(self, clock: "PhaseClock") -> None:
        super().__init__()
        self.clock = clock

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.clock.mark("start")

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self.clock.mark("end")


class PhaseClock:
    """Timestamps of the phases of one fit, kept by `_Mark` callbacks placed around the pruners."""

    def __init__(self) -> None:
        self.marks: Dict[str, float] = {}
        self.metrics: Dict[str, Dict[str, float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def span(self, start: str, end: str) -> Optional[float]:
        if start in self.marks and end in self.marks:
            return self.marks[end] - self.marks[start]
        return None


class _Mark(paddle.callbacks.Callback):
    """Record a timestamp (and optionally evaluate) at the end of epoch `at_epoch`.

    Callbacks run in list order, so a `_Mark` before and after each pruning callback brackets it.
    """

    def __init__(
        self,
        clock: PhaseClock,
        name: str,
        at_epoch: int,
        eval_data: Optional[paddle.io.Dataset] = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.clock, self.name, self.at_epoch = clock, name, at_epoch
        self.eval_data, self.batch_size = eval_data, batch_size

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if epoch != self.at_epoch:
            return
        self.clock.mark(self.name)
        if self.eval_data is not None:
            self.clock.metrics[self.name] = evaluate_net(self.model.network, self.eval_data, self.batch_size)
            log.info("%s: %s", self.name, self.clock.metrics[self.name])
            self.clock.mark(self.name + "_evaluated")


# --------------------------------------------------------------------------------------------
# The app.
# --------------------------------------------------------------------------------------------


def resolve_output_dir(cfg: DictConfig) -> str:
    """`cfg.output_dir` if set, else Hydra's run dir when under Hydra, else the cwd."""
    if cfg.get("output_dir"):
        out = str(cfg.output_dir)
    elif HydraConfig.initialized():
        out = HydraConfig.get().runtime.output_dir
    else:
        out = os.getcwd()
    os.makedirs(out, exist_ok=True)
    return os.path.abspath(out)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _instantiate_model(cfg: DictConfig) -> paddle.nn.Layer:
    try:
        net = instantiate(cfg.model)
    except Exception as exc:
        keys = ", ".join(k for k in cfg.model if k != "_target_")
        raise ConfigError(
            f"model={cfg.model._target_} could not be built from model.{{{keys}}}: {exc}"
        ) from None
    if not isinstance(net, paddle.nn.Layer):
        raise ConfigError(f"model._target_={cfg.model._target_!r} returned {type(net).__name__}, not a paddle.nn.Layer")
    return net


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, prune at the end of epoch `prune.at_epoch`, fine-tune; report and save results.

    Args:
        cfg: the composed config (see `conf/config.yaml`); `cfg.output_dir` overrides where
            results go (else Hydra's run dir, else the cwd).

    Returns:
        The figures of the results table (also written to `<output_dir>/results.json`).

    Raises:
        ValueError / omegaconf errors: a bad config, before anything is trained.
    """
    cfg = validate_config(cfg)
    t, p, d, cb = cfg.trainer, cfg.prune, cfg.data, cfg.callbacks
    out = resolve_output_dir(cfg)
    at_epoch = p.at_epoch if p.at_epoch is not None else t.epochs_before - 1
    epochs = t.epochs_before + t.epochs_after
    paddle.set_device(t.device)
    seed_everything(t.seed)

    train_ds = subset(instantiate(d.train), d.train_samples, seed=t.seed)
    val_ds = subset(instantiate(d.val), d.val_samples, seed=t.seed)
    net = _instantiate_model(cfg)
    optimizer = instantiate(cfg.optim)(parameters=net.parameters())
    # Imported once the config has proven buildable, so config errors never wait on the engine.
    from prune_callbacks import FilterPruneCallback, PruneVisualDL, SensitivityCallback, export, save_pruned

    size = int(d.image_size)
    input_spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "image")]
    model = paddle.Model(net, inputs=input_spec, labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(optimizer, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(topk=(1, 5)))

    paths = {
        "output_dir": out,
        "vdl_log": os.path.join(out, "vdl_log") if cb.visualdl or cb.training_curves else None,
        "sensitivity": p.sensitivity_file or os.path.join(out, "sensitivity.json"),
        "checkpoint": os.path.join(out, "checkpoint", "pruned") if cb.checkpoint else None,
        "inference_model": os.path.join(out, "inference", "model") if cb.export else None,
        "results": os.path.join(out, RESULTS_FILE),
    }
    input_shape = [1, 3, size, size]
    skip = list(p.skip)
    clock = PhaseClock()
    callbacks: List[paddle.callbacks.Callback] = [
        _TrainSpan(clock),
        _Mark(clock, "before", at_epoch, val_ds, t.eval_batch_size),
    ]
    sensitivity = None
    if p.strategy is Strategy.sensitivity:
        sensitivity = SensitivityCallback(
            val_ds,
            at_epoch=at_epoch,
            ratios=tuple(p.ratios),
            path=paths["sensitivity"],
            num_samples=p.sensitivity_samples,
            batch_size=t.eval_batch_size,
            skip=skip,
            max_loss=p.max_loss,
            criterion=p.criterion.value,
            input_shape=input_shape,
        )
        callbacks.append(sensitivity)
    else:
        paths["sensitivity"] = None
    callbacks.append(_Mark(clock, "sensitivity_done", at_epoch))
    pruner = FilterPruneCallback(
        flops=p.flops,
        at_epoch=at_epoch,
        criterion=p.criterion.value,
        skip=skip,
        sensitivity=sensitivity,
        strategy=p.strategy.value,
        round_to=p.round_to,
        steps=p.steps,
        input_shape=input_shape,
    )
    callbacks += [pruner, _Mark(clock, "pruned", at_epoch, val_ds, t.eval_batch_size)]
    if cb.visualdl:
        callbacks.append(PruneVisualDL(paths["vdl_log"]))
    if cb.training_curves:
        callbacks.append(paddle.callbacks.VisualDL(os.path.join(paths["vdl_log"], "training")))

    log.info("training %s on %s for %d epochs, pruning at the end of epoch %d; output in %s",
             cfg.model._target_, d.name, epochs, at_epoch, out)
    model.fit(
        train_ds,
        val_ds,
        epochs=epochs,
        batch_size=t.batch_size,
        eval_freq=1,
        log_freq=t.log_freq,
        verbose=t.verbose,
        num_workers=t.num_workers,
        shuffle=True,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    final = evaluate_net(net, val_ds, t.eval_batch_size)
    eval_time = time.perf_counter() - t0

    plans = list(getattr(pruner, "plans", None) or [])
    if not plans:
        raise RuntimeError(
            f"FilterPruneCallback did not prune (no plan after {epochs} epochs, at_epoch={at_epoch})"
        )
    if paths["checkpoint"]:
        save_pruned(model, paths["checkpoint"], plans)
    if paths["inference_model"]:
        export(net, paths["inference_model"], input_spec)

    before = clock.metrics.get("before", {})
    pruned = clock.metrics.get("pruned", {})
    first, last = plans[0], plans[-1]
    results: Dict[str, Any] = {
        "model": str(cfg.model._target_).rsplit(".", 1)[-1],
        "data": d.name,
        "criterion": p.criterion.value,
        "strategy": p.strategy.value,
        "at_epoch": at_epoch,
        "epochs_before": t.epochs_before,
        "epochs_after": t.epochs_after,
        "train_samples": len(train_ds),
        "val_samples": len(val_ds),
        "flops_target": p.flops,
        "flops_before": int(first.flops_before),
        "flops_after": int(last.flops_after),
        "flops_reduction": 1.0 - last.flops_after / first.flops_before if first.flops_before else 0.0,
        "params_before": int(first.params_before),
        "params_after": int(last.params_after),
        "params_reduction": 1.0 - last.params_after / first.params_before if first.params_before else 0.0,
        "top1_before": before.get("top1"),
        "top5_before": before.get("top5"),
        "top1_pruned": pruned.get("top1"),
        "top5_pruned": pruned.get("top5"),
        "top1_finetuned": final["top1"],
        "top5_finetuned": final["top5"],
        "loss_before": before.get("loss"),
        "loss_pruned": pruned.get("loss"),
        "loss_finetuned": final["loss"],
        "time_train_before_s": clock.span("start", "before"),
        "time_sensitivity_s": clock.span("before_evaluated", "sensitivity_done"),
        "time_prune_s": clock.span("sensitivity_done", "pruned"),
        "time_finetune_s": clock.span("pruned_evaluated", "end"),
        "time_eval_s": (clock.span("before", "before_evaluated") or 0.0)
        + (clock.span("pruned", "pruned_evaluated") or 0.0)
        + eval_time,
        "time_total_s": (clock.span("start", "end") or 0.0) + eval_time,
        "ratios": {k: float(v) for k, v in last.ratios.items()},
        "paths": paths,
    }
    _write_json(paths["results"], results)
    print(format_results(results))
    _append_sweep_row(results)
    return results


# --------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _fmt(value: Optional[float], kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "s":
        return f"{value:.1f} s"
    return f"{int(value):,}"


def format_results(r: Dict[str, Any]) -> str:
    """The plain-text results table printed at the end of a run."""
    rows: List[Tuple[str, str, str, str]] = [
        ("", "before", "after", "reduction"),
        ("FLOPs", _fmt(r["flops_before"], "n"), _fmt(r["flops_after"], "n"),
         f"{_fmt(r['flops_reduction'], 'pct')} (target {_fmt(r['flops_target'], 'pct')})"),
        ("params", _fmt(r["params_before"], "n"), _fmt(r["params_after"], "n"), _fmt(r["params_reduction"], "pct")),
    ]
    acc: List[Tuple[str, str, str, str]] = [
        ("accuracy", "before pruning", "pruned, no fine-tune", "fine-tuned"),
        ("top-1", _fmt(r["top1_before"], "acc"), _fmt(r["top1_pruned"], "acc"), _fmt(r["top1_finetuned"], "acc")),
        ("top-5", _fmt(r["top5_before"], "acc"), _fmt(r["top5_pruned"], "acc"), _fmt(r["top5_finetuned"], "acc")),
    ]
    times = [
        ("train before", r["time_train_before_s"]),
        ("sensitivity", r["time_sensitivity_s"]),
        ("prune", r["time_prune_s"]),
        ("fine-tune", r["time_finetune_s"]),
        ("evaluations", r["time_eval_s"]),
        ("total", r["time_total_s"]),
    ]

    def table(body: Sequence[Tuple[str, ...]]) -> List[str]:
        widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]

    title = (f"Results: {r['model']} on {r['data']}, criterion {r['criterion']}, "
             f"strategy {r['strategy']}, pruned at end of epoch {r['at_epoch']}")
    lines = [title, "=" * len(title)]
    lines += table(rows) + [""] + table(acc) + [""]
    lines += table([("wall time", "")] + [(k, _fmt(v, "s")) for k, v in times]) + [""]
    paths = r["paths"]
    for label, key in (("VisualDL logs", "vdl_log"), ("sensitivity", "sensitivity"),
                       ("pruned checkpoint", "checkpoint"), ("inference model", "inference_model"),
                       ("results", "results")):
        lines.append(f"{label + ':':20s}{paths.get(key) or '(off)'}")
    return "\n".join(lines)


SWEEP_COLUMNS = [
    "job", "override", "model", "data", "criterion", "strategy", "flops_target", "flops_reduction",
    "params_reduction", "top1_before", "top1_pruned", "top1_finetuned", "top5_finetuned",
    "time_sensitivity_s", "time_total_s", "output_dir",
]


def _append_sweep_row(results: Dict[str, Any]) -> None:
    """Under `-m`, add this job's row to `<sweep dir>/results.csv` (locked: launchers may be parallel)."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    import fcntl

    row = {k: results.get(k) for k in SWEEP_COLUMNS}
    row["job"] = hc.job.num
    row["override"] = " ".join(hc.overrides.task)
    row["output_dir"] = results["paths"]["output_dir"]
    path = os.path.join(hc.sweep.dir, SWEEP_CSV)
    os.makedirs(hc.sweep.dir, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def format_sweep(path: str) -> str:
    """The comparison table of a sweep's `results.csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["job"]))
    cols = [("job", "job"), ("override", "override"), ("flops_reduction", "FLOPs -"),
            ("params_reduction", "params -"), ("top1_before", "top1 before"), ("top1_pruned", "top1 pruned"),
            ("top1_finetuned", "top1 tuned"), ("time_total_s", "time s")]

    def cell(key: str, value: str) -> str:
        if value in ("", "None"):
            return "-"
        if key.endswith("reduction"):
            return f"{100 * float(value):.1f}%"
        if key.startswith("top"):
            return f"{float(value):.4f}"
        if key.startswith("time"):
            return f"{float(value):.0f}"
        return value

    # show only the overrides that differ between jobs (the swept ones)
    tokens = [r.get("override", "").split() for r in rows]
    shared = set.intersection(*(set(t) for t in tokens)) if len(tokens) > 1 else set()
    for r, t in zip(rows, tokens):
        r["override"] = " ".join(x for x in t if x not in shared)
    body = [[h for _, h in cols]] + [[cell(k, r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(b[i]) for b in body) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return f"Sweep results ({path})\n" + "\n".join(lines)


class MultirunResultsTable(HydraCallback):
    """Hydra callback: print the sweep's comparison table once every job has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = os.path.join(config.hydra.sweep.dir, SWEEP_CSV)
        if os.path.exists(path):
            print(format_sweep(path))
        else:
            log.warning("no %s in the sweep dir: did every job fail?", path)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as exc:  # a user's mistake: the message says the fix, no traceback
        log.error("config error: %s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    # hydra.callbacks imports `train.MultirunResultsTable`: let that import find this module
    # instead of running the file a second time (which would re-register the schema).
    sys.modules.setdefault("train", sys.modules[__name__])
    main()
