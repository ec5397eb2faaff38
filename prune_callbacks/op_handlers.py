"""The built-in op handlers: how channel ids flow through each PIR op the tracer understands.

Each handler is registered with `tracing.register_op`, the same way a user adds one. Importing
this module registers them; it reads op attributes and shapes only, never a parameter.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import numpy as np

from .tracing import (MacKind, MacRec, MemberRec, Role, SourceRec, TraceState, _compress,
                      _expand, _op_key, _Val, register_op, unknown_op)


_POINTWISE = (
    "relu relu6 sigmoid hardswish hardsigmoid swish silu gelu tanh leaky_relu elu selu mish "
    "softplus dropout scale cast assign clip abs exp sqrt square pow floor ceil round sign "
    "hard_tanh hardtanh celu logsigmoid tanh_shrink softsign thresholded_relu relu_ "
    "batch_norm_stats_placeholder"
).split()


@register_op(*_POINTWISE)
def _pointwise(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    outs[0].ids = state.ids_of(ins[0])


@register_op("full", "full_int_array", "full_like", "shape", "shape64", "arange", "assign_value",
             "zeros_like", "ones_like", "builtin.constant")
def _constant(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    attrs = op.attrs()
    for o in outs:
        o.const = attrs.get("value")


@register_op("data")
def _data(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    out = outs[0]
    if len(out.shape) >= 2:
        ids = state.fresh(out.shape[1]).reshape((1, -1) + (1,) * (len(out.shape) - 2))
    else:
        ids = state.fresh(1).reshape((1,) * len(out.shape))
    out.ids = ids
    state.sources.append(SourceRec(ids.ravel(), None, blocked="input channels are never pruned"))


@register_op("builtin.combine")
def _combine(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    outs[0].items = list(ins)


def _channel_axis(op: Any, ndim: int) -> int:
    fmt = op.attrs().get("data_format", "NCHW")
    return ndim - 1 if fmt in ("NHWC", "NDHWC", "NLC") else 1


@register_op("conv2d", "depthwise_conv2d")
def _conv(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x, w, out = ins[0], ins[1], outs[0]
    if w.param is None:
        unknown_op(state, op, ins, outs, why="conv2d with a non-parameter filter")
        return
    ax = _channel_axis(op, len(x.shape))
    groups = int(op.attrs().get("groups", 1))
    c_in, c_out = x.shape[ax], out.shape[ax]
    if len(w.shape) > 1 and c_in != w.shape[1] * groups:  # PIR's shape inference lets this by
        raise ValueError(
            f"(InvalidArgument) a convolution with filter {w.param} {list(w.shape)} expects "
            f"{w.shape[1] * groups} input channels but gets {c_in} (input {list(x.shape)})")
    in_ids = state.channel_ids(x, ax)
    kernel = int(np.prod(w.shape[2:]))
    spatial = int(np.prod([s for i, s in enumerate(out.shape) if i not in (0, ax)]))
    shape = [1] * len(out.shape)
    shape[ax] = c_out
    if in_ids is None:
        state.block(state.ids_of(x), f"conv input {w.param} mixes channels across positions")
        in_ids = state.fresh(c_in)
        state.sources.append(SourceRec(in_ids, None, blocked="unknown channel layout"))
    if groups == 1:
        out_ids = state.fresh(c_out)
        state.sources.append(SourceRec(out_ids, w.param))
        state.members.append(MemberRec(w.param, 0, out_ids, Role.OUT))
        state.members.append(MemberRec(w.param, 1, in_ids, Role.IN))
        state.macs.append(MacRec(w.param, out_ids, in_ids, kernel, spatial, MacKind.DENSE))
    elif groups == c_in and c_out % c_in == 0:
        mult = c_out // c_in
        out_ids = np.repeat(in_ids, mult)
        state.members.append(MemberRec(w.param, 0, out_ids, Role.PASS))
        state.macs.append(MacRec(w.param, out_ids, in_ids[:1], kernel, spatial, MacKind.DEPTHWISE))
    else:
        out_ids = state.fresh(c_out)
        state.sources.append(SourceRec(out_ids, w.param))
        blocks_in = in_ids.reshape(groups, c_in // groups)
        state.members.append(MemberRec(w.param, 0, out_ids, Role.OUT))
        state.members.append(MemberRec(w.param, 1, blocks_in, Role.IN, blocks=groups))
        state.partitions.append(blocks_in)
        state.partitions.append(out_ids.reshape(groups, c_out // groups))
        state.macs.append(MacRec(w.param, out_ids, blocks_in, kernel, spatial, MacKind.GROUPED))
    out.ids = out_ids.reshape(shape)


@register_op("batch_norm", "batch_norm_", "sync_batch_norm", "sync_batch_norm_", "instance_norm")
def _norm(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x = ins[0]
    ax = _channel_axis(op, len(x.shape))
    ids = state.channel_ids(x, ax)
    params = [v.param for v in ins[1:] if v.param is not None]
    for v in ins[1:]:
        if v.param is not None and v.shape and v.shape[0] != x.shape[ax]:
            raise ValueError(
                f"(InvalidArgument) a normalisation with {v.param} {list(v.shape)} gets "
                f"{x.shape[ax]} channels (input {list(x.shape)})")
    if ids is None:
        unknown_op(state, op, ins, outs, why="normalisation over a mixed channel layout")
        return
    for p in params:
        state.members.append(MemberRec(p, 0, ids, Role.NORM))
    outs[0].ids = state.ids_of(x)


@register_op("matmul")
def _matmul(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x, w, out = ins[0], ins[1], outs[0]
    attrs = op.attrs()
    if w.param is None or attrs.get("transpose_x", False) or len(w.shape) != 2:
        unknown_op(state, op, ins, outs, why="matmul of two activations")
        return
    in_axis = 1 if attrs.get("transpose_y", False) else 0
    xi = state.ids_of(x)
    if xi is None:
        outs[0].ids = None
        return
    # ids along the last axis; constant along leading (batch/sequence) axes
    if any(s != 1 for s in xi.shape[:-1]):
        unknown_op(state, op, ins, outs, why="linear input whose features vary across rows")
        return
    in_ids = _expand(xi.reshape(-1), (x.shape[-1],)).copy()
    out_ids = state.fresh(out.shape[-1])
    state.sources.append(SourceRec(out_ids, w.param))
    state.members.append(MemberRec(w.param, 1 - in_axis, out_ids, Role.OUT))
    state.members.append(MemberRec(w.param, in_axis, in_ids, Role.IN))
    rows = int(np.prod(out.shape[:-1]))
    state.macs.append(MacRec(w.param, out_ids, in_ids, 1, rows, MacKind.DENSE))
    out.ids = out_ids.reshape((1,) * (len(out.shape) - 1) + (-1,))


_ELEMENTWISE = "add subtract multiply divide maximum minimum elementwise_pow".split()


@register_op(*_ELEMENTWISE)
def _elementwise(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    out = outs[0]
    nd = len(out.shape)
    operands = []
    consts = []  # real shapes of operands nobody traces (constants, computed tensors)
    for v in ins:
        ids = state.ids_of(v)
        if ids is None:
            if v.shape:
                consts.append((1,) * (nd - len(v.shape)) + tuple(v.shape))
            continue
        pad = nd - ids.ndim
        real = (1,) * pad + tuple(v.shape)
        operands.append((ids.reshape((1,) * pad + ids.shape), real))
    if not operands:
        out.ids = None
        return
    for real in consts:
        for ids, _ in operands:
            if any(real[ax] > 1 and ids.shape[ax] > 1 for ax in range(nd)):
                # e.g. x * paddle.ones([1, 64, 1, 1]): the constant's size is fixed in the code
                state.block(ids, f"{_op_key(op.name())} with a constant of fixed size along "
                                 "these channels")
    # An operand of real size 1 along an axis is shared by every channel there: no coupling.
    main_ids, main_real = max(operands, key=lambda t: int(np.prod(t[1])))
    for ids, real in operands:
        if ids is main_ids:
            continue
        main_spread = [ax for ax in range(nd) if main_real[ax] == 1 and real[ax] > 1]
        other_spread = [ax for ax in range(nd) if real[ax] == 1 and main_real[ax] > 1]
        if any(ids.shape[ax] > 1 for ax in main_spread):
            unknown_op(state, op, ins, outs, why="broadcast mixing channel axes")
            return
        if any(main_ids.shape[ax] > 1 for ax in other_spread):
            continue  # one value shared across channels (a scalar gate, a spatial map)
        joint = tuple(max(a, b) for a, b in zip(ids.shape, main_ids.shape))
        state.uf.union_arrays(_expand(ids, joint), _expand(main_ids, joint))
    out.ids = main_ids


def _reshape_like(state: TraceState, x: _Val, out: _Val,
                  fn: Callable[[np.ndarray], np.ndarray]) -> None:
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    full = _expand(ids, x.shape)
    out.ids = _compress(fn(full).reshape(out.shape))


_SHAPE_COMPUTED = ("forward code usually computes these sizes from the input's shape, so they "
                   "would not follow a pruned channel count")


def _varying_axes(ids: Optional[np.ndarray]) -> int:
    return 0 if ids is None else sum(1 for s in ids.shape if s > 1)


@register_op("reshape", "flatten", "squeeze", "unsqueeze", "view_shape")
def _reshape(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    _reshape_like(state, ins[0], outs[0], lambda a: a)
    before, after = state.ids_of(ins[0]), outs[0].ids
    if _varying_axes(after) > _varying_axes(before):  # a channel axis split in two (a shuffle)
        state.block(before, f"reshape splits a channel axis; {_SHAPE_COMPUTED}")
    target = ins[1].const if len(ins) > 1 else None
    if _op_key(op.name()) == "reshape" and after is not None:
        literal = target is None or any(
            after.shape[ax] > 1 and target[ax] not in (-1, 0) for ax in range(len(target)))
        if literal:  # a channel count written into the code (e.g. reshape(x, [-1, 2048]))
            state.block(before, "reshape to a fixed channel count")


@register_op("transpose")
def _transpose(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    perm = list(op.attrs()["perm"])
    _reshape_like(state, ins[0], outs[0], lambda a: np.transpose(a, perm))


@register_op("pool2d", "max_pool2d_with_index", "lp_pool2d", "nearest_interp", "bilinear_interp",
             "bicubic_interp", "linear_interp", "trilinear_interp", "pad3d")
def _pool(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x = ins[0]
    ax = _channel_axis(op, len(x.shape))
    ids = state.ids_of(x)
    if ids is not None and any(ids.shape[i] != 1 for i in range(ids.ndim) if i != ax):
        unknown_op(state, op, ins, outs, why="pooling over a mixed channel layout")
        return
    for o in outs:
        o.ids = ids


@register_op("mean", "sum", "max", "min", "amax", "amin", "logsumexp", "prod")
def _reduce(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    axes = ins[1].const if len(ins) > 1 and ins[1].const is not None else op.attrs().get("axis", [])
    axes = [axes] if isinstance(axes, int) else list(axes or range(len(x.shape)))
    axes = sorted({a % len(x.shape) for a in axes})
    if any(ids.shape[a] > 1 for a in axes):
        unknown_op(state, op, ins, outs, why="reduction across channels")
        return
    keep = [i for i in range(len(x.shape)) if i not in axes]
    out.ids = ids if len(out.shape) == len(x.shape) else ids.reshape([ids.shape[i] for i in keep])


@register_op("softmax", "log_softmax", "cumsum")
def _axis_mixing(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    ids = state.ids_of(ins[0])
    # softmax keeps its axis in an attribute; cumsum takes it as an operand (a `full` constant)
    axis_val = ins[1].const if len(ins) > 1 and ins[1].const is not None else \
        op.attrs().get("axis", -1)
    axis = int(np.asarray(axis_val).ravel()[0]) % max(len(ins[0].shape), 1)
    if ids is not None and ids.shape[axis] > 1:
        unknown_op(state, op, ins, outs, why=f"{_op_key(op.name())} across channels")
        return
    outs[0].ids = ids


@register_op("concat")
def _concat(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    parts, out = ins[0].items or [], outs[0]
    axis = int(np.asarray(ins[1].const).ravel()[0]) % len(out.shape)
    pieces = []
    for p in parts:
        ids = state.ids_of(p)
        if ids is None:  # a constant slab: its channels belong to nobody and stay
            ids = state.fresh(p.shape[axis]).reshape(
                [p.shape[axis] if i == axis else 1 for i in range(len(p.shape))])
            state.sources.append(SourceRec(ids.ravel(), None, blocked="constant input to concat"))
        shape = list(out.shape)
        shape[axis] = p.shape[axis]
        pieces.append(_expand(ids, shape))
    out.ids = _compress(np.concatenate(pieces, axis=axis))


@register_op("split", "split_with_num")
def _split(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    axis_val = ins[-1].const if ins[-1].const is not None else op.attrs().get("axis", 0)
    axis = int(np.asarray(axis_val).ravel()[0]) % len(ins[0].shape)
    outs[0].items = [ins[0]]
    outs[0].split_axis = axis
    ids = state.ids_of(ins[0])
    if ids is not None and ids.shape[axis] > 1:
        state.block(ids, f"split along channels; {_SHAPE_COMPUTED}")


@register_op("builtin.split")
def _unpack(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    src = ins[0]
    if src.split_axis is None or not src.items:
        if src.items and len(src.items) == len(outs):  # split of a combine: pass items through
            for o, it in zip(outs, src.items):
                o.ids = state.ids_of(it)
            return
        unknown_op(state, op, ins, outs, why="unpacking an unknown vector")
        return
    x, axis = src.items[0], src.split_axis
    ids = state.ids_of(x)
    start = 0
    for o in outs:
        n = o.shape[axis]
        if ids is not None:
            o.ids = _compress(np.take(_expand(ids, [s if i == axis else ids.shape[i]
                                                      for i, s in enumerate(x.shape)]),
                                      range(start, start + n), axis=axis))
        start += n


@register_op("slice")
def _slice(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x, out = ins[0], outs[0]
    attrs = op.attrs()
    starts = ins[1].const if len(ins) > 1 else attrs.get("starts")
    ends = ins[2].const if len(ins) > 2 else attrs.get("ends")
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    if starts is None or ends is None or attrs.get("decrease_axis"):
        unknown_op(state, op, ins, outs, why="slice with dynamic bounds")
        return
    full = _expand(ids, x.shape)
    index = [slice(None)] * len(x.shape)
    for a, s, e in zip(attrs["axes"], starts, ends):
        index[a] = slice(int(s), int(e))
        if ids.shape[a] > 1 and out.shape[a] != x.shape[a]:
            # x[:, :4] keeps writing 4 after pruning: the bounds cannot follow the channels
            state.block(ids, f"slice along channels; {_SHAPE_COMPUTED}")
    out.ids = _compress(full[tuple(index)].reshape(out.shape))
