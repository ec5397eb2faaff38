"""Index ops detectors use on feature maps (query selection, top-k): `gather_nd`,
`take_along_axis`, `topk`, `argmax`/`argmin`. Each keeps the channels of axes it does not index,
and gives up (`unknown_op`) when the axes it indexes or reduces carry channels. Registration only.
"""
from __future__ import annotations

from typing import Any, List

import numpy as np

from .tracing import TraceState, Val, register_op, unknown_op


@register_op("argmax", "argmin")
def _arg_reduce(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """The position of the largest (smallest) value along one axis (or all, `flatten`)."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    attrs = op.attrs()
    value = ins[1].const if len(ins) > 1 and ins[1].const is not None else attrs.get("axis", 0)
    ndim = max(len(x.shape), 1)
    axes = list(range(ndim)) if attrs.get("flatten") else \
        [int(np.asarray(value).ravel()[0]) % ndim]
    if any(ids.shape[a] > 1 for a in axes):
        unknown_op(state, op, ins, outs, why=f"{op.name()} across channels")
        return
    keep = [a for a in range(ids.ndim) if a not in axes]
    out.ids = ids if len(out.shape) == ids.ndim else ids.reshape([ids.shape[a] for a in keep])


@register_op("gather_nd")
def _gather_nd(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """out = x[index[..., 0], ..., index[..., k-1]]: shape index.shape[:-1] + x.shape[k:]."""
    x, index, out = ins[0], ins[1], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    k = index.shape[-1] if index.shape else -1
    lead = len(out.shape) - (len(x.shape) - k)
    if k < 0 or lead < 0 or any(ids.shape[a] > 1 for a in range(k)):
        unknown_op(state, op, ins, outs, why="gather_nd indexing channels")
        return
    out.ids = ids[(0,) * k].reshape((1,) * lead + ids.shape[k:])


@register_op("take_along_axis")
def _take_along_axis(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Picks along one axis; the others keep their channels where the output keeps their size."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    axis = int(op.attrs().get("axis", 0)) % max(len(x.shape), 1)
    same = len(out.shape) == len(x.shape) and all(
        out.shape[a] == x.shape[a] for a in range(ids.ndim) if ids.shape[a] > 1)
    if ids.shape[axis] > 1 or not same:
        unknown_op(state, op, ins, outs, why="take_along_axis across channels")
        return
    index = ins[1]
    iids = state.ids_of(index)
    if len(index.shape) == ids.ndim and any(  # indices as wide as the channels: paddle
            ids.shape[a] > 1 and index.shape[a] > 1 and (iids is None or iids.shape[a] == 1)
            for a in range(ids.ndim)):  # broadcasts them from the input's shape, or the code
        # wrote the size: a trial prune on a copy tells which (as for a channel shuffle)
        state.trials.append((np.unique(ids), "take_along_axis indices"))
    out.ids = ids


@register_op("topk")
def _topk(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """The k largest along one axis: values and indices keep the other axes' channels."""
    x = ins[0]
    ids = state.ids_of(x)
    if ids is None:
        for o in outs:
            o.ids = None
        return
    axis = int(op.attrs().get("axis", -1)) % max(len(x.shape), 1)
    if ids.shape[axis] > 1:
        unknown_op(state, op, ins, outs, why="topk across channels")
        return
    for o in outs:
        o.ids = ids if len(o.shape) == ids.ndim else None
