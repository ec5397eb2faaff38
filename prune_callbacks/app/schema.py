"""The app's config: the structured schema Hydra composes against, and `validate_config`.

Only what the pruning callbacks cannot check themselves lives here (unknown keys, types, the
trainer and data ranges, cross-key limits); their own arguments are checked once, by the
callbacks, when `run.build_prune_callbacks` builds them (re-raised naming the config key).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import paddle
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# The repository's conf/ (the app runs from a source checkout): only used to list the options of
# a group in error messages.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class DataConf:
    """A data set pair: `train` and `val` are `_target_` nodes returning a `paddle.io.Dataset`.

    `num_classes` null: taken from the train data set's `classes` (an image folder's class
    folders). `channels` and `image_size` give the network's input shape. `val_fraction`,
    `augment`, `mean` and `std` are read by the data sets that use them (conf/data/folder.yaml).
    """

    name: str = MISSING
    num_classes: Optional[int] = MISSING
    image_size: int = 32
    channels: int = 3
    path: Optional[str] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    val_fraction: float = 0.2
    augment: bool = True
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    train: Any = MISSING
    val: Any = MISSING


@dataclass
class DistillConf:
    """Knowledge distillation after pruning (`DistillCallback`): off while `alpha` is null or 0."""

    alpha: Optional[float] = None
    temperature: float = 4.0
    standardize: bool = True


@dataclass
class SparsityConf:
    """Sparse training before pruning (`SparsityCallback`): off while `kind` is null."""

    kind: Optional[str] = None
    strength: float = 1e-4
    growing: float = 0.0
    start_epoch: int = 0
    method: str = "auto"


@dataclass
class PruneConf:
    """What to prune and how: the arguments of SensitivityCallback and FilterPruneCallback.

    `criterion` is a name from `prune_callbacks.planning.importance`'s registry (`register_criterion`
    adds one) and `strategy` one of `prune_callbacks.planning.allocation.STRATEGIES`; the callbacks check
    both, and every range, when the app builds them.
    """

    flops: Optional[float] = 0.4
    latency: Optional[float] = None
    latency_options: Dict[str, Any] = field(default_factory=dict)
    criterion: str = "l1"
    strategy: str = "sensitivity"
    at_epoch: Optional[int] = None
    steps: int = 1
    skip: List[str] = field(default_factory=list)
    ratios: List[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    round_to: Any = "auto"
    runtime: Optional[str] = None
    layer_norm_widths: bool = True
    latency_aware: bool = False
    sensitivity_samples: Optional[int] = 64
    sensitivity_engine: str = "auto"
    sensitivity_metric: str = "top1"
    sensitivity_file: Optional[str] = None
    max_loss: Optional[float] = None
    distill: DistillConf = field(default_factory=DistillConf)
    sparsity: SparsityConf = field(default_factory=SparsityConf)


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
    resume: Optional[str] = None
    measure_latency: bool = True


@dataclass
class Config:
    """The whole app config.

    `model` and `optim` are `_target_` nodes checked in `validate_config`; `callbacks` maps a
    name to a `_target_` node building a `paddle.callbacks.Callback` (false or null: off).
    """

    model: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    optim: Any = MISSING
    prune: PruneConf = field(default_factory=PruneConf)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    output_dir: Optional[str] = None


# First entry of config.yaml's defaults: composition itself rejects wrong types and unknown keys.
ConfigStore.instance().store(name="config_schema", node=Config)


class ConfigError(ValueError):
    """A config value out of range or an unknown name; the message names the key and the fix."""


def options(group: str) -> List[str]:
    """The config names of a group of conf/ (`model` -> mobilenet_v1, ...), [] if unknown."""
    folder = CONFIG_DIR / group
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _choose(group: str) -> str:
    names = options(group)
    return f"choose {group}=" + "|".join(names) if names else f"set {group}._target_"


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


def locate(target: str, key: str, group: str) -> Any:
    """The callable a `_target_` names, or a ConfigError naming `key` and the group's options."""
    module_name, _, attr = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
        if not callable(found):
            raise TypeError(f"{target} is a {type(found).__name__}, not callable")
        return found
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        names = options(group)
        pick = f"Pick a config from the '{group}' group ({', '.join(names)}), e.g. {group}={names[0]}, " \
            if names else ""
        raise ConfigError(
            f"{key}={target!r} cannot be imported as a callable ({type(exc).__name__}: {exc}). {pick}or give "
            f"the dotted path of a callable (a module next to train.py, in the current directory, or installed)."
        ) from None


def _check_optim(optim: DictConfig) -> None:
    target = optim.get("_target_")
    _check(isinstance(target, str), "optim._target_ is missing: " + _choose("optim"))
    cls = locate(target, "optim._target_", "optim")
    _check(
        isinstance(cls, type) and issubclass(cls, paddle.optimizer.Optimizer),
        f"optim._target_={target!r} is not a paddle.optimizer.Optimizer subclass",
    )
    _check(
        optim.get("_partial_") is True,
        "optim._partial_ must be true: the optimizer is built over net.parameters() by the app "
        "and rebuilt over the pruned parameters",
    )
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "parameters")]
    for key in optim:
        if key in ("_target_", "_partial_"):
            continue
        _check(key in allowed, f"optim.{key} is not an argument of {target}; allowed: {', '.join(allowed)}")
    lr = optim.get("learning_rate")
    _check(
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
        f"optim.learning_rate={lr!r} must be a positive number, e.g. 0.02",
    )


def _check_trainer(t: DictConfig, p: DictConfig) -> None:
    _check(t.epochs_before >= 1, f"trainer.epochs_before={t.epochs_before} must be >= 1 (pruning needs a trained net)")
    _check(t.epochs_after >= 0, f"trainer.epochs_after={t.epochs_after} must be >= 0")
    epochs = t.epochs_before + t.epochs_after
    # The callbacks only learn the epoch count inside fit: check the cross-key limit here.
    if p.at_epoch is not None:
        _check(
            p.at_epoch < epochs,
            f"prune.at_epoch={p.at_epoch} must be in [0, {epochs - 1}] (0-based, within "
            f"trainer.epochs_before + trainer.epochs_after = {epochs} epochs), or null for "
            f"trainer.epochs_before - 1",
        )
    at = p.at_epoch if p.at_epoch is not None else t.epochs_before - 1
    last = at + p.steps - 1
    _check(
        p.steps < 1 or last < epochs,  # steps < 1: FilterPruneCallback names the argument
        f"prune.steps={p.steps}: pruning at the end of epochs {at}..{last} runs past the last epoch "
        f"{epochs - 1} (trainer.epochs_before + trainer.epochs_after = {epochs}); lower prune.steps "
        f"or prune.at_epoch, or raise trainer.epochs_after to at least {last + 1 - t.epochs_before}",
    )
    # No callback argument takes max_loss's range (SensitivityCallback checks its type only).
    _check(p.max_loss is None or p.max_loss > 0, f"prune.max_loss={p.max_loss} must be > 0 or null")
    for key in ("batch_size", "eval_batch_size", "log_freq"):
        _check(t[key] >= 1, f"trainer.{key}={t[key]} must be >= 1")
    _check(t.num_workers >= 0, f"trainer.num_workers={t.num_workers} must be >= 0")
    _check(t.verbose in (0, 1, 2), f"trainer.verbose={t.verbose} must be 0, 1 or 2")
    _check(
        re.fullmatch(r"cpu|gpu(:\d+)?", t.device) is not None,
        f"trainer.device={t.device!r} is not one of cpu, gpu, gpu:N",
    )
    _check_device(t.device)


def _check_device(device: str) -> None:
    """A GPU asked of a build or machine without one stops here, not in `paddle.set_device`."""
    if not device.startswith("gpu"):
        return
    _check(
        paddle.device.is_compiled_with_cuda(),
        f"trainer.device={device!r}: this Paddle build has no CUDA support (a CPU-only paddlepaddle); "
        f"use trainer.device=cpu, or install paddlepaddle-gpu",
    )
    count = paddle.device.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    _check(index < count, f"trainer.device={device!r}: this machine has {count} GPU(s) (gpu:0..gpu:{count - 1}); "
                          f"choose one of them or trainer.device=cpu")


def _check_data(d: DictConfig) -> None:
    _check(d.num_classes is None or d.num_classes >= 1,
           f"data.num_classes={d.num_classes} must be >= 1, or null to take the classes from the data set")
    _check(d.image_size >= 8, f"data.image_size={d.image_size} must be >= 8")
    _check(d.channels >= 1, f"data.channels={d.channels} must be >= 1 (3: RGB, 1: grayscale)")
    _check(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1), e.g. 0.2")
    if d.name == "cifar10":
        _check(d.image_size == 32, f"data.image_size={d.image_size}: CIFAR-10 images are 32x32")
    for key in ("train_samples", "val_samples"):
        _check(d[key] is None or d[key] >= 1, f"data.{key}={d[key]} must be >= 1 or null (all)")
    for key in ("train", "val"):
        node = d[key]
        _check(
            isinstance(node, DictConfig) and isinstance(node.get("_target_"), str),
            f"data.{key} needs a _target_ (a function returning a paddle.io.Dataset); {_choose('data')}",
        )
        locate(node._target_, f"data.{key}._target_", "data")


def _check_callbacks(callbacks: DictConfig) -> None:
    for name, node in callbacks.items():
        if node is None or node is False:  # `callbacks.<name>=false`: turned off
            continue
        _check(
            isinstance(node, DictConfig) and isinstance(node.get("_target_"), str),
            f"callbacks.{name}={node!r} is neither a config with a _target_ (a paddle.callbacks.Callback) "
            f"nor false/null (off); to turn one on select its config, e.g. 'callbacks=[default,{name}]' "
            f"(configs: {', '.join(options('callbacks'))})",
        )
        locate(node._target_, f"callbacks.{name}._target_", "callbacks")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Type-check `cfg` against `Config` and check what the callbacks do not, before anything is built.

    Args:
        cfg: a composed config (from `@hydra.main` or `hydra.compose`) or any DictConfig.

    Returns:
        The config merged onto the schema, in struct mode.

    Raises:
        omegaconf.errors.ValidationError / ConfigKeyError: a wrong type or an unknown key
            (the message names the full key).
        ConfigError (a ValueError): a value out of range, an unknown name or an unknown key
            added with `+`; the message names the key, the value and what is allowed.

    Examples:
        >>> cfg = validate_config(compose(config_name="config", overrides=["prune.flops=0.5"]))
    """
    # Through a plain container, so a config typed by any schema (or none) merges the same way.
    raw = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg
    # Unknown keys first, with the allowed ones listed (OmegaConf's merge would only name the key).
    _check_known_keys(raw, Config, "")
    for key, schema in (("data", DataConf), ("prune", PruneConf), ("trainer", TrainerConf)):
        if isinstance(raw.get(key), Mapping):
            _check_known_keys(raw[key], schema, key + ".")
    if isinstance(raw.get("prune"), Mapping) and isinstance(raw["prune"].get("distill"), Mapping):
        _check_known_keys(raw["prune"]["distill"], DistillConf, "prune.distill.")
    if isinstance(raw.get("prune"), Mapping) and isinstance(raw["prune"].get("sparsity"), Mapping):
        _check_known_keys(raw["prune"]["sparsity"], SparsityConf, "prune.sparsity.")
    typed = OmegaConf.merge(OmegaConf.structured(Config), raw)
    OmegaConf.set_struct(typed, True)
    _check_trainer(typed.trainer, typed.prune)
    _check_data(typed.data)
    _check(isinstance(typed.model, DictConfig) and isinstance(typed.model.get("_target_"), str),
           "model._target_ is missing: " + _choose("model"))
    locate(typed.model._target_, "model._target_", "model")
    _check(isinstance(typed.optim, DictConfig), "optim is missing: " + _choose("optim"))
    _check_optim(typed.optim)
    _check_callbacks(typed.callbacks)
    return typed
