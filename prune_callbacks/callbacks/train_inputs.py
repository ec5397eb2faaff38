"""What `fit` really calls the network with on a training step, for tracing its training graph.

A detector's training forward takes targets (`paddle.Model(net, inputs=[image, gt_boxes, ...])`);
a forward pre-hook on the network records the arguments of its first training-mode call, so
the pruning and sensitivity callbacks trace the training graph from them
(`FilterPruner(train_inputs=...)`). Glue only: it records, it never changes the network.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional, Tuple

import paddle
import paddle.nn as nn

# network -> the arguments of its first training call in the current fit
_CAPTURED: "weakref.WeakKeyDictionary[nn.Layer, List[Any]]" = weakref.WeakKeyDictionary()
# network -> (the hook's handle, what to call once they are recorded, the fit's token)
_WATCHED: "weakref.WeakKeyDictionary[nn.Layer, Tuple[Any, List[Callable[[], None]], Any]]" = \
    weakref.WeakKeyDictionary()


def watch_training_inputs(model: Any, then: Optional[Callable[[], None]] = None,
                          fit: Any = None) -> None:
    """Record the arguments of the network's next training-mode call (once per fit: callbacks
    call this in `on_train_begin`), then call `then` (before that forward runs, so a check it
    makes still comes before the first training step).

    `fit` identifies the fit (a callback's `params`: paddle gives every callback of one fit the
    same dict, a new one per fit): a watch left by an earlier fit that failed before its first
    training step, with its callbacks' checks, is dropped instead of firing in this one."""
    net = model.network
    entry = _WATCHED.get(net)
    if entry is not None and fit is not None and entry[2] is not None and entry[2] is not fit:
        stop_watching(model)
    if net not in _WATCHED:
        _CAPTURED.pop(net, None)  # a new fit: its own inputs
        listeners: List[Callable[[], None]] = []

        def hook(layer: nn.Layer, inputs: Tuple[Any, ...]) -> None:
            if not layer.training or layer in _CAPTURED:
                return None
            _CAPTURED[layer] = [v.detach() if isinstance(v, paddle.Tensor) else v
                                for v in inputs]
            handle, todo, _ = _WATCHED.pop(layer)
            handle.remove()
            for fn in todo:
                fn()
            return None

        _WATCHED[net] = (net.register_forward_pre_hook(hook), listeners, fit)
    if then is not None:
        _WATCHED[net][1].append(then)


def training_inputs(model: Any) -> Optional[List[Any]]:
    """The arguments recorded by `watch_training_inputs` in this fit, or None (not yet)."""
    return _CAPTURED.get(model.network)


def stop_watching(model: Any) -> None:
    """Remove the hook if no training call came (fit ended or failed first)."""
    entry = _WATCHED.pop(getattr(model, "network", None), None) if model is not None else None
    if entry is not None:
        entry[0].remove()
