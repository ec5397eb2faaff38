"""The training graph from real training inputs, and what to hold when there are none.

A detector's (or an OCR recogniser's) training forward takes targets and computes its loss, or
runs heads that only exist in training: it cannot be traced from one image shape. Given an
example of what the network is called with on a training step (`example_spec`), the tracer
builds the training program from it. Without one, the eval graph is used and every group that
could feed a layer the eval forward never runs is held whole (`hold_train_only_feeders`), with
one warning naming those layers and the fix. This module only reads the network.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Union

import numpy as np
import paddle
import paddle.nn as nn

from .tracing import TraceState

# a batch (a tensor, or lists, tuples and dicts of them), or a callable returning one
TrainInputs = Union[Any, Callable[[], Any]]

_WARNED: "weakref.WeakSet[nn.Layer]" = weakref.WeakSet()  # networks warned about already


class _Later:
    """`train_inputs=LATER`: the inputs come later (the callbacks capture them on the first
    training step): trace the eval graph alone now, hold nothing and do not warn; the graph's
    `train_failure` tells the caller to trace again once they are there."""

    def __repr__(self) -> str:
        return "LATER"


LATER = _Later()


def example_batch(train_inputs: TrainInputs) -> Optional[List[Any]]:
    """The forward's positional arguments from `train_inputs`: a callable is called; a tuple or
    list is the arguments; anything else (a tensor, a dict) is the one argument."""
    if train_inputs is None or train_inputs is LATER:
        return None
    batch = train_inputs() if callable(train_inputs) and not isinstance(
        train_inputs, (paddle.Tensor, np.ndarray)) else train_inputs
    if batch is None:
        return None
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def example_spec(train_inputs: TrainInputs) -> Optional[List[Any]]:
    """`paddle.jit.to_static` input specs of the forward's arguments in `train_inputs` (see
    `example_batch`): every tensor or array, however nested in lists, tuples and dicts, becomes
    an `InputSpec` of its shape and dtype; other values (None, numbers) stay as they are.

    Raises:
        TypeError: no tensor at all in `train_inputs`.
    """
    batch = example_batch(train_inputs)
    if batch is None:
        return None
    count = [0]

    def spec(v: Any) -> Any:
        if isinstance(v, (paddle.Tensor, np.ndarray)):
            count[0] += 1
            dtype = v.dtype if isinstance(v, paddle.Tensor) else str(v.dtype)
            return paddle.static.InputSpec(list(v.shape), dtype, f"train_input_{count[0]}")
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        return v

    specs = [spec(v) for v in batch]
    if not count[0]:
        raise TypeError(f"train_inputs holds no tensor ({[type(v).__name__ for v in batch]}): "
                        "pass what the network's forward is called with on a training step, "
                        "e.g. (images, targets)")
    return specs


def _input_widths(layer: nn.Layer) -> Set[int]:
    """The channel counts a layer reads (a conv's or linear's input features, a norm's size)."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, (nn.Linear, nn.Conv2DTranspose)) and weight is not None:
        return {int(weight.shape[0])}
    if isinstance(getattr(layer, "_in_channels", None), int):
        return {int(layer._in_channels)}
    return {int(p.shape[0]) for p in layer.parameters(include_sublayers=False) if p.ndim == 1}


def train_only_layers(net: nn.Layer, state: TraceState) -> Dict[str, nn.Layer]:
    """Layers with parameters none of which the eval program reads: they run only in training
    (path -> layer); empty unless the training program could not be built."""
    if state.train_failure is None or state.eval_params is None:
        return {}
    out = {}
    for path, layer in net.named_sublayers():
        names = [p.name for p in layer.parameters(include_sublayers=False)]
        if names and not any(n in state.eval_params for n in names):
            out[path] = layer
    return out


def _hold_by_width(graph: Any, layers: Dict[str, nn.Layer], reason: str) -> List[str]:
    """Hold whole every prunable group whose channel count one of `layers` reads."""
    widths: Set[int] = set()
    for layer in layers.values():
        widths |= _input_widths(layer)
    held = []
    for g in graph.groups:
        if g.prunable and g.channels in widths:
            g.prunable, g.reason = False, reason
            held.append(g.name)
    return held


def hold_eval_only_feeders(graph: Any, net: nn.Layer, state: TraceState) -> None:
    """Traced from the training program alone (the eval forward does not convert): hold whole
    every group whose width a layer the eval forward runs, but the training program never
    reads, takes (it may read those channels in eval), and warn naming those layers."""
    if state.eval_failure is None or state.eval_params is None:
        return
    traced = {m.param for m in state.members} | set(state.opaque_params)
    layers = {}
    for path, layer in net.named_sublayers():
        names = [p.name for p in layer.parameters(include_sublayers=False)]
        if names and any(n in state.eval_params for n in names) and \
                not any(n in traced for n in names):
            layers[path] = layer
    if not layers:
        return
    names = ", ".join(sorted(layers)[:6]) + (" ..." if len(layers) > 6 else "")
    held = _hold_by_width(graph, layers, (
        f"may feed layers only the eval forward runs ({names}), which could not be traced "
        f"({state.eval_failure})"))
    warnings.warn(
        f"the eval forward of {type(net).__name__} does not convert to a static graph "
        f"({state.eval_failure}); pruning follows the training graph, and layers only the eval "
        f"forward runs ({names}) read groups it cannot see: {len(held)} group(s) of matching "
        "width are held whole. Fix: make the eval forward convertible with paddle.jit.to_static "
        "(post-processing outside the network, or in a sublayer, which is then left out)",
        stacklevel=4)


def hold_train_only_feeders(graph: Any, net: nn.Layer, state: TraceState) -> None:
    """Without the training graph, hold whole every prunable group whose channel count is one a
    layer the eval forward never runs reads (it may feed that layer in training: pruning it
    would break the first training step), and warn once per network naming those layers and
    the fix. `graph` is the ChannelGraph being built (typed Any: channels imports this module)."""
    layers = train_only_layers(net, state)
    if not layers:
        return
    names = ", ".join(sorted(layers)[:6]) + (" ..." if len(layers) > 6 else "")
    reason = (f"may feed layers the eval forward never runs ({names}) in training, and the "
              f"training graph could not be traced ({state.train_failure}); pass train_inputs= "
              "(FilterPruner) or prune inside fit, whose callbacks capture them")
    held = _hold_by_width(graph, layers, reason)
    if net not in _WARNED:
        _WARNED.add(net)
        warnings.warn(
            f"the training forward of {type(net).__name__} cannot be traced from an input shape "
            f"alone ({state.train_failure}); pruning follows the eval graph, and layers it never "
            f"runs ({names}) are trained from groups it cannot see: {len(held)} group(s) of "
            f"matching width are held whole ({', '.join(held[:6])}"
            f"{' ...' if len(held) > 6 else ''}). Fix: pass train_inputs=(a training batch, "
            "targets included) to FilterPruner, or prune with the callbacks inside "
            "paddle.Model.fit, which capture the training inputs", stacklevel=4)
