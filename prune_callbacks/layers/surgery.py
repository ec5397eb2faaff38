"""Shrink parameters in place and keep each layer's attributes true to its new shapes.

Each layer type's `LayerPruning.sync` (prune_callbacks.layers.registry) re-reads sizes from the (already
sliced) parameters. Parameters keep their identity (optimizers and hooks still point at them); no
backup copy is ever left in the network or its state_dict. `trial_prune` prunes a deep copy to
check a slicing against masking, leaving the network itself unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import types
import warnings
import weakref
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import paddle
import paddle.nn as nn

from .registry import layer_handler, supports_layer

__all__ = ["AxisSlice", "ParamSlices", "Mask", "apply_slices", "slice_array",
           "supports_layer", "allow_plain_parameters", "trial_prune", "trial_train_run",
           "track_count", "untrack_count", "reset_counts", "copy_for_pruning", "install_forwards"]

logger = logging.getLogger(__name__)

# axis -> kept indices; for a grouped conv's input axis, one list of kept indices per block
AxisSlice = Union[Sequence[int], Sequence[Sequence[int]]]
ParamSlices = Mapping[str, Mapping[int, AxisSlice]]

LayerSync = Callable[[nn.Layer, Dict[str, Tuple[int, ...]]], None]


def slice_array(arr: np.ndarray, axes: Mapping[int, AxisSlice]) -> np.ndarray:
    """Keep `axes[a]` along each axis a. A per-block slice (a list of lists on axis 1 of a grouped
    conv weight) picks, for each block of rows along axis 0, its own columns. Per-block slices are
    applied first, while axis 0 still has its original rows.
    """
    out = arr
    for ax, idx in sorted(axes.items(), key=lambda kv: 0 if _is_blockwise(kv[1]) else 1):
        if _is_blockwise(idx):
            blocks = len(idx)
            rows = np.split(out, blocks, axis=0)
            out = np.concatenate([np.take(r, list(k), axis=ax) for r, k in zip(rows, idx)], axis=0)
        else:
            out = np.take(out, np.asarray(list(idx), dtype=np.int64), axis=ax)
    return out


def _is_blockwise(idx: AxisSlice) -> bool:
    return len(idx) > 0 and isinstance(idx[0], (list, tuple, np.ndarray))


def _set(p: paddle.Tensor, value: np.ndarray) -> None:
    place = p.place
    if place.is_gpu_place():
        target = paddle.CUDAPlace(place.gpu_device_id())
    else:
        target = paddle.CPUPlace()
    p.get_tensor().set(np.ascontiguousarray(value.astype(p.numpy().dtype, copy=False)), target)


# Per network, parameters of layers with no handler that a trace found used only as per-channel
# values in arithmetic (`x * self.gamma`): the layer's forward reads the tensor itself, so they
# are sliced without a sync. Held weakly: the table never keeps a network alive.
_PLAIN: "weakref.WeakKeyDictionary[nn.Layer, frozenset]" = weakref.WeakKeyDictionary()


def allow_plain_parameters(net: nn.Layer, keys: Iterable[str]) -> None:
    """Let `apply_slices` slice these parameters (state_dict keys) of `net` although their
    layers have no registered handler (what `ChannelGraph` records for per-channel parameters
    used in arithmetic, such as a LayerScale)."""
    _PLAIN[net] = frozenset(keys)


# Per network, int attributes that count units of one parameter axis (an attention layer's
# `num_heads` counts the heads of its q/k/v projection; a layer's `embed_dim` the positions of
# its own per-channel parameter): (layer path, attribute) -> (parameter key, axis, positions per
# unit). Held weakly, like _PLAIN.
_COUNTS: "weakref.WeakKeyDictionary[nn.Layer, Dict[Tuple[str, str], Tuple[str, int, int]]]" = \
    weakref.WeakKeyDictionary()


def track_count(net: nn.Layer, path: str, attr: str, key: str, axis: int, per_unit: int) -> None:
    """After `apply_slices` cuts axis `axis` of parameter `key`, set `attr` of the layer at
    `path` to the units left (positions kept // `per_unit`): what `ChannelGraph` records for
    an attention layer's head count, and for a width a layer keeps as an int when a trial
    prune shows the forward needs it in sync."""
    _COUNTS.setdefault(net, {})[(path, attr)] = (key, axis, int(per_unit))


def untrack_count(net: nn.Layer, path: str, attr: str) -> None:
    """Leave `attr` of the layer at `path` alone again (undoes `track_count`)."""
    _COUNTS.get(net, {}).pop((path, attr), None)


def reset_counts(net: nn.Layer) -> None:
    """Forget every count tracked for `net`: a new trace describes the network as it is now
    (a head count recorded when a layer had 4 heads must not be applied once it has 1)."""
    _COUNTS.pop(net, None)


def copy_for_pruning(net: nn.Layer) -> nn.Layer:
    """A deep copy of `net` that prunes like it: the same plain parameters and tracked counts
    (`allow_plain_parameters`, `track_count`), which a bare `copy.deepcopy` would lose (a copy's
    LayerScale would then have no surgery, its head counts would not follow)."""
    copy_net = _copy_network(net)
    _inherit_tables(net, copy_net)
    return copy_net


def _inherit_tables(net: nn.Layer, copy_net: nn.Layer) -> None:
    """A deep copy prunes like its original: same plain parameters and tracked counts."""
    if net in _PLAIN:
        _PLAIN[copy_net] = _PLAIN[net]
    if net in _COUNTS:
        _COUNTS[copy_net] = dict(_COUNTS[net])


def install_forwards(net: nn.Layer, input_shape: Sequence[int]) -> List[str]:
    """Run the `forward` a layer's registered handler carries (`LayerPruning.forward`) instead
    of the class's own, on every such layer of `net` (bound to the instance; the class is left
    alone). Checked first: the network's eval output with them must equal its output without
    (rtol 1e-4), else they are taken out again with a warning. Installing twice is a no-op.

    Returns:
        The paths of the layers whose forward was replaced.
    """
    swaps = []
    for path, layer in net.named_sublayers(include_self=True):
        handler = layer_handler(layer)
        fn = getattr(handler, "forward", None) if handler is not None else None
        current = layer.__dict__.get("forward")
        if fn is None or getattr(current, "__func__", None) is fn:
            continue
        swaps.append((path, layer, current))
    if not swaps:
        return []
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=list(input_shape))
                         .astype("float32"))
    before = _outputs(net, x)
    for _, layer, _ in swaps:
        layer.forward = types.MethodType(layer_handler(layer).forward, layer)
    failure = None
    try:
        after = _outputs(net, x)
        if len(after) != len(before) or any(
                a.shape != b.shape or np.abs(a - b).max() > 1e-4 * max(np.abs(b).max(), 1e-12)
                for a, b in zip(after, before)):
            failure = "the network's output changes"
    except Exception as e:  # a registered forward that does not run here
        failure = f"{type(e).__name__}: {_last_line(e)}"
    if failure is not None:
        for _, layer, current in swaps:
            if current is None:
                del layer.__dict__["forward"]
            else:
                layer.forward = current
        names = sorted({type(layer).__name__ for _, layer, _ in swaps})
        warnings.warn(f"the registered forward of {', '.join(names)} is not used: with it "
                      f"{failure}; the layers keep their own. Fix the function given to "
                      f"AttentionPruning(forward=...) so that it computes what the class's forward "
                      f"computes (same outputs), or register the class without forward=",
                      stacklevel=3)
        return []
    logger.debug("registered forwards run in %d layers", len(swaps))
    return [p for p, _, _ in swaps]


def apply_slices(net: nn.Layer, slices: ParamSlices) -> None:
    """Slice the parameters named in `slices` (state_dict keys) and sync their layers."""
    layers = dict(net.named_sublayers(include_self=True))
    touched: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    params = dict(net.named_parameters())
    for key, axes in slices.items():
        if key not in params:
            raise KeyError(f"no parameter {key!r} in the network")
        p = params[key]
        old_shape = tuple(p.shape)
        new = slice_array(p.numpy(), axes)
        _set(p, new)
        path, _, attr = key.rpartition(".")
        touched.setdefault(path, {})[attr] = old_shape
    plain = _PLAIN.get(net, frozenset())
    for path, old in touched.items():
        layer = layers[path]
        if layer_handler(layer) is None and all(
                (f"{path}.{attr}" if path else attr) in plain for attr in old):
            continue  # plain per-channel parameters (a LayerScale): nothing to sync
        if not supports_layer(layer):
            raise TypeError(
                f"layer {path or '<root>'!r} ({type(layer).__name__}) has no registered "
                "surgery: register "
                "a LayerPruning for it with prune_callbacks.register_layer_type")
        layer_handler(layer).sync(layer, old)
    for (path, attr), (key, axis, per) in _COUNTS.get(net, {}).items():
        if key in slices and axis in slices[key] and path in layers:
            kept = len(slices[key][axis])
            if kept % per or kept < per:
                raise ValueError(
                    f"{path or '<root>'}.{attr} counts units of {per} positions of {key} (axis "
                    f"{axis}), but {kept} positions are kept: prune whole units")
            setattr(layers[path], attr, kept // per)


class Mask:
    """Zeroed parameter slices that can be undone bit for bit."""

    def __init__(self, net: nn.Layer, removed: ParamSlices) -> None:
        params = dict(net.named_parameters())
        self._saved: Dict[str, Tuple[paddle.Tensor, np.ndarray]] = {}
        for key, axes in removed.items():
            p = params[key]
            arr = p.numpy()
            self._saved[key] = (p, arr.copy())
            masked = arr.copy()
            for ax, idx in axes.items():
                if _is_blockwise(idx):
                    rows = masked.shape[0] // len(idx)
                    for k, cols in enumerate(idx):
                        sel = [slice(None)] * masked.ndim
                        sel[0] = slice(k * rows, (k + 1) * rows)
                        sub = masked[tuple(sel)]
                        index = [slice(None)] * sub.ndim
                        index[ax] = list(cols)
                        sub[tuple(index)] = 0
                else:
                    index = [slice(None)] * masked.ndim
                    index[ax] = list(idx)
                    masked[tuple(index)] = 0
            p.set_value(masked)
        # layers whose masked output needs more than zeroed parameters (a LayerNorm's kept
        # channels' statistics): their handler's `mask`
        self._undo: List[Callable[[], None]] = []
        layers = dict(net.named_sublayers(include_self=True))
        by_layer: Dict[str, Dict[str, Any]] = {}
        for key, axes in removed.items():
            path, _, attr = key.rpartition(".")
            by_layer.setdefault(path, {})[attr] = axes
        for path, own in by_layer.items():
            layer = layers.get(path)
            handler = layer_handler(layer) if layer is not None else None
            undo = handler.mask(layer, own) if handler is not None else None
            if undo is not None:
                self._undo.append(undo)

    def restore(self) -> None:
        for p, arr in self._saved.values():
            p.set_value(arr)
        self._saved.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self) -> "Mask":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------
# Trial pruning on a copy. Some forward code computes sizes from the channel count
# (`x[:, :c // 2]`, `split(x, 2)`), other code writes them in (`x[:, :self.half]`); the traced
# program shows both as the same constants, so a group cut into equal parts is pruned on a deep
# copy and compared with the masked original. The network checked is left unchanged.
# ---------------------------------------------------------------------------------------------


def _leaves(out: Any) -> List[np.ndarray]:
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _leaves(item)]
    return [out.numpy()] if hasattr(out, "numpy") else []


def _outputs(net: nn.Layer, x: paddle.Tensor) -> List[np.ndarray]:
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        with paddle.no_grad():
            return _leaves(net(x))
    finally:
        for layer, training in modes:
            layer.training = training


def trial_prune(net: nn.Layer, input_shape: Sequence[int], keep: ParamSlices,
                drop: ParamSlices, rtol: float = 1e-3,
                pruned_copy: Optional[nn.Layer] = None) -> Optional[str]:
    """Prune a deep copy of `net` to `keep` and compare it with `net` masked by `drop`.

    Args:
        net: the network (restored bit for bit afterwards).
        input_shape: batch first.
        keep, drop: kept and removed indices per parameter and axis (state_dict keys).
        rtol: largest relative difference accepted.
        pruned_copy: a copy of `net` already pruned to the shapes `keep` gives (any indices),
            used instead of a new one: its parameters in `keep` are overwritten with `net`'s
            slices (saves a deep copy when the caller has one).

    Returns:
        None when the pruned copy reproduces the masked outputs, else what went wrong.
    """
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=list(input_shape))
                         .astype("float32"))
    try:
        with Mask(net, drop):
            masked = _outputs(net, x)
        if pruned_copy is None:
            pruned_net = copy_for_pruning(net)
            apply_slices(pruned_net, keep)
        else:
            pruned_net = _refill(pruned_copy, net, keep)
    except Exception as e:
        return f"{type(e).__name__}: {_last_line(e)}"
    stack: List[str] = []
    try:
        with _layer_stack(pruned_net, stack):
            pruned = _outputs(pruned_net, x)
    except Exception as e:  # a size written into forward no longer fits: that is the answer
        where = f"in layer {stack[-1]}: " if stack else ""
        return f"{where}{type(e).__name__}: {_last_line(e)}"
    if len(pruned) != len(masked):
        return "the pruned copy returns another number of outputs"
    for p, m in zip(pruned, masked):
        if p.shape != m.shape:
            return f"output shape {list(p.shape)} instead of {list(m.shape)}"
        err = float(np.abs(p - m).max() / max(float(np.abs(m).max()), 1e-12))
        if err > rtol:
            return f"outputs differ from masking by {err:.2g}"
    return None


def _copy_network(net: nn.Layer) -> nn.Layer:
    """A deep copy of `net`, leaving out static-graph values a conversion left in layer
    attributes (a forward that stores its inputs, `self.inputs = inputs`, keeps the last
    conversion's values there, which cannot be copied; the next forward replaces them)."""
    memo: Dict[int, Any] = {}
    for layer in net.sublayers(include_self=True):
        stack = list(layer.__dict__.values())
        while stack:
            v = stack.pop()
            if isinstance(v, paddle.pir.Value):
                memo[id(v)] = None
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return copy.deepcopy(net, memo)


def trial_train_run(net: nn.Layer, keep: ParamSlices, args: Sequence[Any]) -> Optional[str]:
    """Prune a deep copy of `net` to `keep` and run one training-mode forward on `args` (no
    gradient): None when it runs, else what went wrong. For sizes only a training forward
    computes (a dropout mask drawn with the input's shape), whose outputs are random: it checks
    that the pruned forward runs, not what it returns."""
    try:
        pruned_net = copy_for_pruning(net)
        apply_slices(pruned_net, keep)
        pruned_net.train()
        with paddle.no_grad():
            pruned_net(*args)
    except Exception as e:  # a size written into forward no longer fits: that is the answer
        return f"{type(e).__name__}: {_last_line(e)}"
    return None
def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else ""


@contextlib.contextmanager
def _layer_stack(net: nn.Layer, stack: List[str]) -> Iterator[None]:
    """While inside, `stack` holds the path and type of every layer whose forward is running
    (innermost last): after an exception, the layer whose forward raised it."""
    def enter(name: str) -> Callable[..., None]:
        def hook(layer: nn.Layer, inputs: Any) -> None:
            stack.append(f"{name or '<root>'} ({type(layer).__name__})")
        return hook

    def leave(layer: nn.Layer, inputs: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for name, layer in net.named_sublayers(include_self=True):
        handles.append(layer.register_forward_pre_hook(enter(name)))
        handles.append(layer.register_forward_post_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _refill(pruned: nn.Layer, net: nn.Layer, keep: ParamSlices) -> nn.Layer:
    """Set the parameters of `pruned` named in `keep` to `net`'s slices (same shapes)."""
    source = dict(net.named_parameters())
    for key, p in pruned.named_parameters():
        if key in keep:
            value = slice_array(source[key].numpy(), keep[key])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{key}: slices give {list(value.shape)}, the copy holds "
                                 f"{list(p.shape)}")
            p.set_value(value)
    return pruned
