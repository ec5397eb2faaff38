"""FLOPs and parameter counts of a (possibly pruned) network.

Convention: FLOPs are multiply-accumulates (MACs) of Conv2D and Linear layers only, one MAC per
weight element per output position (groups respected; bias, norms, activations and pooling not
counted), for one input of the given shape. Works under numpy 2, where `paddle.flops` crashes.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Type

import numpy as np
import paddle
import paddle.nn as nn

MacFn = Callable[[nn.Layer, paddle.Tensor], int]
_MAC_FNS: Dict[Type[nn.Layer], MacFn] = {}


def register_flops(layer_type: Type[nn.Layer], fn: MacFn) -> None:
    """Count `fn(layer, output)` MACs for every call of a layer of `layer_type`."""
    _MAC_FNS[layer_type] = fn


def _conv_macs(layer: nn.Layer, out: paddle.Tensor) -> int:
    w = layer.weight.shape
    ch_axis = 1 if layer._data_format in ("NCHW", "NCDHW", "NCL") else len(out.shape) - 1
    positions = int(np.prod([s for i, s in enumerate(out.shape) if i not in (0, ch_axis)]))
    return int(np.prod(w)) * positions


def _linear_macs(layer: nn.Layer, out: paddle.Tensor) -> int:
    rows = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
    return int(np.prod(layer.weight.shape)) * rows


register_flops(nn.Conv2D, _conv_macs)
register_flops(nn.Linear, _linear_macs)


def _mac_fn(layer: nn.Layer) -> MacFn | None:
    for cls in type(layer).__mro__:
        if cls in _MAC_FNS:
            return _MAC_FNS[cls]
    return None


def count_flops(net: nn.Layer, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an input of `input_shape` (batch included).

    Args:
        net: the network; the train/eval mode of each layer is restored afterwards.
        input_shape: e.g. [1, 3, 224, 224]; the count is per batch of that size.

    Returns:
        MACs of all Conv2D and Linear layers (see the module docstring).

    Examples:
        >>> count_flops(paddle.vision.models.mobilenet_v1(), [1, 3, 224, 224])  # ~569M
    """
    total = [0]
    hooks = []

    def hook(layer: nn.Layer, inputs: object, output: paddle.Tensor) -> None:
        total[0] += _mac_fn(layer)(layer, output)

    for layer in net.sublayers(include_self=True):
        if _mac_fn(layer) is not None:
            hooks.append(layer.register_forward_post_hook(hook))
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        with paddle.no_grad():
            net(paddle.zeros(list(input_shape), dtype="float32"))
    finally:
        for h in hooks:
            h.remove()
        for layer, training in modes:  # per layer: a frozen BN inside a training net stays so
            layer.training = training
    return total[0]


def count_params(net: nn.Layer) -> int:
    """Number of elements of every parameter (trainable or not, BatchNorm statistics included,
    as in `paddle.summary`'s total_params)."""
    return int(sum(int(np.prod(p.shape)) for p in net.parameters()))
