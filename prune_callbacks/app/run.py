"""`train(cfg)`: build the data, model, optimizer and callbacks a config describes, fit once, report.

Composes the engine's callbacks and the app's measurements; it holds no pruning logic and no
range checks the callbacks already make (it re-raises theirs with the config key).
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import paddle
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..callbacks import FilterPruneCallback, SensitivityCallback
from ..data import subset
from ..plan import PrunePlan
from .phases import PhaseClock, PhaseMark, TrainSpan, evaluate_net
from .report import RESULTS_FILE, append_sweep_row, collect_results, format_results, write_results
from .schema import ConfigError, validate_config

log = logging.getLogger(__name__)

# Argument of SensitivityCallback / FilterPruneCallback -> the config key that feeds it.
ARGUMENT_KEYS = {
    "flops": "prune.flops", "criterion": "prune.criterion", "strategy": "prune.strategy",
    "at_epoch": "prune.at_epoch", "steps": "prune.steps", "skip": "prune.skip",
    "ratios": "prune.ratios", "round_to": "prune.round_to", "num_samples": "prune.sensitivity_samples",
    "path": "prune.sensitivity_file", "max_loss": "prune.max_loss",
    "batch_size": "trainer.eval_batch_size", "input_shape": "data.image_size", "eval_data": "data.val",
}


@dataclass
class Run:
    """What one `train(cfg)` builds and measures; `report.collect_results` reads it."""

    out: str
    at_epoch: int
    epochs: int
    train_ds: paddle.io.Dataset
    val_ds: paddle.io.Dataset
    clock: PhaseClock = field(default_factory=PhaseClock)
    callbacks: List[paddle.callbacks.Callback] = field(default_factory=list)
    pruner: Optional[FilterPruneCallback] = None
    paths: Dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def plans(self) -> List[PrunePlan]:
        return list(getattr(self.pruner, "plans", None) or [])


def resolve_output_dir(cfg: DictConfig) -> str:
    """`cfg.output_dir` if set, else Hydra's run dir when under Hydra, else the cwd (created, absolute)."""
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


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def as_config_error(exc: Exception, cfg: DictConfig, what: str) -> ConfigError:
    """A callback's ValueError/TypeError as a ConfigError naming the config key of the bad argument.

    The callbacks name the argument in their messages; the first argument named there is taken
    as the culprit, `what` (e.g. "prune") when none is.
    """
    message = str(exc)
    named = [(m.start(), arg) for arg in ARGUMENT_KEYS if (m := re.search(rf"\b{arg}\b", message))]
    if not named:
        return ConfigError(f"{what}: {message}")
    key = ARGUMENT_KEYS[min(named)[1]]
    return ConfigError(f"{key}={_value(cfg, key)!r}: {message}")


def build_prune_callbacks(cfg: DictConfig, run: Run) -> List[paddle.callbacks.Callback]:
    """SensitivityCallback (strategy "sensitivity") and FilterPruneCallback, bracketed by phase marks.

    Raises:
        ConfigError: a callback refused an argument; the message names its config key.
    """
    p, t, size = cfg.prune, cfg.trainer, int(cfg.data.image_size)
    input_shape = [1, 3, size, size]
    sensitivity = None
    run.paths["sensitivity"] = None
    try:
        if p.strategy == "sensitivity":
            run.paths["sensitivity"] = p.sensitivity_file or os.path.join(run.out, "sensitivity.json")
            sensitivity = SensitivityCallback(
                run.val_ds, at_epoch=run.at_epoch, ratios=tuple(p.ratios), path=run.paths["sensitivity"],
                num_samples=p.sensitivity_samples, batch_size=t.eval_batch_size, skip=list(p.skip),
                max_loss=p.max_loss, criterion=p.criterion, input_shape=input_shape)
        run.pruner = FilterPruneCallback(
            flops=p.flops, at_epoch=run.at_epoch, criterion=p.criterion, skip=list(p.skip),
            sensitivity=sensitivity, strategy=p.strategy, round_to=p.round_to, steps=p.steps,
            input_shape=input_shape)
    except (ValueError, TypeError) as exc:
        raise as_config_error(exc, cfg, "prune") from None
    clock, val, bs = run.clock, run.val_ds, t.eval_batch_size
    marks: List[paddle.callbacks.Callback] = [TrainSpan(clock), PhaseMark(clock, "before", run.at_epoch, val, bs)]
    marks += [sensitivity] if sensitivity is not None else []
    return marks + [PhaseMark(clock, "sensitivity_done", run.at_epoch), run.pruner,
                    PhaseMark(clock, "pruned", run.at_epoch, val, bs)]


def build_callbacks(cfg: DictConfig) -> List[paddle.callbacks.Callback]:
    """The callbacks of `cfg.callbacks` (conf/callbacks/), in config order; false/null entries are off.

    Raises:
        ConfigError: one could not be built or is not a `paddle.callbacks.Callback`.
    """
    built = []
    for name, node in cfg.callbacks.items():
        if node is None or node is False:
            continue
        try:
            callback = instantiate(node)
        except InstantiationException as exc:
            raise ConfigError(f"callbacks.{name} ({node._target_}) could not be built: {exc}") from None
        if not isinstance(callback, paddle.callbacks.Callback):
            raise ConfigError(f"callbacks.{name}._target_={node._target_!r} returned "
                              f"{type(callback).__name__}, not a paddle.callbacks.Callback")
        built.append(callback)
    return built


def artefact_paths(cfg: DictConfig, out: str) -> Dict[str, Optional[str]]:
    """Where the built-in callbacks of conf/callbacks/ write, for the results table (None: off)."""

    def arg(name: str, key: str) -> Optional[str]:
        node = cfg.callbacks.get(name)
        return str(node[key]) if isinstance(node, DictConfig) and node.get(key) else None

    curves = arg("training_curves", "log_dir")
    return {"vdl_log": arg("visualdl", "log_dir") or (os.path.dirname(curves) if curves else None),
            "checkpoint": arg("checkpoint", "path"), "inference_model": arg("export", "path")}


def build_model(cfg: DictConfig) -> paddle.Model:
    """The network of `cfg.model` in a `paddle.Model`, prepared with `cfg.optim` over its parameters."""
    try:
        net = instantiate(cfg.model)
    except Exception as exc:
        keys = ", ".join(k for k in cfg.model if k != "_target_")
        raise ConfigError(f"model={cfg.model._target_} could not be built from model.{{{keys}}}: {exc}") from None
    if not isinstance(net, paddle.nn.Layer):
        raise ConfigError(f"model._target_={cfg.model._target_!r} returned {type(net).__name__}, not a paddle.nn.Layer")
    optimizer = instantiate(cfg.optim)(parameters=net.parameters())
    size = int(cfg.data.image_size)
    model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 3, size, size], "float32", "image")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(optimizer, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(topk=(1, 5)))
    return model


def prepare(cfg: DictConfig) -> Run:
    """Output dir, device, seed, data sets and every callback: all config errors surface here."""
    out = resolve_output_dir(cfg)
    with open_dict(cfg):
        cfg.output_dir = out  # conf/callbacks/*.yaml write under ${output_dir}
    t, d = cfg.trainer, cfg.data
    paddle.set_device(t.device)
    seed_everything(t.seed)
    run = Run(out=out, at_epoch=cfg.prune.at_epoch if cfg.prune.at_epoch is not None else t.epochs_before - 1,
              epochs=t.epochs_before + t.epochs_after,
              train_ds=subset(instantiate(d.train), d.train_samples, seed=t.seed),
              val_ds=subset(instantiate(d.val), d.val_samples, seed=t.seed))
    run.paths = {"output_dir": out, "vdl_log": None, "sensitivity": None, "checkpoint": None,
                 "inference_model": None, "results": os.path.join(out, RESULTS_FILE)}
    run.callbacks = build_prune_callbacks(cfg, run) + build_callbacks(cfg)
    run.paths.update(artefact_paths(cfg, out))
    return run


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, prune at the end of epoch `prune.at_epoch`, fine-tune; report and save results.

    Args:
        cfg: the composed config (see `conf/config.yaml`); `cfg.output_dir` overrides where
            results go (else Hydra's run dir, else the cwd).

    Returns:
        The figures of the results table (also written to `<output_dir>/results.json`).

    Raises:
        ConfigError / omegaconf errors: a bad config, before anything is trained.
        RuntimeError: fit ended without pruning (e.g. an EarlyStopping stopped it first).

    Examples:
        >>> results = train(compose(config_name="config", overrides=["prune.flops=0.5"]))
    """
    cfg = validate_config(cfg)
    run = prepare(cfg)
    model = build_model(cfg)
    t = cfg.trainer
    log.info("training %s on %s for %d epochs, pruning at the end of epoch %d; output in %s",
             cfg.model._target_, cfg.data.name, run.epochs, run.at_epoch, run.out)
    model.fit(run.train_ds, run.val_ds, epochs=run.epochs, batch_size=t.batch_size, eval_freq=1,
              log_freq=t.log_freq, verbose=t.verbose, num_workers=t.num_workers, shuffle=True,
              callbacks=run.callbacks)
    t0 = time.perf_counter()
    final = evaluate_net(model.network, run.val_ds, t.eval_batch_size)
    eval_time = time.perf_counter() - t0
    if not run.plans:
        raise RuntimeError(f"FilterPruneCallback did not prune (no plan after {run.epochs} epochs, "
                           f"at_epoch={run.at_epoch})")
    results = collect_results(cfg, run, final, eval_time)
    write_results(run.paths["results"], results)
    print(format_results(results))  # the app's output: the table, on stdout
    append_sweep_row(results)
    return results
