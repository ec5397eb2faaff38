"""One extension point per layer type: how pruning treats a `paddle.nn.Layer` subclass.

A `LayerPruning` handler says, for one layer type, how the layer's attributes follow its sliced
parameters (surgery), how many multiply-accumulates one call costs (`count_flops`) and which axis
of its output carries channels (sensitivity masks outputs there). Handlers are found along the
class hierarchy, so a subclass of `nn.Conv2D` is a conv unless registered otherwise. This module
never touches a parameter and imports nothing else from the package.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import numpy as np
import paddle
import paddle.nn as nn

logger = logging.getLogger(__name__)

__all__ = [
    "LayerPruning", "ConvPruning", "NormPruning", "LinearPruning", "MaskOnlyPruning",
    "ConvTransposePruning", "PReLUPruning", "GroupNormPruning",
    "register_layer_type", "layer_handler",
    "supports_layer", "output_channel_axis", "data_format_channel_axis", "lookup_by_class",
    "network_batch", "per_sample_rows", "LayerNormPruning", "AttentionPruning",
]

V = TypeVar("V")
OldShapes = Mapping[str, Tuple[int, ...]]
LayerTypes = Union[Type[nn.Layer], Sequence[Type[nn.Layer]]]


def lookup_by_class(table: Mapping[type, V], cls: type, *, inherited: bool = False) -> Optional[V]:
    """The value `table` holds for `cls` or, failing that, for its nearest base class.

    The one class-hierarchy lookup of the package: every per-type registry goes through it.

    Args:
        table: registry keyed by class.
        cls: the class to look up (pass `type(obj)` for an object).
        inherited: skip `cls` itself and start at its first base class.

    Returns:
        The entry of the first class in `cls.__mro__` that has one, or None.

    Examples:
        >>> lookup_by_class({nn.Conv2D: "conv"}, type(MyConv()))  # MyConv(nn.Conv2D)
        'conv'
    """
    for base in cls.__mro__[1 if inherited else 0:]:
        if base in table:
            return table[base]
    return None


class LayerPruning:
    """How one layer type is pruned. Subclass it, override what differs, register it once with
    `register_layer_type`. The defaults fit a layer that reads its sizes from its parameters'
    shapes, costs no counted MACs and whose output channels cannot be masked.

    Attributes:
        sliceable: False for types whose parameters must never be sliced (their channels stay
            unpruned); the handler then only serves FLOPs counting and output masking.

    Examples:
        >>> @register_layer_type(ChannelScale)
        ... class ChannelScalePruning(LayerPruning):
        ...     def sync(self, layer, old_shapes):
        ...         layer.channels = layer.scale.shape[0]
        ...     def output_channel_axis(self, layer):
        ...         return 1
    """

    sliceable: bool = True
    channel_separable: bool = False
    """True when each output channel depends on the same channel of the input only through the
    layer's own per-channel parameters or on the whole input for a conv or linear (a value in
    one channel never leaks into another's statistics): conv, linear, BatchNorm, PReLU. Then
    zeroing a channel's parameters and zeroing that channel where the next mixing layer reads
    it give the same network output (the compiled sensitivity path relies on it)."""

    forward: Optional[Callable[..., object]] = None
    """A forward to run instead of the class's own, called as `forward(layer, *inputs)`: for
    a layer whose forward writes sizes in that pruning changes (`C // self.num_heads` with C
    the input's width) where one that reads them from its parameters or synced ints prunes.
    Installed on every instance of the type in a network when the network is traced
    (`surgery.install_forwards`), once it is shown to give the original's outputs."""

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        """Make the layer's attributes agree with its parameters, which surgery has just sliced
        in place. `old_shapes` maps each changed parameter's attribute name (`"weight"`) to its
        shape before slicing."""

    def macs(self, layer: nn.Layer, output: paddle.Tensor) -> int:
        """Multiply-accumulates of one call that produced `output` (0: not counted; the FLOPs
        convention counts convolutions and linear layers only)."""
        return 0

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        """Axis of the layer's output that carries its channels, or None when the output cannot
        be masked channel by channel (sensitivity analysis then recomputes it)."""
        return None

    def input_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        """Axis of the layer's (first) input whose channels its weight mixes, or None when
        unknown (the compiled sensitivity path then evaluates the layer's groups eagerly)."""
        return None

    def call_macs(self, layer: nn.Layer, inputs: Sequence[paddle.Tensor],
                  output: paddle.Tensor) -> int:
        """Multiply-accumulates of one call, seeing its inputs too (what `count_flops` calls);
        override it instead of `macs` when the count depends on the input (a transposed conv
        works once per input position). Defaults to `macs(layer, output)`."""
        return self.macs(layer, output)

    def mask(self, layer: nn.Layer,
             removed: Mapping[str, Mapping[int, Sequence[int]]]) -> Optional[Callable[[], None]]:
        """What masking must do beyond zeroing `removed` ({attribute: {axis: indices}} of the
        layer's own parameters) so that the masked network equals the pruned one (a LayerNorm
        takes its statistics over the kept channels). Returns an undo, or None (nothing)."""
        return None


_HANDLERS: Dict[type, LayerPruning] = {}


def _as_types(layer_types: LayerTypes, caller: str) -> Tuple[type, ...]:
    types = tuple(layer_types) if isinstance(layer_types, (list, tuple)) else (layer_types,)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Layer))]
    if not types or bad:
        raise TypeError(f"{caller} expects paddle.nn.Layer subclasses, got {bad or types!r}; "
                        "pass the class itself, e.g. nn.Conv2D, not an instance")
    return types


def register_layer_type(layer_types: LayerTypes,
                        handler: Union[LayerPruning, Type[LayerPruning], None] = None) -> Callable:
    """Register how a layer type (and its subclasses) is pruned: the one extension point.

    Args:
        layer_types: a `paddle.nn.Layer` subclass, or a list/tuple of them.
        handler: a `LayerPruning` instance or subclass (instantiated without arguments); when
            omitted, `register_layer_type(T)` is a class decorator.

    Returns:
        The handler (or, as a decorator, the decorated class unchanged).

    Raises:
        TypeError: a layer type is not a `paddle.nn.Layer` subclass, or the handler is not a
            `LayerPruning`.

    Examples:
        >>> register_layer_type(MyConv, ConvPruning())          # a conv under another name
        >>> @register_layer_type([MyNormA, MyNormB])
        ... class MyNormPruning(NormPruning): ...
    """
    types = _as_types(layer_types, "register_layer_type")

    def deco(h: Union[LayerPruning, Type[LayerPruning]]) -> Union[LayerPruning, Type[LayerPruning]]:
        instance = h() if isinstance(h, type) and issubclass(h, LayerPruning) else h
        if not isinstance(instance, LayerPruning):
            raise TypeError(f"register_layer_type expects a LayerPruning instance or subclass, "
                            f"got {h!r}; subclass prune_callbacks.LayerPruning")
        for t in types:
            _HANDLERS[t] = instance
        return h

    return deco if handler is None else deco(handler)


def layer_handler(layer: Union[nn.Layer, type]) -> Optional[LayerPruning]:
    """The handler registered for a layer's type or its nearest registered base class."""
    cls = layer if isinstance(layer, type) else type(layer)
    return lookup_by_class(_HANDLERS, cls)


def supports_layer(layer: nn.Layer) -> bool:
    """True when surgery may slice this layer's parameters (a sliceable handler is registered)."""
    handler = layer_handler(layer)
    return handler is not None and handler.sliceable


def output_channel_axis(layer: nn.Layer) -> Optional[int]:
    """Axis of `layer`'s output carrying its channels, or None if unknown (no handler, or one
    that cannot tell). Replaces `sensitivity._output_axis`."""
    handler = layer_handler(layer)
    return None if handler is None else handler.output_channel_axis(layer)


def data_format_channel_axis(layer: nn.Layer) -> int:
    """1 for a channels-first layer (`_data_format` NCHW, NCL, ...), -1 for channels-last."""
    return -1 if str(getattr(layer, "_data_format", "NCHW")).endswith("C") else 1


def filter_macs(layer: nn.Layer, feature_map: paddle.Tensor) -> int:
    """A convolution's MACs: every element of its weight once per spatial position of
    `feature_map` (the output of a conv, the input of a transposed conv), per sample."""
    shape = feature_map.shape
    ch_axis = data_format_channel_axis(layer) % len(shape)
    positions = int(np.prod([s for i, s in enumerate(shape) if i not in (0, ch_axis)]))
    return int(np.prod(layer.weight.shape)) * positions


# ---------------------------------------------------------------------------------------------
# The built-in layer types
# ---------------------------------------------------------------------------------------------


class ConvPruning(LayerPruning):
    """`nn.Conv2D`: dense, grouped and depthwise (channel multiplier kept)."""

    channel_separable = True

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        w = layer.weight.shape
        old_w = old_shapes.get("weight", tuple(w))
        if layer._groups > 1 and layer._groups == layer._in_channels:  # depthwise
            mult = old_w[0] // layer._in_channels
            layer._in_channels = w[0] // mult
            layer._groups = layer._in_channels
        else:
            layer._in_channels = w[1] * layer._groups
        layer._out_channels = w[0]

    def macs(self, layer: nn.Layer, output: paddle.Tensor) -> int:
        return filter_macs(layer, output)  # each filter element once per output position

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)

    def input_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)


class NormPruning(LayerPruning):
    """Per-channel norms: BatchNorm*, SyncBatchNorm, the legacy BatchNorm, InstanceNorm*."""

    channel_separable = True

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        n = None
        for name in ("weight", "_mean", "bias", "scale"):
            p = getattr(layer, name, None)
            if p is not None:
                n = p.shape[0]
                break
        if n is not None:
            for attr in ("_num_features", "_num_channels"):
                if hasattr(layer, attr):
                    setattr(layer, attr, n)

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)


_NETWORK_BATCH: "contextvars.ContextVar[Optional[int]]" = contextvars.ContextVar(
    "network_batch", default=None)


@contextlib.contextmanager
def network_batch(batch: int):
    """While counting MACs of a network fed `batch` samples: `per_sample_rows` divides by it."""
    token = _NETWORK_BATCH.set(int(batch))
    try:
        yield
    finally:
        _NETWORK_BATCH.reset(token)


def per_sample_rows(shape: Sequence[int]) -> int:
    """Rows a linear layer works on per input sample: every leading axis of its output
    (`shape[:-1]`, windows or patches folded into axis 0 included) over the network's batch
    (`network_batch`; outside it, axis 0 is taken as the batch)."""
    lead = [int(s) for s in shape[:-1]]
    batch = _NETWORK_BATCH.get()
    if batch is None:
        return int(np.prod(lead[1:])) if len(lead) > 1 else 1
    return max(int(np.prod(lead)) // max(batch, 1), 1) if lead else 1


class LinearPruning(LayerPruning):
    """`nn.Linear`: it reads its sizes from `weight.shape`, so slicing needs no sync. MACs
    cover every leading axis of its input (Swin's windows and MobileViT's patches live on
    axis 0), per sample of the network's input (`per_sample_rows`)."""

    channel_separable = True

    def macs(self, layer: nn.Layer, output: paddle.Tensor) -> int:
        return int(np.prod(layer.weight.shape)) * per_sample_rows(output.shape)

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return -1

    def input_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return -1


class MaskOnlyPruning(LayerPruning):
    """Layers whose outputs can be masked but whose parameters surgery does not slice yet
    (Conv1D, Conv3D): their channels stay unpruned."""

    sliceable = False
    channel_separable = True

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)

    def input_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)


class ConvTransposePruning(LayerPruning):
    """`nn.Conv2DTranspose` (groups 1, or depthwise): filter [in, out/groups, kh, kw]; one MAC per
    filter element per input position."""

    channel_separable = True

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        w = layer.weight.shape
        depthwise = layer._groups > 1 and layer._groups == layer._in_channels
        layer._in_channels = w[0]
        if depthwise:
            layer._groups = w[0]
        layer._out_channels = w[1] * layer._groups

    def call_macs(self, layer: nn.Layer, inputs: Sequence[paddle.Tensor],
                  output: paddle.Tensor) -> int:
        return filter_macs(layer, inputs[0])  # each filter element once per input position

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)

    def input_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)


class PReLUPruning(LayerPruning):
    """`nn.PReLU`: one slope per channel is sliced with them; a single slope stays."""

    channel_separable = True

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        layer._num_parameters = int(np.prod(layer._weight.shape))

    def output_channel_axis(self, layer: nn.Layer) -> Optional[int]:
        return data_format_channel_axis(layer)


class GroupNormPruning(NormPruning):
    """`nn.GroupNorm`: the tracer joins each group's channels, so whole groups go and the group
    size stays; the group count follows the channel count."""

    channel_separable = False  # its statistics mix the channels of a norm group

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        old = old_shapes.get("weight", old_shapes.get("bias"))
        per_group = old[0] // layer._num_groups if old is not None else None
        super().sync(layer, old_shapes)
        if per_group:
            layer._num_groups = layer._num_channels // per_group


register_layer_type(nn.Conv2D, ConvPruning())
register_layer_type(nn.Conv2DTranspose, ConvTransposePruning())
register_layer_type(nn.PReLU, PReLUPruning())
register_layer_type(nn.GroupNorm, GroupNormPruning())
register_layer_type([nn.layer.norm._BatchNormBase, nn.BatchNorm, nn.layer.norm._InstanceNormBase],
                    NormPruning())
register_layer_type(nn.Linear, LinearPruning())


class LayerNormPruning(LayerPruning):
    """`nn.LayerNorm` over the last axis: weight and bias are sliced with the channels, and the
    statistics are then taken over the kept channels only (not what zeroing them gives, so
    `mask` makes the masked layer renormalise over the kept channels too: masked equals
    pruned, and a sensitivity analysis measures the pruned network)."""

    channel_separable = False  # its statistics mix the channels

    def sync(self, layer: nn.Layer, old_shapes: OldShapes) -> None:
        p = layer.weight if layer.weight is not None else layer.bias
        if p is not None:
            layer._normalized_shape = [int(p.shape[0])]

    def mask(self, layer: nn.Layer,
             removed: Mapping[str, Mapping[int, Sequence[int]]]) -> Optional[Callable[[], None]]:
        idx = (removed.get("weight") or removed.get("bias") or {}).get(0)
        shape = list(layer._normalized_shape)
        if idx is None or len(shape) != 1 or not len(idx):
            return None
        keep = np.ones(shape[0], dtype="float32")
        keep[np.asarray(list(idx), dtype=np.int64)] = 0.0
        m, n, eps = paddle.to_tensor(keep), float(keep.sum()), float(layer._epsilon)

        def forward(x: paddle.Tensor) -> paddle.Tensor:
            mean = (x * m).sum(-1, keepdim=True) / n
            d = (x - mean) * m
            y = d / paddle.sqrt((d * d).sum(-1, keepdim=True) / n + eps)
            if layer.weight is not None:
                y = y * layer.weight
            return y + layer.bias if layer.bias is not None else y

        had = "forward" in layer.__dict__
        own = layer.__dict__.get("forward")
        layer.__dict__["forward"] = forward

        def undo() -> None:
            if had:
                layer.__dict__["forward"] = own
            else:
                layer.__dict__.pop("forward", None)
        return undo


register_layer_type(nn.LayerNorm, LayerNormPruning())
register_layer_type([nn.Conv1D, nn.Conv3D], MaskOnlyPruning())


class AttentionPruning(LayerPruning):
    """A multi-head attention layer. The tracer prunes it whole heads at a time (its q, k, v and
    output projections are sliced by their own handlers); after slicing, surgery sets the int
    attribute `head_count_attr` to the heads left. Layers keeping an int `num_heads` (or
    `n_heads`, `heads`, ...) equal to their head count need no registration; register one whose
    count has another name, e.g. `register_layer_type(MyAttention, AttentionPruning("h"))`.
    Its own per-head parameters (a relative position bias table) are sliced with the heads.

    A forward that writes the head size in (`reshape(.., C // self.num_heads)` with C the
    input's width, as PaddleClas does) cannot follow pruned heads or widths: pass `forward`, a
    function of `(layer, *inputs)` computing the same with sizes read from the parameters and
    the head count (`head_dim = layer.qkv.weight.shape[1] // 3 // layer.num_heads`, heads
    merged with `-1`). It replaces the forward of every instance when a network is traced,
    after a check that the network's output is unchanged (docs/transformers.md)."""

    def __init__(self, head_count_attr: str = "num_heads",
                 forward: Optional[Callable[..., object]] = None) -> None:
        self.head_count_attr = head_count_attr
        if forward is not None and not callable(forward):
            raise TypeError(f"AttentionPruning(forward=...) expects a function of (layer, "
                            f"*inputs), got {forward!r}")
        self.forward = forward


register_layer_type(nn.MultiHeadAttention, AttentionPruning())
