"""Deformable convolution (`paddle.vision.ops.DeformConv2D`): surgery and FLOPs.

Its filter is a conv's ([out, in / groups, kh, kw]), so slicing and sync are a conv's; its
offset and mask come from other convs whose output sizes are fixed by the kernel (the tracer
keeps those whole). One MAC per filter element per output position, like `nn.Conv2D` (the
bilinear sampling is not counted, as activations are not). Registration only.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
from paddle.vision.ops import DeformConv2D

from .registry import ConvPruning, OldShapes, register_layer_type


class DeformConvPruning(ConvPruning):
    """`DeformConv2D` (dense or grouped): a conv without a data format (always NCHW)."""

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        w = layer.weight.shape
        layer._in_channels = w[1] * layer._groups
        layer._out_channels = w[0]

    def macs(self, layer: nn.Layer, output: paddle.Tensor) -> int:
        return int(np.prod(layer.weight.shape)) * int(np.prod(output.shape[2:]))


register_layer_type(DeformConv2D, DeformConvPruning())
