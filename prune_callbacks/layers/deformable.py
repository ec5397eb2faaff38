"""Deformable convolution (`paddle.vision.ops.DeformConv2D`): surgery and FLOPs.

Its filter is a conv's ([out, in / groups, kh, kw]) and it keeps a conv's attributes
(`_in_channels`, `_out_channels`, `_groups`; no data format: NCHW), so `ConvPruning` slices,
syncs and counts it: one MAC per filter element per output position, as for `nn.Conv2D` (the
bilinear sampling is not counted, as activations are not). Its offset and mask come from other
convs whose output sizes the kernel fixes; the tracer keeps those whole
(`graph.ops_deformable`). Registration only.
"""
from __future__ import annotations

from paddle.vision.ops import DeformConv2D

from .registry import ConvPruning, register_layer_type

register_layer_type(DeformConv2D, ConvPruning())
