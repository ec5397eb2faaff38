"""Building the app's `paddle.Model`: the network of `cfg.model` (a zoo constructor or the user's own
class), its input spec from the data config, and checks that need the built network.

Every failure here is a ConfigError naming the key, the value and the fix, raised before training.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence

import paddle
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..pruner import FilterPruner
from .schema import CONFIG_DIR, ConfigError

log = logging.getLogger(__name__)

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def input_shape(cfg: DictConfig, batch: Optional[int] = 1) -> List[Optional[int]]:
    """`[batch, data.channels, data.image_size, data.image_size]`: the network's input shape."""
    size = int(cfg.data.image_size)
    return [batch, int(cfg.data.channels), size, size]


def group_defaults(target: str) -> Dict[str, List[Any]]:
    """Arguments that the conf/model/*.yaml of *other* constructors set, with their values.

    A user who swaps only `model._target_` (`model._target_=paddle.vision.models.resnet34`) keeps
    the arguments of the selected config (MobileNet's `scale`); those the new callable refuses
    are dropped when their value is still that config's default.
    """
    found: Dict[str, List[Any]] = {}
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.get("_target_") == target:
            continue
        for key in node:
            if key != "_target_" and not OmegaConf.is_interpolation(node, key):
                found.setdefault(str(key), []).append(node[key])
    return found


def build_network(cfg: DictConfig) -> paddle.nn.Layer:
    """Instantiate `cfg.model`, dropping another config's default arguments the callable refuses.

    Raises:
        ConfigError: the callable failed or returned no `paddle.nn.Layer`; the message names the
            target and every argument it was given.
    """
    node = OmegaConf.to_container(cfg.model, resolve=True)  # a plain dict: arguments can be dropped
    target = str(node["_target_"])
    inherited = group_defaults(target)
    while True:
        try:
            net = instantiate(node)
            break
        except InstantiationException as exc:
            bad = _UNEXPECTED.search(str(exc))
            key = bad.group(1) if bad else None
            if key is None or key not in node or node[key] not in inherited.get(key, []):
                args = {k: v for k, v in node.items() if k != "_target_"}
                raise ConfigError(
                    f"model._target_={target!r} could not be built from model.{{{', '.join(args)}}} "
                    f"({', '.join(f'{k}={v!r}' for k, v in args.items())}): {exc.__cause__ or exc}. Fix the "
                    f"arguments with model.<name>=... (add one with +model.<name>=..., drop one with "
                    f"~model.<name>)") from None
            log.info("model.%s=%r (a default of another model config) is not an argument of %s: dropped",
                     key, node[key], target)
            del node[key]
    if not isinstance(net, paddle.nn.Layer):
        raise ConfigError(f"model._target_={target!r} returned {type(net).__name__}, not a paddle.nn.Layer")
    return net


def build_model(cfg: DictConfig, net: Optional[paddle.nn.Layer] = None) -> paddle.Model:
    """The network of `cfg.model` in a `paddle.Model`, prepared with `cfg.optim` over its parameters.

    The input spec is `[None, data.channels, data.image_size, data.image_size]`.
    """
    net = build_network(cfg) if net is None else net
    optimizer = instantiate(cfg.optim)(parameters=net.parameters())
    model = paddle.Model(net, inputs=[paddle.static.InputSpec(input_shape(cfg, None), "float32", "image")],
                         labels=[paddle.static.InputSpec([None, 1], "int64", "label")])
    model.prepare(optimizer, paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy(topk=(1, 5)))
    return model


def check_network(net: paddle.nn.Layer, cfg: DictConfig, skip: Sequence[str]) -> None:
    """Trace `net` at the data's input shape and look up every `prune.skip` group, before training.

    The pruning callback does the same in `on_train_begin`; doing it here turns a mistake into a
    one-line config error instead of a traceback out of `fit`.

    Raises:
        ConfigError: the network rejects the input shape, or a skip name is no group of it.
    """
    shape = input_shape(cfg)
    try:
        pruner = FilterPruner(net, shape, cfg.prune.criterion)
    except Exception as exc:  # tracing runs the user's forward: any error means "wrong shape or net"
        raise ConfigError(
            f"model._target_={cfg.model._target_!r} could not be traced at input shape {shape} "
            f"(data.channels={cfg.data.channels}, data.image_size={cfg.data.image_size}): "
            f"{type(exc).__name__}: {exc}") from None
    for name in skip:
        try:
            pruner.group_index(name)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"prune.skip={list(skip)!r}: {exc}") from None
