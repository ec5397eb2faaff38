"""The built-in op handlers: how channel ids flow through each PIR op the tracer understands.

Each handler is registered with `tracing.register_op`, the same way a user adds one. Importing
this module registers them; it reads op attributes and shapes only, never a parameter.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from .tracing import (MacKind, MacRec, MemberRec, Role, SourceRec, TraceShapeError, TraceState,
                      compress_ids, broadcast_ids, op_key, Val, register_op, unknown_op)


_POINTWISE = (
    "relu relu6 sigmoid hardswish hardsigmoid swish silu gelu tanh leaky_relu elu selu mish "
    "softplus dropout scale cast assign clip abs exp sqrt square pow floor ceil round sign "
    "hard_tanh hardtanh celu logsigmoid tanh_shrink softsign thresholded_relu relu_ "
    "batch_norm_stats_placeholder"
).split()


@register_op(*_POINTWISE)
def _pointwise(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    outs[0].ids = state.ids_of(ins[0])


@register_op("full", "full_int_array", "full_like", "shape", "shape64", "arange", "assign_value",
             "zeros_like", "ones_like", "builtin.constant")
def _constant(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    attrs = op.attrs()
    for o in outs:
        o.const = attrs.get("value")


@register_op("data")
def _data(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    out = outs[0]
    if len(out.shape) >= 2:
        ids = state.fresh(out.shape[1]).reshape((1, -1) + (1,) * (len(out.shape) - 2))
    else:
        ids = state.fresh(1).reshape((1,) * len(out.shape))
    out.ids = ids
    state.sources.append(SourceRec(ids.ravel(), None, blocked="input channels are never pruned"))


@register_op("builtin.combine")
def _combine(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    outs[0].items = list(ins)


def _channel_axis(op: Any, ndim: int) -> int:
    fmt = op.attrs().get("data_format", "NCHW")
    return ndim - 1 if fmt in ("NHWC", "NDHWC", "NLC") else 1


def _dense_filters(state: TraceState, param: str, in_ids: np.ndarray, c_out: int,
                   out_axis: int, in_axis: int, kernel: int, spatial: int) -> np.ndarray:
    """A dense convolution's filters: new output channels on the filter's `out_axis`, the input's
    channels on its `in_axis`; returns the output channel ids."""
    out_ids = state.fresh(c_out)
    state.sources.append(SourceRec(out_ids, param))
    state.members.append(MemberRec(param, out_axis, out_ids, Role.OUT))
    state.members.append(MemberRec(param, in_axis, in_ids, Role.IN))
    state.macs.append(MacRec(param, out_ids, in_ids, kernel, spatial, MacKind.DENSE))
    return out_ids


def _depthwise_filters(state: TraceState, param: str, in_ids: np.ndarray, out_ids: np.ndarray,
                       kernel: int, spatial: int) -> None:
    """A depthwise convolution's filters: axis 0 follows the channels it passes through."""
    state.members.append(MemberRec(param, 0, out_ids, Role.PASS))
    state.macs.append(MacRec(param, out_ids, in_ids[:1], kernel, spatial, MacKind.DEPTHWISE))


@register_op("conv2d", "depthwise_conv2d")
def trace_conv(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x, w, out = ins[0], ins[1], outs[0]
    if w.param is None:
        unknown_op(state, op, ins, outs, why="conv2d with a non-parameter filter")
        return
    ax = _channel_axis(op, len(x.shape))
    groups = int(op.attrs().get("groups", 1))
    c_in, c_out = x.shape[ax], out.shape[ax]
    if len(w.shape) > 1 and c_in != w.shape[1] * groups:  # PIR's shape inference lets this by
        raise TraceShapeError(
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
        out_ids = _dense_filters(state, w.param, in_ids, c_out, 0, 1, kernel, spatial)
    elif groups == c_in and c_out % c_in == 0:
        out_ids = np.repeat(in_ids, c_out // c_in)
        _depthwise_filters(state, w.param, in_ids, out_ids, kernel, spatial)
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
def _norm(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x = ins[0]
    ax = _channel_axis(op, len(x.shape))
    ids = state.channel_ids(x, ax)
    params = [v.param for v in ins[1:] if v.param is not None]
    for v in ins[1:]:
        if v.param is not None and v.shape and v.shape[0] != x.shape[ax]:
            raise TraceShapeError(
                f"(InvalidArgument) a normalisation with {v.param} {list(v.shape)} gets "
                f"{x.shape[ax]} channels (input {list(x.shape)})")
    if ids is None:
        unknown_op(state, op, ins, outs, why="normalisation over a mixed channel layout")
        return
    for p in params:
        state.members.append(MemberRec(p, 0, ids, Role.NORM))
    outs[0].ids = state.ids_of(x)


@register_op("matmul")
def _matmul(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x, w, out = ins[0], ins[1], outs[0]
    attrs = op.attrs()
    if w.param is None or attrs.get("transpose_x", False) or len(w.shape) != 2:
        unknown_op(state, op, ins, outs, why="matmul of two activations")
        if w.param is not None and len(w.shape) == 2 and len(x.shape) >= 1:
            _count_untraced_linear(state, w, x, out)
        return
    in_axis = 1 if attrs.get("transpose_y", False) else 0
    xi = state.ids_of(x)
    # ids along the last axis; constant along leading (batch/sequence) axes
    if xi is None or any(s != 1 for s in xi.shape[:-1]):
        if xi is None:
            xi = state.fresh(x.shape[-1]).reshape((1,) * (len(x.shape) - 1) + (-1,))
            state.sources.append(SourceRec(xi.ravel(), None, blocked="untraced linear input"))
        else:
            unknown_op(state, op, ins, outs, why="linear input whose features vary across rows")
            _count_untraced_linear(state, w, x, out)
            return
    in_ids = broadcast_ids(xi.reshape(-1), (x.shape[-1],)).copy()
    out_ids = state.fresh(out.shape[-1])
    state.sources.append(SourceRec(out_ids, w.param))
    state.members.append(MemberRec(w.param, 1 - in_axis, out_ids, Role.OUT))
    state.members.append(MemberRec(w.param, in_axis, in_ids, Role.IN))
    rows = _rows_per_sample(state, out.shape)
    state.macs.append(MacRec(w.param, out_ids, in_ids, 1, rows, MacKind.DENSE))
    out.ids = out_ids.reshape((1,) * (len(out.shape) - 1) + (-1,))


def _rows_per_sample(state: TraceState, shape: Sequence[int]) -> int:
    """Rows of a linear's output per input sample: all leading axes (windows or patches folded
    into axis 0 count) over the network's batch, as `layers.registry.per_sample_rows`."""
    lead = [max(int(s), 1) for s in shape[:-1]]
    if not lead:
        return 1
    return max(int(np.prod(lead)) // max(state.batch or 1, 1), 1)


def _count_untraced_linear(state: TraceState, w: Val, x: Val, out: Val) -> None:
    """A linear layer on a path we cannot follow still costs MACs: count them on fixed ids, so
    predicted FLOPs equal counted FLOPs."""
    out_ids = np.asarray(out.ids).ravel() if out.ids is not None else state.fresh(out.shape[-1])
    if out_ids.size != out.shape[-1]:
        out_ids = state.fresh(out.shape[-1])
    rows = _rows_per_sample(state, out.shape)
    state.macs.append(MacRec(w.param, out_ids, state.fresh(x.shape[-1]), 1, rows,
                             MacKind.DENSE))


_ELEMENTWISE = "add subtract multiply divide maximum minimum elementwise_pow".split()


@register_op(*_ELEMENTWISE)
def trace_elementwise(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
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
        for ids, full in operands:
            if any(real[ax] > 1 and ids.shape[ax] > 1 for ax in range(nd)):
                if state.in_training and tuple(real) == tuple(full):
                    # shaped like the operand (DropBlock's `rand(x.shape)`, static in the
                    # program): a training run of a pruned copy tells if the code computes it
                    state.train_trials.append((np.unique(ids), "a constant shaped like its "
                                                              "input in the training forward"))
                    continue
                # e.g. x * paddle.ones([1, 64, 1, 1]): the constant's size is fixed in the code
                state.block(ids, f"{op_key(op.name())} with a constant of fixed size along "
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
        state.uf.union_arrays(broadcast_ids(ids, joint), broadcast_ids(main_ids, joint))
    out.ids = main_ids


def reshape_like(state: TraceState, x: Val, out: Val,
                  fn: Callable[[np.ndarray], np.ndarray]) -> None:
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    full = broadcast_ids(ids, x.shape)
    out.ids = compress_ids(fn(full).reshape(out.shape))


_SHAPE_COMPUTED = ("forward code usually computes these sizes from the input's shape, so they "
                   "would not follow a pruned channel count")


def _varying_axes(ids: Optional[np.ndarray]) -> int:
    return 0 if ids is None else sum(1 for s in ids.shape if s > 1)


_SHUFFLE_TRIAL = "channel shuffle"
LITERAL_TRIAL = ("reshape to a fixed channel count? (the program shows the reshape's sizes as "
                 "literals: the forward must read the channel count from the tensor, e.g. "
                 "x.reshape([x.shape[0], -1]), not write it, e.g. reshape(x, [-1, 2048]))")


def _tie_runs(state: TraceState, after: np.ndarray, target: Optional[Sequence[int]]) -> bool:
    """A reshape cutting one channel axis into two (`[n, c] -> [n, g, c // g]`, the first
    step of a channel shuffle): tie position i of every run together, so every run keeps the
    same positions. Then the pruned network, which reshapes its `c'` channels into runs of
    `c' // g`, meets the kept channels of each run at the same places as the masked network
    meets them, and whatever it does next (transpose and merge back: a shuffle) keeps them in
    the original relative order. The runs are the outer axis unless the code wrote -1 for it
    (`[n, -1, g]`): then the inner axis holds the runs' positions and whole rows are tied.
    A trial prune checks the guess (`TraceState.trials`). Returns False if not such a cut."""
    varying = [ax for ax, s in enumerate(after.shape) if s > 1]
    if len(varying) != 2:
        return False
    outer, inner = varying
    grid = np.moveaxis(after, (outer, inner), (0, 1)).reshape(after.shape[outer],
                                                               after.shape[inner])
    if target is not None and len(target) == after.ndim and target[outer] == -1:
        state.uf.union_arrays(grid, np.repeat(grid[:, :1], grid.shape[1], axis=1), tie=True)
    else:
        state.uf.union_arrays(grid, np.repeat(grid[:1, :], grid.shape[0], axis=0), tie=True)
    return True


@register_op("reshape", "flatten", "squeeze", "unsqueeze", "view_shape")
def _reshape(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    reshape_like(state, ins[0], outs[0], lambda a: a)
    before, after = state.ids_of(ins[0]), outs[0].ids
    target = ins[1].const if len(ins) > 1 else None
    target = list(np.asarray(target).ravel()) if target is not None else None
    cut = _varying_axes(before) == 1 and _varying_axes(after) == 2
    joined = _varying_axes(before) == 2 and _varying_axes(after) == 1
    if cut and _tie_runs(state, after, target):
        state.trials.append((np.unique(before), _SHUFFLE_TRIAL))
        return
    if _varying_axes(after) > _varying_axes(before):  # cut in more than two: not followed
        state.block(before, "reshape splits a channel axis into more than two axes")
    if joined:  # sizes of a shuffle's second reshape: a trial prune checks they follow
        state.trials.append((np.unique(before), _SHUFFLE_TRIAL))
        return
    # paddle reshapes a bias to [1, C, 1, 1] with sizes read from the parameter at run time
    param_view = ins[0].param is not None and _varying_axes(before) == _varying_axes(after) == 1
    if op_key(op.name()) == "reshape" and after is not None and not param_view:
        literal = target is None or any(
            after.shape[ax] > 1 and target[ax] not in (-1, 0) for ax in range(len(target)))
        if literal and before is not None:
            # Static shapes show every size as a literal, whether the code wrote it
            # (reshape(x, [-1, 2048])) or read it from the tensor (x.reshape([x.shape[0],
            # x.shape[1]])): a trial prune of a copy, run eagerly, tells them apart.
            state.trials.append((np.unique(before), LITERAL_TRIAL))


@register_op("transpose")
def _transpose(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    perm = list(op.attrs()["perm"])
    reshape_like(state, ins[0], outs[0], lambda a: np.transpose(a, perm))


@register_op("pool2d", "max_pool2d_with_index", "lp_pool2d", "nearest_interp", "bilinear_interp",
             "bicubic_interp", "linear_interp", "trilinear_interp", "pad3d")
def _pool(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x = ins[0]
    ax = _channel_axis(op, len(x.shape))
    ids = state.ids_of(x)
    if ids is not None and any(ids.shape[i] != 1 for i in range(ids.ndim) if i != ax):
        unknown_op(state, op, ins, outs, why="pooling over a mixed channel layout")
        return
    for o in outs:
        o.ids = ids


@register_op("mean", "sum", "max", "min", "amax", "amin", "logsumexp", "prod")
def _reduce(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
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
def _axis_mixing(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    ids = state.ids_of(ins[0])
    # softmax keeps its axis in an attribute; cumsum takes it as an operand (a `full` constant)
    axis_val = ins[1].const if len(ins) > 1 and ins[1].const is not None else \
        op.attrs().get("axis", -1)
    axis = int(np.asarray(axis_val).ravel()[0]) % max(len(ins[0].shape), 1)
    if ids is not None and ids.shape[axis] > 1:
        unknown_op(state, op, ins, outs, why=f"{op_key(op.name())} across channels")
        return
    outs[0].ids = ids


@register_op("concat")
def _concat(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
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
        pieces.append(broadcast_ids(ids, shape))
    out.ids = compress_ids(np.concatenate(pieces, axis=axis))


def _equal_parts(state: TraceState, ids: np.ndarray, axis: int, size: int, parts: int,
                 what: str) -> bool:
    """Record that the channels along `axis` are cut into `parts` equal runs that must stay
    equal after pruning; False when they cannot be (ids vary elsewhere, or do not divide)."""
    line = ids.reshape(-1) if _varying_axes(ids) == 1 and ids.shape[axis] > 1 else None
    if line is None or parts < 2 or size % parts:
        return False
    runs = broadcast_ids(line, (size,)).reshape(parts, size // parts).copy()
    state.partitions.append((runs, what))
    return True


_EQUAL_PARTS = ("split into equal parts: the forward computes the part sizes from the channel "
                "count, so every part loses the same number of channels")


@register_op("split", "split_with_num")
def _split(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    axis_val = ins[-1].const if ins[-1].const is not None else op.attrs().get("axis", 0)
    x = ins[0]
    axis = int(np.asarray(axis_val).ravel()[0]) % len(x.shape)
    outs[0].items = [x]
    outs[0].split_axis = axis
    ids = state.ids_of(x)
    if ids is None or ids.shape[axis] == 1:
        return
    if op_key(op.name()) == "split_with_num":
        parts = int(op.attrs().get("num", 0))
    else:  # sections: equal ones are what `x.shape[1] // n` gives; unequal ones are literal
        sections = ins[1].const if len(ins) > 2 else op.attrs().get("sections")
        sizes = np.asarray(sections if sections is not None else [], dtype=np.int64).ravel()
        parts = len(sizes) if len(sizes) and (sizes == sizes[0]).all() else 0
    if not _equal_parts(state, ids, axis, x.shape[axis], parts, "split"):
        state.block(ids, f"split along channels into unequal or literal sizes; "
                         f"{_SHAPE_COMPUTED}")


@register_op("builtin.split")
def _unpack(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
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
            o.ids = compress_ids(np.take(broadcast_ids(ids, [s if i == axis else ids.shape[i]
                                                      for i, s in enumerate(x.shape)]),
                                      range(start, start + n), axis=axis))
        start += n


def _slice_part(size: int, start: int, end: int) -> Optional[int]:
    """n when [start, end) is one of n equal parts of `size` channels (`x[:, :c // 2]`, the
    bounds computed from the count), else None."""
    start, end = (start + size if start < 0 else start), min(end + size if end < 0 else end, size)
    width = end - start
    if width <= 0 or size % width or start % width:
        return None
    return size // width


@register_op("slice")
def _slice(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
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
    full = broadcast_ids(ids, x.shape)
    index = [slice(None)] * len(x.shape)
    for a, s, e in zip(attrs["axes"], starts, ends):
        index[a] = slice(int(s), int(e))
        if ids.shape[a] > 1 and out.shape[a] != x.shape[a]:
            part = _slice_part(x.shape[a], int(s), int(e))
            if part is None or not _equal_parts(state, ids, a, x.shape[a], part, "slice"):
                # x[:, 3:] keeps writing 3 after pruning: the bounds cannot follow the channels
                state.block(ids, f"slice along channels; {_SHAPE_COMPUTED}")
    out.ids = compress_ids(full[tuple(index)].reshape(out.shape))


# ---------------------------------------------------------------------------------------------
# Ops that keep channels where they are: each checks that the axes it moves, mixes or
# resizes carry no varying channel ids, and gives up otherwise.
# ---------------------------------------------------------------------------------------------


def axes_operand(op: Any, ins: List[Val], ndim: int, operand: int = 1) -> Optional[List[int]]:
    """The axes an op works along, from its `axis` attribute or a constant operand."""
    value = op.attrs().get("axis")
    if value is None and len(ins) > operand:
        value = ins[operand].const
    if value is None:
        return None
    axes = np.asarray(value).ravel().tolist()
    return sorted({int(a) % max(ndim, 1) for a in axes})


def _keeps_channels(state: TraceState, op: Any, ins: List[Val], outs: List[Val],
                    axes: Optional[List[int]], what: str) -> bool:
    """True (and the output's ids set, broadcast to its shape) when `axes` carry no varying ids;
    else the op is given up on."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return True
    if axes is None or any(ids.shape[a] > 1 for a in axes if a < ids.ndim):
        unknown_op(state, op, ins, outs, why=f"{what} along channels")
        return False
    shape = [1 if ids.shape[a] == 1 else s for a, s in enumerate(out.shape)]
    out.ids = ids.reshape(shape)
    return True


@register_op("roll")
def _roll(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    ndim = len(ins[0].shape)
    axes = op.attrs().get("axis")
    # roll without an axis flattens first: every axis moves
    axes = list(range(ndim)) if not axes else sorted({int(a) % ndim for a in axes})
    _keeps_channels(state, op, ins, outs, axes, "roll")


@register_op("index_select")
def _index_select(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    axis = int(op.attrs().get("axis", 0)) % max(len(ins[0].shape), 1)
    _keeps_channels(state, op, ins, outs, [axis], "index_select")


@register_op("gather")
def _gather(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    if len(ins[0].shape) != len(outs[0].shape):
        unknown_op(state, op, ins, outs, why="gather that changes the rank")
        return
    axes = axes_operand(op, ins, len(ins[0].shape), operand=2) or [0]
    _keeps_channels(state, op, ins, outs, axes, "gather")


@register_op("expand", "expand_as", "broadcast_to", "tile")
def _expand_op(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    pad = len(out.shape) - ids.ndim
    ids = ids.reshape((1,) * pad + ids.shape)
    real = (1,) * pad + tuple(x.shape)
    grown = [a for a in range(len(out.shape)) if ids.shape[a] > 1 and out.shape[a] != real[a]]
    if grown:  # tile repeats channels: a copy the pruned count cannot follow
        unknown_op(state, op, ins, outs, why="repeating channels")
        return
    out.ids = ids


@register_op("unfold")
def _unfold(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """[N, C, H, W] -> [N, C*kh*kw, L]: channel c owns rows c*kh*kw .. (c+1)*kh*kw - 1."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    if any(ids.shape[a] > 1 for a in range(ids.ndim) if a != 1):
        unknown_op(state, op, ins, outs, why="unfold of a mixed channel layout")
        return
    patch = int(np.prod(op.attrs().get("kernel_sizes", [1])))
    line = np.repeat(broadcast_ids(ids.reshape(-1), (x.shape[1],)), patch)
    out.ids = compress_ids(line.reshape(1, -1, 1))


@register_op("set_value", "set_value_", "set_value_with_tensor", "set_value_with_tensor_")
def _set_value(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """`x[..., a:b, ...] = v` along axes that carry no channels: channels pass; a tensor value
    written into them shares their channels."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    axes = [int(a) % len(x.shape) for a in op.attrs().get("axes", [])]
    value = ins[1] if op_key(op.name()).startswith("set_value_with_tensor") else None
    if ids is None and (value is None or state.ids_of(value) is None):
        out.ids = None  # a constant written into a constant (Swin's shifted-window mask)
        return
    if ids is None or any(ids.shape[a] > 1 for a in axes):
        unknown_op(state, op, ins, outs, why="set_value on channel slices")
        return
    value = ins[1] if op_key(op.name()).startswith("set_value_with_tensor") else None
    vids = state.ids_of(value) if value is not None else None
    if vids is not None and _varying_axes(vids):
        pad = len(x.shape) - vids.ndim
        vids = vids.reshape((1,) * pad + vids.shape)
        joint = tuple(max(a, b) for a, b in zip(vids.shape, ids.shape))
        if any(vids.shape[a] > 1 for a in axes):
            unknown_op(state, op, ins, outs, why="set_value with a value mixing channels")
            return
        state.uf.union_arrays(broadcast_ids(vids, joint), broadcast_ids(ids, joint))
    out.ids = ids


@register_op("prelu")
def _prelu(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """PReLU: one slope for all channels passes them; one slope per channel is a per-channel
    affine of the channel axis (sliced with it); one per element is given up on."""
    x, alpha = ins[0], ins[1]
    mode = op.attrs().get("mode", "channel")
    ids = state.ids_of(x)
    size = int(np.prod(alpha.shape)) if alpha.shape else 1
    if mode == "all" or size == 1:
        outs[0].ids = ids
        return
    ax = _channel_axis(op, len(x.shape))
    line = state.channel_ids(x, ax) if ids is not None else None
    if mode != "channel" or alpha.param is None or line is None:
        unknown_op(state, op, ins, outs, why=f"prelu mode {mode!r} over a mixed layout")
        return
    state.members.append(MemberRec(alpha.param, 0, line, Role.NORM))
    outs[0].ids = ids


@register_op("conv2d_transpose", "depthwise_conv2d_transpose")
def _conv_transpose(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Transposed convolution: filter [in, out/groups, kh, kw], so its axis 0 reads the input's
    channels and axis 1 makes the output's. MACs scale with the input's positions."""
    x, w, out = ins[0], ins[1], outs[0]
    ax = _channel_axis(op, len(x.shape))
    groups = int(op.attrs().get("groups", 1))
    in_ids = state.channel_ids(x, ax) if state.ids_of(x) is not None else None
    if w.param is None or in_ids is None or groups not in (1, x.shape[ax]):
        unknown_op(state, op, ins, outs, why="transposed conv with groups, a computed filter "
                                             "or a mixed channel layout")
        return
    c_out = out.shape[ax]
    kernel = int(np.prod(w.shape[2:]))
    spatial = int(np.prod([s for i, s in enumerate(x.shape) if i not in (0, ax)]))
    shape = [1] * len(out.shape)
    shape[ax] = c_out
    if groups == 1:  # filter [in, out, ...]: the transpose of a conv's
        out_ids = _dense_filters(state, w.param, in_ids, c_out, 1, 0, kernel, spatial)
    elif c_out == x.shape[ax]:  # depthwise: channel k in, channel k out
        out_ids = in_ids
        _depthwise_filters(state, w.param, in_ids, out_ids, kernel, spatial)
    else:
        unknown_op(state, op, ins, outs, why="depthwise transposed conv with a multiplier")
        return
    out.ids = out_ids.reshape(shape)


LAYER_NORM_REASON = (
    "LayerNorm normalises over these channels: removing some changes the mean and variance "
    "every kept channel is normalised with, so the pruned network would not equal the masked "
    "one; they stay whole (the layers between LayerNorms, e.g. MLP hidden channels, prune)")


@register_op("layer_norm", "rms_norm")
def _layer_norm(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Normalisation over the trailing axes from `begin_norm_axis`: channels on the leading axes
    pass through; channels on the normalised axes pass but stay whole (LAYER_NORM_REASON)."""
    x = ins[0]
    ids = state.ids_of(x)
    begin = int(op.attrs().get("begin_norm_axis", len(x.shape) - 1)) % max(len(x.shape), 1)
    if ids is not None and any(ids.shape[a] > 1 for a in range(begin, ids.ndim)):
        state.block(ids, LAYER_NORM_REASON)
    outs[0].ids = ids


@register_op("group_norm")
def _group_norm(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """GroupNorm prunes whole groups: a group's statistics mix its channels, so they are joined
    into one prunable unit (removing a whole group leaves every other group's statistics, and
    so the network, exactly as masking would). One channel per group is a per-channel norm."""
    x = ins[0]
    ax = _channel_axis(op, len(x.shape))
    groups = int(op.attrs().get("groups", 1))
    ids = state.ids_of(x)
    line = state.channel_ids(x, ax) if ids is not None else None
    if ids is None:
        outs[0].ids = None
        return
    if line is None or groups < 1 or x.shape[ax] % groups:
        unknown_op(state, op, ins, outs, why="group_norm over a mixed channel layout")
        return
    runs = line.reshape(groups, -1)
    state.uf.union_arrays(np.repeat(runs[:, :1], runs.shape[1], axis=1), runs)
    for v in ins[1:]:
        if v.param is not None:
            state.members.append(MemberRec(v.param, 0, line, Role.NORM))
    outs[0].ids = ids


@register_op("stack")
def _stack(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Stacking shape scalars (`[paddle.shape(x)[0], 8, 256]`) carries no channels; stacking
    traced tensors is given up on."""
    parts = ins[0].items or []
    if any(state.ids_of(p) is not None for p in parts):
        unknown_op(state, op, ins, outs, why="stacking traced tensors")
        return
    outs[0].ids = None
    # a shape vector: literal sizes where written, -1 where computed at run time (those follow
    # a pruned channel count, like -1 and 0 do)
    consts = [np.asarray(p.const).ravel() if p.const is not None else None for p in parts]
    if all(c is None or c.size == 1 for c in consts):
        outs[0].const = [int(c[0]) if c is not None else -1 for c in consts]
