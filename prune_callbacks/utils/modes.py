"""Temporary train/eval mode of a network, restored exactly: each sublayer's own flag.

A leaf utility: imports nothing of the package. It never changes a mode for good.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import paddle.nn as nn


@contextlib.contextmanager
def eval_mode(net: nn.Layer) -> Iterator[nn.Layer]:
    """Put `net` and every sublayer in eval mode for the block; give each its own flag back.

    `net.train()` afterwards would be wrong for a network whose sublayers had mixed modes (a
    frozen BatchNorm in a training network), so each sublayer's `training` is restored.

    Args:
        net: the network.

    Yields:
        `net`, in eval mode.

    Examples:
        >>> with eval_mode(net):
        ...     logits = net(x)
    """
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        yield net
    finally:
        for layer, training in modes:
            layer.training = training
