"""`train(cfg)`: build the data, model, optimizer and callbacks a config describes, fit once, report.

Composes the engine's callbacks and the app's measurements; it holds no pruning logic and no
range checks the callbacks already make (it re-raises theirs with the config key). Under
`paddle.distributed.launch` every rank trains; only rank 0 creates the output dir, writes and prints.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import paddle
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..training import distributed
from ..utils.errors import argument_of
from ..utils.files import directory_problem
from ..callbacks import DistillCallback, FilterPruneCallback, SensitivityCallback
from ..callbacks.sparsity import SparsityCallback
from ..datasets.bundled import subset
from ..deploy.io import load_pruned
from ..planning.plans import PrunePlan, recorded_plans
from .artefacts import ResumePoint
from .model import build_model, build_network, check_network, input_shape
from .phases import Diverged, DivergenceGuard, PhaseClock, PhaseMark, TrainSpan, evaluate_net
from .report import RESULTS_FILE, append_sweep_row, collect_results, format_results, write_results
from .resume import ResumeState, check_inferred_plans, find_resume_point
from .schema import ConfigError, validate_config
from .timing import exported_latency, run_latency_options

log = logging.getLogger(__name__)

# Argument of SensitivityCallback / FilterPruneCallback / DistillCallback -> the config key that feeds it.
ARGUMENT_KEYS = {
    "flops": "prune.flops", "criterion": "prune.criterion", "strategy": "prune.strategy",
    "at_epoch": "prune.at_epoch", "steps": "prune.steps", "skip": "prune.skip",
    "ratios": "prune.ratios", "round_to": "prune.round_to", "runtime": "prune.runtime",
    "num_samples": "prune.sensitivity_samples",
    "engine": "prune.sensitivity_engine", "metric": "prune.sensitivity_metric",
    "path": "prune.sensitivity_file", "max_loss": "prune.max_loss",
    "batch_size": "trainer.eval_batch_size", "input_shape": "data.image_size", "eval_data": "data.val",
    "alpha": "prune.distill.alpha", "temperature": "prune.distill.temperature",
    "latency": "prune.latency", "latency_aware": "prune.latency_aware", "sensitivity": "prune.strategy",
    "standardize": "prune.distill.standardize", "kind": "prune.sparsity.kind",
    "strength": "prune.sparsity.strength", "growing": "prune.sparsity.growing",
    "start_epoch": "prune.sparsity.start_epoch", "method": "prune.sparsity.method",
}


def app_rank() -> int:
    """This process's rank: from the parallel environment once paddle set it up, else from the
    launcher's `PADDLE_TRAINER_ID` (the app needs it before `paddle.Model` initialises it)."""
    if distributed.world_size() > 1:
        return distributed.rank()
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


@dataclass
class Run:
    """What one `train(cfg)` builds and measures; `report.collect_results` reads it.

    `at_epoch` and `epochs` count from the start of the whole run; a resumed run's fit starts at
    epoch `start_epoch` of it (`resume`), so its callbacks get `at_epoch - start_epoch`.
    """

    out: str
    at_epoch: int
    epochs: int
    train_ds: paddle.io.Dataset
    val_ds: paddle.io.Dataset
    clock: PhaseClock = field(default_factory=PhaseClock)
    callbacks: List[paddle.callbacks.Callback] = field(default_factory=list)
    pruner: Optional[FilterPruneCallback] = None
    distill: Optional[DistillCallback] = None
    paths: Dict[str, Optional[str]] = field(default_factory=dict)
    resume: Optional[ResumeState] = None
    diverged: Optional[Diverged] = None
    latency: Optional[Dict[str, Any]] = None  # the exported model's measured latency (`timing`)

    @property
    def start_epoch(self) -> int:
        return self.resume.epochs_done if self.resume else 0

    @property
    def plans(self) -> List[PrunePlan]:
        """The plans of the whole run: a resumed checkpoint's, then this fit's."""
        done = list(self.resume.plans) if self.resume else []
        # a pruning continued between steps holds the resumed plans too (the same objects)
        own = [p for p in getattr(self.pruner, "plans", None) or [] if not any(p is d for d in done)]
        return done + own


def _trainers() -> int:
    """Processes in a `paddle.distributed.launch` (or spawn) job, from the launcher's environment."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)


def _unwritable(out: str) -> Optional[str]:
    """Why `out` cannot be the output dir (created if missing), or None."""
    exc = directory_problem(out)
    if exc is None:
        return None
    return (f"output_dir={out!r} cannot be written ({type(exc).__name__}: {exc.strerror or exc}); "
            f"choose a writable directory with output_dir=... (or hydra.run.dir=...)")


def resolve_output_dir(cfg: DictConfig) -> str:
    """`cfg.output_dir` if set, else Hydra's run dir when under Hydra, else the cwd (absolute).

    Rank 0 creates it and checks that it can write there; under several processes every rank
    takes rank 0's answer (its Hydra run dir: the other ranks' differ, see train.py).

    Raises:
        ConfigError: the directory cannot be created or written (on every rank).
    """
    if cfg.get("output_dir"):
        out = str(cfg.output_dir)
    elif HydraConfig.initialized():
        out = HydraConfig.get().runtime.output_dir
    else:
        out = os.getcwd()
    out = os.path.abspath(os.path.expanduser(out))
    problem = _unwritable(out) if app_rank() == 0 else None
    if _trainers() > 1:
        paddle.distributed.init_parallel_env()  # paddle.Model would do it later; the ranks must agree now
        out, problem = distributed.all_gather((out, problem))[0]
    if problem:
        raise ConfigError(problem)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def as_config_error(exc: Exception, cfg: DictConfig, what: str) -> ConfigError:
    """A callback's ValueError/TypeError as a ConfigError naming the config key of the bad argument.

    The callbacks tag their errors with the argument they are about (`utils.errors`); `what`
    (e.g. "prune") names the section when an error carries no argument the app knows.
    """
    key = ARGUMENT_KEYS.get(argument_of(exc) or "")
    if key is None:
        return ConfigError(f"{what}: {exc}")
    return ConfigError(f"{key}={_value(cfg, key)!r}: {exc}")


def _sensitivity_path(cfg: DictConfig, run: Run) -> str:
    """`prune.sensitivity_file`, else a resumed run's (its analysis may be partial), else the run dir's."""
    earlier = (run.resume.state.get("sensitivity") if run.resume else None)
    if cfg.prune.sensitivity_file:
        return str(cfg.prune.sensitivity_file)
    if earlier and os.path.isfile(earlier):
        return earlier
    return os.path.join(run.out, "sensitivity.json")


def build_prune_callbacks(cfg: DictConfig, run: Run) -> List[paddle.callbacks.Callback]:
    """SensitivityCallback (strategy "sensitivity"), FilterPruneCallback and DistillCallback
    (`prune.distill.alpha`), bracketed by phase marks; none when a resumed run is already pruned.

    Raises:
        ConfigError: a callback refused an argument; the message names its config key.
    """
    p, t = cfg.prune, cfg.trainer
    run.paths["sensitivity"] = None
    if run.resume is not None and 0 < run.resume.steps_done < p.steps:  # between two gradual steps
        return [TrainSpan(run.clock), _continue_pruning(cfg, run)]
    if run.resume is not None and (run.resume.plans or run.resume.steps_done):
        if p.distill.alpha:
            log.warning("prune.distill.alpha=%s ignored: the resumed checkpoint is already pruned, and "
                        "distillation's teacher is the network just before pruning", p.distill.alpha)
        return [TrainSpan(run.clock)]
    at = run.at_epoch - run.start_epoch  # this fit's epoch numbering
    shape = input_shape(cfg)
    sensitivity = None
    try:
        if p.strategy == "sensitivity":
            run.paths["sensitivity"] = _sensitivity_path(cfg, run)
            sensitivity = SensitivityCallback(
                run.val_ds, at_epoch=at, ratios=tuple(p.ratios), path=run.paths["sensitivity"],
                num_samples=p.sensitivity_samples, batch_size=t.eval_batch_size, skip=list(p.skip),
                max_loss=p.max_loss, criterion=p.criterion, input_shape=shape,
                engine=p.sensitivity_engine, metric=p.sensitivity_metric,
                layer_norm_widths=p.layer_norm_widths)
        run.pruner = FilterPruneCallback(
            flops=None if p.latency is not None else p.flops, latency=p.latency,
            latency_options=run_latency_options(cfg), at_epoch=at,
            criterion=p.criterion, skip=list(p.skip),
            sensitivity=sensitivity, strategy=p.strategy, round_to=p.round_to, steps=p.steps,
            input_shape=shape, runtime=p.runtime, layer_norm_widths=p.layer_norm_widths,
            latency_aware=p.latency_aware)
        if p.distill.alpha:
            run.distill = DistillCallback(alpha=p.distill.alpha, temperature=p.distill.temperature,
                                          standardize=p.distill.standardize)
        sparsity_cb = None
        if p.sparsity.kind:  # regularised until the pruning step
            sparsity_cb = SparsityCallback(
                kind=p.sparsity.kind, strength=p.sparsity.strength, growing=p.sparsity.growing,
                start_epoch=p.sparsity.start_epoch, method=p.sparsity.method, skip=list(p.skip),
                input_shape=shape)
    except (ValueError, TypeError) as exc:
        raise as_config_error(exc, cfg, "prune") from None
    clock, val, bs = run.clock, run.val_ds, t.eval_batch_size
    marks: List[paddle.callbacks.Callback] = [TrainSpan(clock), PhaseMark(clock, "before", at, val, bs)]
    marks += [sensitivity] if sensitivity is not None else []
    marks += [sparsity_cb] if sparsity_cb is not None else []
    marks += [PhaseMark(clock, "sensitivity_done", at), run.pruner]
    marks += [run.distill] if run.distill is not None else []
    return marks + [PhaseMark(clock, "pruned", at, val, bs)]


def _continue_pruning(cfg: DictConfig, run: Run) -> FilterPruneCallback:
    """The FilterPruneCallback of a run resumed between two of its `prune.steps` steps: the
    remaining steps move toward the final plan saved in the resume point (no new analysis)."""
    p = cfg.prune
    try:
        run.pruner = FilterPruneCallback(at_epoch=0, criterion=p.criterion, skip=list(p.skip),
                                         strategy="uniform", round_to=p.round_to, steps=p.steps,
                                         input_shape=input_shape(cfg))
        run.pruner.continue_from(run.resume.plans, run.resume.state["prune_steps"],
                                 run.at_epoch + run.resume.steps_done - run.start_epoch)
    except (ValueError, TypeError) as exc:
        raise as_config_error(exc, cfg, "trainer.resume") from None
    log.info("continuing a %d-step pruning after step %d", p.steps, run.resume.steps_done)
    return run.pruner


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


def _final(save_dir: Optional[str]) -> Optional[str]:
    return None if save_dir is None else os.path.join(save_dir, "final")


def artefact_paths(cfg: DictConfig, out: str) -> Dict[str, Optional[str]]:
    """Where the built-in callbacks of conf/callbacks/ write, for the results table (None: off)."""

    def arg(name: str, key: str) -> Optional[str]:
        node = cfg.callbacks.get(name)
        return str(node[key]) if isinstance(node, DictConfig) and node.get(key) else None

    curves = arg("training_curves", "log_dir")
    return {"vdl_log": arg("visualdl", "log_dir") or (os.path.dirname(curves) if curves else None),
            "checkpoint": _final(arg("checkpoint", "save_dir")), "inference_model": arg("export", "path"),
            "resume": arg("resume", "path")}


def build_datasets(cfg: DictConfig) -> tuple[paddle.io.Dataset, paddle.io.Dataset]:
    """`data.train` and `data.val`, subset to `data.*_samples`; `data.num_classes` from the train
    set's `classes` (an image folder's class folders) when it is null.

    Raises:
        ConfigError: a data set could not be built, or the class count is unknown or contradicts
            `data.num_classes`.
    """
    d, seed = cfg.data, cfg.trainer.seed
    built = []
    for key in ("train", "val"):
        try:
            built.append(instantiate(d[key]))
        except InstantiationException as exc:
            cause = exc.__cause__ or exc
            path = f" (data.path={d.path!r})" if d.path else ""
            raise ConfigError(f"data.{key} ({d[key]._target_}) could not be built{path}: "
                              f"{type(cause).__name__}: {cause}") from None
    classes = getattr(built[0], "classes", None)
    if classes is not None:
        if d.num_classes is not None and d.num_classes != len(classes):
            raise ConfigError(f"data.num_classes={d.num_classes}, but the data set has {len(classes)} classes "
                              f"({', '.join(map(str, classes[:10]))}{' ...' if len(classes) > 10 else ''}); "
                              f"set data.num_classes=null to take them from the data")
        d.num_classes = len(classes)
        log.info("%d classes: %s", len(classes), ", ".join(map(str, classes[:20])))
    if d.num_classes is None:
        raise ConfigError(f"data.num_classes is null and data.train ({d.train._target_}) has no `classes`; "
                          f"set data.num_classes")
    return (subset(built[0], d.train_samples, seed=seed), subset(built[1], d.val_samples, seed=seed))


def prepare(cfg: DictConfig) -> Run:
    """Output dir, device, seed, data sets and every callback: all config errors surface here."""
    resume = find_resume_point(cfg)
    out = resolve_output_dir(cfg)
    with open_dict(cfg):
        cfg.output_dir = out  # conf/callbacks/*.yaml write under ${output_dir}
    t = cfg.trainer
    paddle.set_device(t.device)
    seed_everything(t.seed)
    train_ds, val_ds = build_datasets(cfg)
    run = Run(out=out, at_epoch=cfg.prune.at_epoch if cfg.prune.at_epoch is not None else t.epochs_before - 1,
              epochs=t.epochs_before + t.epochs_after, train_ds=train_ds, val_ds=val_ds, resume=resume)
    if resume is not None:
        run.clock.metrics.update(resume.state.get("metrics") or {})
    run.paths = {"output_dir": out, "vdl_log": None, "sensitivity": None, "checkpoint": None,
                 "inference_model": None, "resume": None, "results": os.path.join(out, RESULTS_FILE)}
    run.callbacks = [DivergenceGuard(run.start_epoch)] + build_prune_callbacks(cfg, run) + build_callbacks(cfg)
    for callback in run.callbacks:
        if isinstance(callback, ResumePoint):
            callback.offset = run.start_epoch
            callback.extra = lambda: {"metrics": run.clock.metrics, "sensitivity": run.paths["sensitivity"],
                                      "prune_steps": getattr(run.pruner, "resume_state", lambda: None)()}
    run.paths.update(artefact_paths(cfg, out))
    return run


def build_checked_model(cfg: DictConfig, run: Run) -> paddle.Model:
    """The prepared model, its network checked against the data's input shape and `prune.skip`,
    and a resumed run's checkpoint loaded (plans, weights, optimizer state).

    Raises:
        ConfigError: any of those does not fit; nothing has been trained.
    """
    net = build_network(cfg)
    if run.pruner is not None:
        check_network(net, cfg, list(cfg.prune.skip))
    model = build_model(cfg, net)
    if run.resume is not None:
        try:
            load_pruned(model, run.resume.prefix)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"trainer.resume={cfg.trainer.resume!r}: {exc}") from None
        if run.resume.from_shapes:  # no plan file: the plan load_pruned read from the shapes
            run.resume = dataclasses.replace(run.resume, plans=check_inferred_plans(
                cfg, run.resume, recorded_plans(model.network)))
        log.info("resumed %s after %d epoch(s), %d pruning plan(s)", run.resume.prefix,
                 run.resume.epochs_done, len(run.resume.plans))
    return model


def fit(model: paddle.Model, cfg: DictConfig, run: Run) -> None:
    """`model.fit` over the epochs left; a non-finite loss ends it early and sets `run.diverged`."""
    t = cfg.trainer
    try:
        model.fit(run.train_ds, run.val_ds, epochs=run.epochs - run.start_epoch, batch_size=t.batch_size,
                  eval_freq=1, log_freq=t.log_freq, verbose=t.verbose, num_workers=t.num_workers, shuffle=True,
                  callbacks=run.callbacks)
    except Diverged as exc:
        run.diverged = exc
        run.clock.mark("end")  # fit's on_train_end never came
        log.error("training diverged: %s; nothing after it was trained, pruned or saved. Lower "
                  "optim.learning_rate (now %s)", exc, cfg.optim.learning_rate)


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, prune at the end of epoch `prune.at_epoch`, fine-tune; report and save results.

    Args:
        cfg: the composed config (see `conf/config.yaml`); `cfg.output_dir` overrides where
            results go (else Hydra's run dir, else the cwd).

    Returns:
        The figures of the results table (also written to `<output_dir>/results.json` by rank 0).
        `results["diverged"]` is null, or where the loss became non-finite (then the run stopped
        there, and the figures it did not reach are null).

    Raises:
        ConfigError / omegaconf errors: a bad config, before anything is trained.
        RuntimeError: fit ended without pruning (e.g. an EarlyStopping stopped it first).

    Examples:
        >>> results = train(compose(config_name="config", overrides=["prune.flops=0.5"]))
    """
    cfg = validate_config(cfg)
    run = prepare(cfg)
    model = build_checked_model(cfg, run)
    log.info("training %s on %s for %d epochs%s, pruning at the end of epoch %d; output in %s",
             cfg.model._target_, cfg.data.name, run.epochs,
             f" (resumed at epoch {run.start_epoch})" if run.resume else "", run.at_epoch, run.out)
    fit(model, cfg, run)
    sens = next((c for c in run.callbacks if isinstance(c, SensitivityCallback)), None)
    if getattr(sens, "fallbacks", None):  # the analysis fell back: its file is another, or none
        run.paths["sensitivity"] = sens.result_path
    final, eval_time = None, 0.0
    if run.diverged is None:
        if not run.plans:
            raise RuntimeError(f"FilterPruneCallback did not prune (no plan after {run.epochs} epochs, "
                               f"at_epoch={run.at_epoch})")
        t0 = time.perf_counter()
        final = evaluate_net(model.network, run.val_ds, cfg.trainer.eval_batch_size)
        eval_time = time.perf_counter() - t0
        if app_rank() == 0:
            run.latency = exported_latency(cfg, model.network)
    results = collect_results(cfg, run, final, eval_time)
    if app_rank() == 0:
        write_results(run.paths["results"], results)
        print(format_results(results))  # the app's output: the table, on stdout
        append_sweep_row(results)
    return results
