"""FLOPs and parameter counts of a (possibly pruned) network.

Convention: FLOPs are multiply-accumulates (MACs) of Conv2D and Linear layers only, one MAC per
weight element per output position (groups respected; bias, norms, activations and pooling not
counted), per sample: the count is divided by the batch of the network's input, so a linear
layer counts every leading axis of its input (windows or patches folded into the batch axis, as
Swin and MobileViT do, are counted). Each layer type's `LayerPruning.macs`
(prune_callbacks.layers.registry) does the counting. Works under numpy 2, where `paddle.flops` crashes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from .registry import layer_handler, network_batch

MacFn = Callable[[nn.Layer, paddle.Tensor], int]


def count_flops(net: nn.Layer, input_shape: Sequence[int], training: bool = False) -> int:
    """Multiply-accumulates per sample of one forward pass on an input of `input_shape`.

    Args:
        net: the network; the train/eval mode of each layer is restored afterwards.
        input_shape: e.g. [1, 3, 224, 224]; the count is per sample whatever the batch size
            ([8, 3, 224, 224] gives the same count as [1, 3, 224, 224]).
        training: count the training-mode network (branches under `if self.training:`, such as
            auxiliary heads, included) instead of the eval-mode one that is deployed. Norm
            statistics the training pass updates are restored.

    Returns:
        MACs of all Conv2D and Linear layers (see the module docstring).

    Examples:
        >>> count_flops(paddle.vision.models.mobilenet_v1(), [1, 3, 224, 224])  # ~569M
    """
    total = [0]
    hooks = []

    def hook(layer: nn.Layer, inputs: Sequence[paddle.Tensor], output: paddle.Tensor) -> None:
        total[0] += layer_handler(layer).call_macs(layer, inputs, output)

    for layer in net.sublayers(include_self=True):
        if layer_handler(layer) is not None:
            hooks.append(layer.register_forward_post_hook(hook))
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    # BatchNorm's running statistics are parameters in paddle, not buffers: save the whole state
    saved = [(t, t.numpy().copy()) for t in net.state_dict().values()] if training else []
    net.train() if training else net.eval()
    try:
        with paddle.no_grad(), network_batch(int(input_shape[0])):
            net(paddle.zeros(list(input_shape), dtype="float32"))
    finally:
        for h in hooks:
            h.remove()
        for t, value in saved:  # a training pass moves BatchNorm's running statistics
            t.set_value(value)
        for layer, training in modes:  # per layer: a frozen BN inside a training net stays so
            layer.training = training
    return total[0]


def count_params(net: nn.Layer) -> int:
    """Number of elements of every parameter (trainable or not, BatchNorm statistics included,
    as in `paddle.summary`'s total_params)."""
    return int(sum(int(np.prod(p.shape)) for p in net.parameters()))
