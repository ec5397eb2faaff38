"""Trace a paddle.nn.Layer into groups of coupled channels.

We read the PIR program that `paddle.jit.to_static` builds (every op with its attributes and static
shapes) and follow "channel ids" through it: each producer (conv, linear) mints one id per output
channel; every op says how ids flow from its inputs to its outputs (an op handler registry).
Residual adds union ids, concats lay them side by side, reshapes move them. Anything an op handler
does not understand blocks the ids it touches, so their groups are never pruned. This module only
reads the network; it never changes a parameter.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Channel ids: each value carries an int array of its (batch-1) shape, compressed so that axes
# along which the ids are constant have size 1. Ids are joined by a union-find.
# ---------------------------------------------------------------------------------------------


class _UnionFind:
    """Ids are minted in program order; unions are recorded and resolved in one vectorised pass
    (handlers never need roots while the trace runs). A class's root is its smallest id, so
    classes sort in program order."""

    def __init__(self) -> None:
        self.size = 0
        self._pairs: List[Tuple[np.ndarray, np.ndarray]] = []
        self._root: Optional[np.ndarray] = None

    def fresh(self, n: int) -> np.ndarray:
        start = self.size
        self.size += n
        return np.arange(start, start + n, dtype=np.int64)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        self._pairs.append((np.asarray(a, dtype=np.int64).ravel(),
                            np.asarray(b, dtype=np.int64).ravel()))
        self._root = None

    def root_table(self) -> np.ndarray:
        """root_table()[i] is the root of id i."""
        if self._root is None or len(self._root) != self.size:
            a = np.concatenate([p[0] for p in self._pairs]) if self._pairs else np.zeros(0, int)
            b = np.concatenate([p[1] for p in self._pairs]) if self._pairs else np.zeros(0, int)
            self._root = _components(self.size, a, b)
        return self._root

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.root_table()[np.asarray(ids, dtype=np.int64)]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes with edges (a[k], b[k]): each node's smallest member.

    Hook every tree root onto the smallest root across its edges, then jump pointers; each round
    at least halves the number of trees in a component.
    """
    parent = np.arange(n, dtype=np.int64)
    keep = a != b
    a, b = a[keep], b[keep]
    if len(a):
        edges = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)]), axis=1)
        a, b = edges[0], edges[1]
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        np.minimum.at(parent, hi[live], lo[live])
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        a, b = a[live], b[live]
    return parent


def _compress(ids: np.ndarray) -> np.ndarray:
    """Shrink every axis along which `ids` is constant to size 1."""
    for ax in range(ids.ndim):
        if ids.shape[ax] > 1:
            first = np.take(ids, [0], axis=ax)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return ids


def _expand(ids: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(ids, tuple(shape)))


@dataclass
class _Val:
    """What the tracer knows about one PIR value."""

    shape: Tuple[int, ...] = ()
    ids: Optional[np.ndarray] = None  # compressed channel ids, same ndim as shape
    param: Optional[str] = None  # paddle parameter name when the value is a parameter
    const: Any = None  # python value of a constant (full, full_int_array)
    items: Optional[List["_Val"]] = None  # builtin.combine / split vectors
    split_axis: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# Records the tracer leaves behind
# ---------------------------------------------------------------------------------------------


class Role(str, enum.Enum):
    """What a parameter axis does with a group's channels. A `str` enum: `role == "in"` holds."""

    OUT = "out"  # a producer's output axis (conv filters, linear columns)
    IN = "in"  # a consumer's input axis: it mixes the group's channels
    NORM = "norm"  # a per-channel affine (BatchNorm scale and shift, a learnable scale, a bias)
    PASS = "pass"  # a depthwise conv's filters: channels pass through one by one

    def __str__(self) -> str:
        return self.value


class MacKind(str, enum.Enum):
    """How a conv/linear op's multiply-accumulates scale with its channels."""

    DENSE = "dense"
    GROUPED = "grouped"
    DEPTHWISE = "depthwise"

    def __str__(self) -> str:
        return self.value


@dataclass
class MemberRec:
    """A parameter slice whose index i along `axis` carries channel id `ids[i]`.

    For grouped convolutions (`blocks > 1`, axis 1 of the weight) `ids` has shape
    [blocks, in_per_block]: row k lists the input channels seen by output block k.
    """

    param: str  # paddle parameter name
    axis: int
    ids: np.ndarray
    role: Role
    blocks: int = 1


@dataclass
class SourceRec:
    """Fresh ids minted by one op (a producer layer, the input, or an op we cannot follow)."""

    ids: np.ndarray
    param: Optional[str]  # the producing weight, None for the input or unknown ops
    blocked: Optional[str] = None  # reason, when these channels must never be pruned


@dataclass
class MacRec:
    """One conv/linear op for FLOPs counting: MACs = out * in_per_group * kernel * spatial."""

    param: str
    out_ids: np.ndarray  # ids of output channels (1-D)
    in_ids: np.ndarray  # ids of input channels (1-D, or [blocks, per_block] for grouped)
    kernel: int
    spatial: int
    kind: MacKind


class TraceState:
    """Mutable state the op handlers work on."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.vals: Dict[str, _Val] = {}
        self.members: List[MemberRec] = []
        self.sources: List[SourceRec] = []
        self.blocks: List[Tuple[np.ndarray, str]] = []
        self.macs: List[MacRec] = []
        self.partitions: List[np.ndarray] = []  # [blocks, per_block] id arrays to split equally
        self.param_elems: Dict[str, np.ndarray] = {}  # param name -> element ids (full shape)
        self.unknown_ops: Dict[str, int] = {}
        # parameters some use of which we do not follow (control flow, unknown ops) -> why
        self.opaque_params: Dict[str, str] = {}

    # -- helpers for handlers -----------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.uf.fresh(n)

    def block(self, ids: Optional[np.ndarray], reason: str) -> None:
        if ids is not None and ids.size:
            self.blocks.append((np.unique(ids), reason))

    def ids_of(self, v: _Val) -> Optional[np.ndarray]:
        """Channel ids of a value; a parameter gets one id per element, minted on first use."""
        if v.ids is None and v.param is not None:
            if v.param not in self.param_elems:
                n = int(np.prod(v.shape)) if v.shape else 1
                self.param_elems[v.param] = self.fresh(n).reshape(v.shape)
            v.ids = _compress(self.param_elems[v.param])
        return v.ids

    def channel_ids(self, v: _Val, axis: int) -> Optional[np.ndarray]:
        """1-D ids along `axis` if they are constant along every other axis, else None."""
        ids = self.ids_of(v)
        if ids is None:
            return None
        other = [ax for ax in range(ids.ndim) if ax != axis]
        if any(ids.shape[ax] != 1 for ax in other):
            return None
        return _expand(ids.reshape(-1), (v.shape[axis],)).copy()


OpHandler = Callable[[TraceState, Any, List[_Val], List[_Val]], None]
_OP_HANDLERS: Dict[str, OpHandler] = {}


def register_op(*names: str) -> Callable[[OpHandler], OpHandler]:
    """Register how channel ids flow through PIR ops: the public way to support a new op.

    An op without a handler blocks every channel it touches (with a warning naming it), so a
    network using it still prunes correctly, only less. A handler runs once per op, in program
    order, as `handler(state, op, ins, outs)`: `op` is the PIR operation (`op.name()`,
    `op.attrs()`), `ins`/`outs` its values (each with a static `.shape`). It sets `out.ids` for
    every output, from what `state` offers:

    - `state.ids_of(v)`: the channel ids of an input (None: untraced, e.g. a constant);
    - `state.channel_ids(v, axis)`: 1-D ids along `axis`, None if they vary along other axes;
    - `state.fresh(n)`: n new ids, for outputs that mix channels (a new channel space);
    - `state.block(ids, reason)`: channels that must never be pruned, and why.

    Channel ids are arrays of the value's rank, of size 1 along axes where they do not vary.

    Args:
        *names: op names without the dialect prefix (`"erf"` for `pd_op.erf`); an in-place
            variant (`erf_`) uses the same handler.

    Returns:
        A decorator registering the handler and returning it unchanged.

    Examples:
        >>> @register_op("erf")  # elementwise: each channel maps to itself
        ... def _(state, op, ins, outs):
        ...     outs[0].ids = state.ids_of(ins[0])
    """

    def deco(fn: OpHandler) -> OpHandler:
        for n in names:
            _OP_HANDLERS[n] = fn
        return fn

    return deco


def _op_key(name: str) -> str:
    short = name.split(".", 1)[1] if name.startswith(("pd_op.", "builtin.")) else name
    if name.startswith("builtin."):
        return "builtin." + short
    return short[:-1] if short.endswith("_") and short[:-1] in _OP_HANDLERS else short


# ---------------------------------------------------------------------------------------------
# Op handlers
# ---------------------------------------------------------------------------------------------

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
        _unknown(state, op, ins, outs, why="conv2d with a non-parameter filter")
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
        _unknown(state, op, ins, outs, why="normalisation over a mixed channel layout")
        return
    for p in params:
        state.members.append(MemberRec(p, 0, ids, Role.NORM))
    outs[0].ids = state.ids_of(x)


@register_op("matmul")
def _matmul(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val]) -> None:
    x, w, out = ins[0], ins[1], outs[0]
    attrs = op.attrs()
    if w.param is None or attrs.get("transpose_x", False) or len(w.shape) != 2:
        _unknown(state, op, ins, outs, why="matmul of two activations")
        return
    in_axis = 1 if attrs.get("transpose_y", False) else 0
    xi = state.ids_of(x)
    if xi is None:
        outs[0].ids = None
        return
    # ids along the last axis; constant along leading (batch/sequence) axes
    if any(s != 1 for s in xi.shape[:-1]):
        _unknown(state, op, ins, outs, why="linear input whose features vary across rows")
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
            _unknown(state, op, ins, outs, why="broadcast mixing channel axes")
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
        _unknown(state, op, ins, outs, why="pooling over a mixed channel layout")
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
        _unknown(state, op, ins, outs, why="reduction across channels")
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
        _unknown(state, op, ins, outs, why=f"{_op_key(op.name())} across channels")
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
        _unknown(state, op, ins, outs, why="unpacking an unknown vector")
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
        _unknown(state, op, ins, outs, why="slice with dynamic bounds")
        return
    full = _expand(ids, x.shape)
    index = [slice(None)] * len(x.shape)
    for a, s, e in zip(attrs["axes"], starts, ends):
        index[a] = slice(int(s), int(e))
        if ids.shape[a] > 1 and out.shape[a] != x.shape[a]:
            # x[:, :4] keeps writing 4 after pruning: the bounds cannot follow the channels
            state.block(ids, f"slice along channels; {_SHAPE_COMPUTED}")
    out.ids = _compress(full[tuple(index)].reshape(out.shape))


def _unknown(state: TraceState, op: Any, ins: List[_Val], outs: List[_Val], why: str = "") -> None:
    name = op.name()
    state.unknown_ops[name] = state.unknown_ops.get(name, 0) + 1
    reason = f"op {name} is not supported" + (f" ({why})" if why else "")
    for v in ins:
        for item in (v.items or [v]):
            if item.param is not None:  # a layer's weight read by this op too: keep its shape
                state.opaque_params.setdefault(item.param, f"also read by {reason}")
            else:
                state.block(state.ids_of(item), reason)
    for o in outs:
        if o.shape:
            n = o.shape[1] if len(o.shape) >= 2 else o.shape[0]
            shape = [1] * len(o.shape)
            shape[1 if len(o.shape) >= 2 else 0] = n
            o.ids = state.fresh(n).reshape(shape)
            state.sources.append(SourceRec(o.ids.ravel(), None, blocked=reason))


# ---------------------------------------------------------------------------------------------
# Running a trace
# ---------------------------------------------------------------------------------------------


def _shape_of(value: Any) -> Tuple[int, ...]:
    try:
        return tuple(int(s) for s in value.shape)
    except Exception:  # vectors have no shape
        return ()


def build_program(net: paddle.nn.Layer, input_shape: Sequence[int]) -> Tuple[Any, List[Any]]:
    """The PIR main program of `net` for one input of `input_shape`, and its output values.

    `paddle.jit.to_static` replaces `net.forward` in place; we undo that before returning.
    """
    from paddle.static import InputSpec

    had_forward = "forward" in net.__dict__
    old_forward = net.__dict__.get("forward")
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        static = paddle.jit.to_static(
            net, input_spec=[InputSpec(list(input_shape), "float32", "x")], full_graph=True
        )
        with _no_op_callstacks():
            concrete = static.forward.concrete_program
        return concrete.main_program, list(concrete.outputs)
    except OSError as e:  # inspect could not read forward's source
        raise TypeError(
            f"cannot trace {type(net).__name__}: paddle.jit.to_static reads the source code of "
            "every forward() it converts, and this one has none (defined in an interactive "
            "session or by exec?). Define the network in a .py file.") from e
    finally:
        if had_forward:
            net.__dict__["forward"] = old_forward
        else:
            net.__dict__.pop("forward", None)
        for layer, training in modes:
            layer.training = training


class _QuietStacks:
    """Stands in for `traceback.extract_stack`: an empty stack for argument-less calls made on a
    thread inside `_no_op_callstacks`, the real function for every other call."""

    def __init__(self, original: Callable[..., traceback.StackSummary]) -> None:
        self.original = original
        self.users = 0

    def __call__(self, *args: Any, **kwargs: Any) -> traceback.StackSummary:
        if not args and not kwargs and getattr(_TRACING, "depth", 0):
            return traceback.StackSummary()
        return self.original(*args, **kwargs)


_TRACING = threading.local()  # depth of _no_op_callstacks blocks on this thread
_QUIET_LOCK = threading.Lock()
_quiet: Optional[_QuietStacks] = None  # installed while any thread traces


@contextlib.contextmanager
def _no_op_callstacks() -> Iterator[None]:
    """Skip the Python stack PIR records on every op it builds (only for error messages; on a
    DenseNet121 two thirds of the tracing time).

    Paddle 3.3.1 has no flag for this: its C++ op builder (pybind/op_callstack_utils.cc) always
    calls `traceback.extract_stack()`. So while this thread is inside the block that function
    returns an empty stack to argument-less calls from this thread; other threads, and calls
    with a frame or limit, get the real one. It is restored when the last tracer leaves, even on
    an exception (unless someone replaced it meanwhile: theirs stays and calls through ours).
    Conversion errors keep their own Python tracebacks.
    """
    global _quiet
    with _QUIET_LOCK:
        if _quiet is None:
            _quiet = _QuietStacks(traceback.extract_stack)
            traceback.extract_stack = _quiet
        quiet = _quiet
        quiet.users += 1
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        yield
    finally:
        _TRACING.depth -= 1
        with _QUIET_LOCK:
            quiet.users -= 1
            if quiet.users == 0:
                if traceback.extract_stack is quiet:
                    traceback.extract_stack = quiet.original
                else:
                    logger.debug("traceback.extract_stack was replaced while tracing; left as is")
                _quiet = None


def _enter_control_flow(state: TraceState, op: Any, blocks: List[Any]) -> None:
    """Ops inside an `if`/`while` body read outer values without naming them as operands. We do
    not trace bodies: every outer value they read keeps its channels, and so does every
    parameter they use (a layer called there must not be sliced for its calls elsewhere)."""
    reason = f"used inside control flow ({op.name()})"
    stack = list(blocks)
    while stack:
        block = stack.pop()
        for inner in block.ops:
            stack.extend(list(inner.blocks()))
            for operand in inner.operands():
                src = operand.source()
                if not src.initialized():
                    continue
                v = state.vals.get(src.id)
                if v is None:
                    continue
                if v.param is not None:
                    state.opaque_params.setdefault(v.param, reason)
                else:
                    state.block(state.ids_of(v), reason)


def run_trace(program: Any, outputs: Sequence[Any]) -> TraceState:
    """Walk the program's ops in order, letting each op handler move channel ids."""
    state = TraceState()
    for op in program.global_block().ops:
        name = op.name()
        ins = []
        for operand in op.operands():
            src = operand.source()
            if not src.initialized():  # an absent optional input
                ins.append(_Val())
                continue
            ins.append(state.vals.get(src.id) or _Val(shape=_shape_of(src)))
        outs = []
        for res in op.results():
            v = _Val(shape=_shape_of(res))
            state.vals[res.id] = v
            outs.append(v)
        if name == "builtin.parameter":
            pname = op.attrs()["parameter_name"]
            outs[0].param = pname
            continue
        blocks = list(op.blocks())  # the container itself is always truthy
        if blocks:
            _enter_control_flow(state, op, blocks)
        handler = _OP_HANDLERS.get(_op_key(name))
        if handler is None:
            _unknown(state, op, ins, outs)
        else:
            handler(state, op, ins, outs)
    for out in outputs:
        v = state.vals.get(out.id)
        if v is not None:
            state.block(state.ids_of(v), "network output is never pruned")
    if state.unknown_ops:
        ops = ", ".join(f"{k} (x{v})" for k, v in sorted(state.unknown_ops.items()))
        warnings.warn(
            f"channels touching these ops are left unpruned: {ops}. Register a handler with "
            "prune_callbacks.graph.register_op to prune through them.",
            stacklevel=3,
        )
    return state


# ---------------------------------------------------------------------------------------------
# From ids to groups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamAxis:
    """How the positions along one axis of one parameter map to group channels.

    `group[i]` is the index of the group that position i belongs to (-1: never pruned) and
    `channel[i]` its channel index inside that group. For a grouped conv's input axis both
    arrays have shape [blocks, per_block].
    """

    key: str  # structured name (state_dict key)
    axis: int
    group: np.ndarray
    channel: np.ndarray
    role: Role

    @property
    def blocks(self) -> int:
        return self.group.shape[0] if self.group.ndim == 2 else 1


@dataclass
class Group:
    """A set of coupled channels that must be removed together, index by index."""

    name: str
    param_name: str  # Paddle name of the leading weight (PaddleSlim style), "" if none
    channels: int
    prunable: bool
    reason: str = ""
    layers: Tuple[str, ...] = ()
    members: Tuple[Tuple[str, int], ...] = ()  # (param key, axis)
    partition: Optional[np.ndarray] = None  # block label per channel (-1: free)
    producers: Tuple[Tuple[str, int], ...] = ()  # (param key, out axis) of layers minting it
    norms: Tuple[str, ...] = ()  # keys of per-channel norm scales (BatchNorm weight)

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return f"Group({self.name!r}, channels={self.channels}, {state})"


@dataclass
class _Mac:
    kind: MacKind
    kernel_spatial: int
    blocks: int
    out: Tuple[Dict[int, int], int]  # positions per group, positions never pruned
    inp: Tuple[Dict[int, int], int]


class ChannelGraph:
    """Coupled channel groups of a network, read from its PIR program.

    Args:
        net: the network (left unchanged).
        input_shape: one input's shape, batch first, e.g. [1, 3, 32, 32].
        supports_layer: tells whether surgery knows a layer; channels of parameters in other
            layers are left unpruned.
    """

    def __init__(self, net: paddle.nn.Layer, input_shape: Sequence[int],
                 supports_layer: Callable[[paddle.nn.Layer], bool] = lambda layer: True) -> None:
        program, outputs = build_program(net, input_shape)
        state = run_trace(program, outputs)
        self.input_shape = tuple(int(s) for s in input_shape)
        self._owner: Dict[str, Tuple[str, str, paddle.nn.Layer]] = {}  # pname -> key, path, layer
        self._buffers: Dict[str, str] = {}  # tensor name -> structured key
        for path, layer in net.named_sublayers(include_self=True):
            for attr, p in layer.named_parameters(include_sublayers=False):
                self._owner[p.name] = (f"{path}.{attr}" if path else attr, path, layer)
            for attr, b in layer.named_buffers(include_sublayers=False):
                if b is not None:
                    self._buffers[b.name] = f"{path}.{attr}" if path else attr
        self._build(state, supports_layer)

    # -- construction ----------------------------------------------------------------------
    def _build(self, st: TraceState, supports_layer: Callable[[paddle.nn.Layer], bool]) -> None:
        """Channel classes (ids joined by the union-find) -> groups -> parameter axes.

        A group starts as every class that one op mints together (a conv's filters), joined
        across ops by the classes they share (a residual add). A group free of blocked channels
        is then split so that every layer touching it sees all of its channels, equally often:
        a concat added to a conv output would otherwise put two producers in one group, and one
        of them could lose all its channels while the group kept some.
        """
        blocked = _blocked_channels(st)
        root = st.uf.root_table()
        gcomp, flat = _source_components(st, root)
        sig = _class_signatures(st, root, gcomp, blocked)
        classes = _number_classes(root, flat, gcomp, sig)
        reasons = _Reasons()
        for ids, why in blocked:
            reasons.add(classes.groups_of(ids), why)
        lead = _lead_params(st, classes)
        self.param_axes: Dict[Tuple[str, int], ParamAxis] = {}
        parts = self._add_param_axes(st, classes, reasons, supports_layer)
        partitions = _block_partitions(st, classes, reasons)
        self.groups: List[Group] = self._make_groups(classes, lead, parts, partitions, reasons)
        self._macs = [_mac_census(m, classes) for m in st.macs if m.param in self._owner]

    def _add_param_axes(self, st: TraceState, classes: "_Classes", reasons: "_Reasons",
                        supports_layer: Callable[[paddle.nn.Layer], bool]) -> "_GroupParts":
        """Fill `self.param_axes` from the trace's members; return what each group holds."""
        parts = _GroupParts(len(classes.channels))
        for m in st.members:
            grp, ch = classes.locate(m.ids)
            hit = _touched(grp)
            if m.param not in self._owner:
                what = (f"buffer {self._buffers[m.param]}" if m.param in self._buffers
                        else f"tensor {m.param}")
                reasons.add(hit, f"{what} holds per-channel values but is not a parameter, so "
                                 "it cannot be sliced")
                continue
            key, path, layer = self._owner[m.param]
            prev = self.param_axes.get((key, m.axis))
            if m.param in st.opaque_params:
                reasons.add(hit, f"parameter {key} is {st.opaque_params[m.param]}")
            if prev is not None and not (np.array_equal(prev.group, grp)
                                         and np.array_equal(prev.channel, ch)):
                reasons.add(set(hit) | set(_touched(prev.group)),
                            f"parameter {key} is used with different channels")
                continue
            self.param_axes[(key, m.axis)] = ParamAxis(key, m.axis, grp, ch, m.role)
            if not supports_layer(layer):
                reasons.add(hit, f"layer {path or '<root>'} ({type(layer).__name__}) has no "
                                 "registered surgery; see "
                                 "prune_callbacks.layers.register_layer_type")
            parts.add(hit, key, m.axis, path, m.role)
        return parts

    def _make_groups(self, classes: "_Classes", lead: Dict[int, str], parts: "_GroupParts",
                     partitions: Dict[int, np.ndarray], reasons: "_Reasons") -> List[Group]:
        """One Group per group index, named after the layer of its lead parameter."""
        groups: List[Group] = []
        used: Dict[str, int] = {}
        for i in range(len(classes.channels)):
            pname = lead.get(i, "")
            if pname and pname in self._owner:
                name = self._owner[pname][1] or "<root>"
                used[name] = used.get(name, 0) + 1
                if used[name] > 1:  # a producer whose channels were split over several groups
                    name = f"{name}#{used[name]}"
            else:
                name = f"<unnamed:{i}>"
                reasons.add([i], "no conv or linear layer produces these channels")
            groups.append(Group(
                name=name, param_name=pname, channels=int(classes.channels[i]),
                prunable=i not in reasons.by_group, reason=reasons.by_group.get(i, ""),
                layers=tuple(parts.layers[i]), members=tuple(parts.members[i]),
                partition=partitions.get(i), producers=tuple(parts.producers[i]),
                norms=tuple(parts.norms[i]),
            ))
        return groups

    # -- queries -------------------------------------------------------------------------
    def flops(self, kept: Optional[Dict[int, int]] = None) -> int:
        """Multiply-accumulates of convs and linears when group i keeps `kept[i]` channels.

        Exact when each channel of a group occupies the same number of positions in a layer
        (true for every layer we have seen: flatten repeats each channel H*W times).
        """
        kept = kept or {}

        def count(c: Tuple[Dict[int, int], int]) -> float:
            counts, fixed = c
            total = float(fixed)
            for gi, n in counts.items():
                g = self.groups[gi]
                total += n * (kept.get(gi, g.channels) / g.channels)
            return total

        total = 0
        for mac in self._macs:
            out = round(count(mac.out))
            if mac.kind == MacKind.DEPTHWISE:
                inp = 1
            elif mac.kind == MacKind.GROUPED:
                inp = round(count(mac.inp)) // mac.blocks
            else:
                inp = round(count(mac.inp))
            total += out * inp * mac.kernel_spatial
        return int(total)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    mapping: Dict[int, int] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        if (x < 0) != (y < 0):
            return False
        if x >= 0 and mapping.setdefault(x, y) != y:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The steps of ChannelGraph._build
# ---------------------------------------------------------------------------------------------


def _touched(grp: np.ndarray) -> List[int]:
    """The groups (sorted) that the positions `grp` fall into."""
    return np.unique(grp[grp >= 0]).tolist()


@dataclass(frozen=True)
class _Classes:
    """Where each channel class (a union-find root) landed: its group and its channel there."""

    root: np.ndarray  # id -> class
    group: np.ndarray  # class -> group index, -1 outside every group
    channel: np.ndarray  # class -> channel index inside its group
    channels: np.ndarray  # group index -> channel count

    def locate(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        r = self.root[ids]
        return self.group[r], self.channel[r]

    def groups_of(self, ids: np.ndarray) -> List[int]:
        return _touched(self.locate(ids)[0])


class _Reasons:
    """Why each group cannot be pruned; the first reason given for a group wins."""

    def __init__(self) -> None:
        self.by_group: Dict[int, str] = {}

    def add(self, groups: Iterable[int], why: str) -> None:
        for gi in groups:
            self.by_group.setdefault(gi, why)


class _GroupParts:
    """Per group, in first-seen order: parameter axes, layers, producer axes and norm scales."""

    def __init__(self, n_groups: int) -> None:
        self.members: List[List[Tuple[str, int]]] = [[] for _ in range(n_groups)]
        self.layers: List[List[str]] = [[] for _ in range(n_groups)]
        self.producers: List[List[Tuple[str, int]]] = [[] for _ in range(n_groups)]
        self.norms: List[List[str]] = [[] for _ in range(n_groups)]

    def add(self, groups: Iterable[int], key: str, axis: int, path: str, role: Role) -> None:
        for gi in groups:
            if (key, axis) not in self.members[gi]:
                self.members[gi].append((key, axis))
            if path not in self.layers[gi]:
                self.layers[gi].append(path)
            if role == Role.OUT and (key, axis) not in self.producers[gi]:
                self.producers[gi].append((key, axis))
            if role == Role.NORM and key.endswith("weight") and key not in self.norms[gi]:
                self.norms[gi].append(key)


def _blocked_channels(st: TraceState) -> List[Tuple[np.ndarray, str]]:
    """(ids, reason) of every channel that must never be pruned, in the order reasons win.

    Parameters used by generic ops (a conv bias add, a learnable scale) become members of
    `st.members` on the way.
    """
    blocked: List[Tuple[np.ndarray, str]] = []
    for pname, elems in st.param_elems.items():
        r = st.uf.roots(elems)
        varying = [ax for ax in range(r.ndim) if _compress(r).shape[ax] > 1]
        if len(varying) == 1:
            ax = varying[0]
            line = np.moveaxis(r, ax, 0).reshape(r.shape[ax], -1)[:, 0]
            st.members.append(MemberRec(pname, ax, line, Role.NORM))
        elif len(varying) > 1:
            blocked.append((elems, f"parameter {pname} couples channels on several axes"))
    blocked.extend((src.ids, src.blocked) for src in st.sources if src.blocked)
    blocked.extend(st.blocks)
    return blocked


def _source_components(st: TraceState, root: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Join the classes that each source mints together.

    Returns:
        (component of each class, the classes of every source's ids in program order).
    """
    srcs = [root[src.ids] for src in st.sources]
    heads = [np.full(len(r), r[0]) for r in srcs if len(r)]
    flat = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    gcomp = _components(len(root), np.concatenate(heads) if heads else flat, flat)
    return gcomp, flat


def _class_signatures(st: TraceState, root: np.ndarray, gcomp: np.ndarray,
                      blocked: List[Tuple[np.ndarray, str]]) -> np.ndarray:
    """A signature per class: which parameter axes hold it, and how often. Classes of one
    component with different signatures become different groups; a component holding blocked
    channels stays whole (signature 0), since it is never pruned anyway."""
    rng = np.random.default_rng(0x5EED)
    sig = np.zeros(len(root), dtype=np.uint64)
    axis_weight: Dict[Tuple[str, int], np.uint64] = {}
    for m in st.members:
        w = axis_weight.setdefault((m.param, m.axis), np.uint64(rng.integers(1, 2**63)))
        cls, counts = np.unique(root[m.ids.ravel()], return_counts=True)
        sig[cls] += w * counts.astype(np.uint64)
    if blocked:
        frozen = gcomp[root[np.concatenate([ids.ravel() for ids, _ in blocked])]]
        sig[np.isin(gcomp, frozen)] = 0
    return sig


def _number_classes(root: np.ndarray, flat: np.ndarray, gcomp: np.ndarray,
                    sig: np.ndarray) -> _Classes:
    """Groups: the classes met in sources, keyed by (component, signature), numbered in
    program order of their earliest class; channels numbered in class order inside each."""
    n = len(root)
    first_pos = np.full(n, -1, dtype=np.int64)
    if len(flat):
        uniq, idx = np.unique(flat, return_index=True)
        first_pos[uniq] = idx
    classes = np.flatnonzero(first_pos >= 0)
    classes = classes[np.argsort(first_pos[classes], kind="stable")]
    keys: Dict[Tuple[int, int], int] = {}
    class_group = np.full(n, -1, dtype=np.int64)
    for c, gk in zip(classes.tolist(), zip(gcomp[classes].tolist(), sig[classes].tolist())):
        class_group[c] = keys.setdefault(gk, len(keys))
    first_class = np.full(len(keys), n, dtype=np.int64)
    np.minimum.at(first_class, class_group[classes], classes)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[np.argsort(first_class, kind="stable")] = np.arange(len(keys))
    class_group[classes] = rank[class_group[classes]]
    class_chan = np.full(n, -1, dtype=np.int64)
    channels = np.zeros(len(keys), dtype=np.int64)
    for c, gi in zip(classes.tolist(), class_group[classes].tolist()):
        class_chan[c] = channels[gi]
        channels[gi] += 1
    return _Classes(root, class_group, class_chan, channels)


def _lead_params(st: TraceState, classes: _Classes) -> Dict[int, str]:
    """Paddle name of each group's lead weight: the first producer all of whose channels the
    group holds, else the first producer holding some of them."""
    lead: Dict[int, str] = {}
    partial: Dict[int, str] = {}
    for src in st.sources:
        if src.param is None:
            continue
        gs = classes.groups_of(src.ids)
        for gi in gs:
            (lead if len(gs) == 1 else partial).setdefault(gi, src.param)
    return {**partial, **lead}


def _block_partitions(st: TraceState, classes: _Classes,
                      reasons: _Reasons) -> Dict[int, np.ndarray]:
    """Grouped convolutions: each block of a group must lose the same number of channels.

    Returns:
        group index -> block label of each of its channels (-1: in no block).
    """
    partitions: Dict[int, np.ndarray] = {}
    for part in st.partitions:
        grp, ch = classes.locate(part)
        gi_set = set(grp.ravel().tolist())
        if len(gi_set) != 1 or -1 in gi_set or len(np.unique(ch)) != ch.size:
            reasons.add(gi_set - {-1}, "grouped convolution spans several channel groups")
            continue
        gi = gi_set.pop()
        labels = np.full(int(classes.channels[gi]), -1, dtype=np.int64)
        for k in range(ch.shape[0]):
            labels[ch[k]] = k
        if gi in partitions and not _same_partition(partitions[gi], labels):
            reasons.add([gi], "grouped convolutions disagree on channel blocks")
        partitions[gi] = labels
    return partitions


def _mac_census(m: MacRec, classes: _Classes) -> _Mac:
    """A conv/linear op's positions per group, for `ChannelGraph.flops`."""
    def census(ids: np.ndarray) -> Tuple[Dict[int, int], int]:
        grp, _ = classes.locate(ids)
        gs, counts = np.unique(grp, return_counts=True)
        tally = dict(zip(gs.tolist(), counts.tolist()))
        return {g: c for g, c in tally.items() if g >= 0}, tally.get(-1, 0)

    blocks = m.in_ids.shape[0] if m.in_ids.ndim == 2 else 1
    return _Mac(m.kind, m.kernel * m.spatial, blocks, census(m.out_ids), census(m.in_ids))
