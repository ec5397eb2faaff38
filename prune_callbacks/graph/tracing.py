"""Trace a network's PIR program, following "channel ids" from op to op.

We read the PIR program that `paddle.jit.to_static` builds (every op with its attributes and static
shapes): each producer (conv, linear) mints one id per output channel; every op says how ids flow
from its inputs to its outputs (an op handler registry: `register_op`; the built-in handlers live
in `op_handlers`). Anything no handler understands blocks the ids it touches (`unknown_op`); a
handler that fails does the same (only `TraceShapeError` means the input shape is wrong). A
network whose graph differs in training (branches under `if self.training:`) is traced in both
modes and the couplings merged (`trace_network`). This module only reads the network; it never
changes a parameter, and it knows nothing of groups.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import re
import threading
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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
        self._ties: List[bool] = []  # per pair: a channel shuffle's tie (a guess, not data flow)
        self._root: Optional[np.ndarray] = None
        self._untied: Optional[np.ndarray] = None

    def fresh(self, n: int) -> np.ndarray:
        start = self.size
        self.size += n
        return np.arange(start, start + n, dtype=np.int64)

    def union_arrays(self, a: np.ndarray, b: np.ndarray, tie: bool = False) -> None:
        """Join ids a[k] and b[k]; `tie` marks a join that no data flow makes (the positions a
        channel shuffle keeps in step), which `root_table(untied=True)` leaves out."""
        self._pairs.append((np.asarray(a, dtype=np.int64).ravel(),
                            np.asarray(b, dtype=np.int64).ravel()))
        self._ties.append(tie)
        self._root = self._untied = None

    def root_table(self, untied: bool = False) -> np.ndarray:
        """root_table()[i] is the root of id i; with `untied`, joined by data flow only (channel
        shuffles' ties left out: each channel keeps its own class through index ops)."""
        cached = self._untied if untied else self._root
        if cached is not None and len(cached) == self.size:
            return cached
        pairs = [p for p, t in zip(self._pairs, self._ties) if not (untied and t)]
        a = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
        b = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
        table = connected_components(self.size, a, b)
        if untied:
            self._untied = table
        else:
            self._root = table
        return table

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.root_table()[np.asarray(ids, dtype=np.int64)]


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def compress_ids(ids: np.ndarray) -> np.ndarray:
    """Shrink every axis along which `ids` is constant to size 1."""
    for ax in range(ids.ndim):
        if ids.shape[ax] > 1:
            first = np.take(ids, [0], axis=ax)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return ids


def broadcast_ids(ids: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(ids, tuple(shape)))


@dataclass
class Val:
    """What the tracer knows about one PIR value."""

    shape: Tuple[int, ...] = ()
    ids: Optional[np.ndarray] = None  # compressed channel ids, same ndim as shape
    param: Optional[str] = None  # paddle parameter name when the value is a parameter
    const: Any = None  # python value of a constant (full, full_int_array)
    items: Optional[List["Val"]] = None  # builtin.combine / split vectors
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
    conditional: bool = False  # inside an `if`/`while` body: runs as often as the branch does

    def full_macs(self) -> int:
        """MACs at full width (what `ChannelGraph.flops` gives with nothing pruned)."""
        if self.kind == MacKind.DEPTHWISE:
            inp = 1
        elif self.kind == MacKind.GROUPED:
            inp = int(self.in_ids.shape[-1])
        else:
            inp = int(self.in_ids.size)
        return int(self.out_ids.size) * inp * self.kernel * self.spatial


class TraceState:
    """Mutable state the op handlers work on."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.vals: Dict[str, Val] = {}
        self.members: List[MemberRec] = []
        self.sources: List[SourceRec] = []
        self.blocks: List[Tuple[np.ndarray, str]] = []
        self.macs: List[MacRec] = []
        # [blocks, per_block] id arrays whose blocks lose equal counts, or (array, what) pairs
        self.partitions: List[Any] = []
        # (ids, what): channels whose pruning rests on sizes the forward must compute from the
        # channel count (a channel shuffle's reshapes); verified by a trial prune on a copy
        self.trials: List[Tuple[np.ndarray, str]] = []
        self.param_elems: Dict[str, np.ndarray] = {}  # param name -> element ids (full shape)
        self.unknown_ops: Dict[str, int] = {}
        # parameters some use of which we do not follow (control flow, unknown ops) -> why
        self.opaque_params: Dict[str, str] = {}
        self.train_macs: List[MacRec] = []  # conv/linear ops of the training-mode program
        self.two_modes = False  # whether a training-mode program was traced too
        self.batch: Optional[int] = None  # the input's batch size, for run-time shapes
        # why the training program could not be built (no training inputs), and the parameters
        # the eval program reads: layers outside it may run in training only
        self.train_failure: Optional[str] = None
        self.eval_params: Optional[set] = None
        # why the eval program could not be built: the training program alone was traced
        self.eval_failure: Optional[str] = None
        # layers stubbed because their forward does not convert (`graph.stubs`), per program
        self.stubs: Any = None
        self.stubbed: List[str] = []
        # tracing the training program; (ids, what) of channels whose pruning rests on sizes
        # only the training forward computes (a dropout mask drawn with the input's shape):
        # verified by a training-mode run of a pruned copy
        self.in_training = False
        self.train_trials: List[Tuple[np.ndarray, str]] = []
        # `graph.attention`: ids of channels cut into attention heads, and the [rows] of each
        # fused projection's slices (q, k, v) that must lose the same heads
        self.attention_ids: np.ndarray = np.zeros(0, np.int64)
        self.attention_slices: List[Any] = []

    # -- helpers for handlers -----------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.uf.fresh(n)

    def block(self, ids: Optional[np.ndarray], reason: str) -> None:
        if ids is not None and ids.size:
            self.blocks.append((np.unique(ids), reason))

    def ids_of(self, v: Val) -> Optional[np.ndarray]:
        """Channel ids of a value; a parameter gets one id per element, minted on first use."""
        if v.ids is None and v.param is not None:
            if v.param not in self.param_elems:
                n = int(np.prod(v.shape)) if v.shape else 1
                self.param_elems[v.param] = self.fresh(n).reshape(v.shape)
            v.ids = compress_ids(self.param_elems[v.param])
        return v.ids

    def channel_ids(self, v: Val, axis: int) -> Optional[np.ndarray]:
        """1-D ids along `axis` if they are constant along every other axis, else None."""
        ids = self.ids_of(v)
        if ids is None:
            return None
        other = [ax for ax in range(ids.ndim) if ax != axis]
        if any(ids.shape[ax] != 1 for ax in other):
            return None
        return broadcast_ids(ids.reshape(-1), (v.shape[axis],)).copy()


OpHandler = Callable[[TraceState, Any, List[Val], List[Val]], None]
OP_HANDLERS: Dict[str, OpHandler] = {}


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
    - `state.block(ids, reason)`: channels that must never be pruned, and why;
    - `unknown_op(state, op, ins, outs, why)`: give up on this op as if it had no handler.

    Raise `TraceShapeError` only when the network cannot take the input shape; any other
    exception gives up on the op (its channels stay unpruned) with a logged warning.
    Sizes PIR could not infer (shapes computed at run time) arrive as -1 where the tracer could
    not fill them in from the batch size or the element count.

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
            OP_HANDLERS[n] = fn
        return fn

    return deco


def op_key(name: str) -> str:
    short = name.split(".", 1)[1] if name.startswith(("pd_op.", "builtin.")) else name
    if name.startswith("builtin."):
        return "builtin." + short
    return short[:-1] if short.endswith("_") and short[:-1] in OP_HANDLERS else short


def unknown_op(state: TraceState, op: Any, ins: List[Val], outs: List[Val],
               why: str = "") -> None:
    """What happens to an op no handler understands (handlers call it to give up, saying `why`):
    the channels it reads are blocked, parameters it reads keep their shape, and its outputs get
    fresh blocked ids."""
    name = op.name()
    state.unknown_ops[name] = state.unknown_ops.get(name, 0) + 1
    reason = f"op {name} is not supported" + (f" ({why})" if why else "")
    for v in ins:
        for item in (v.items or [v]):
            if item.param is not None:  # a layer's weight read by this op too: keep its shape
                state.opaque_params.setdefault(item.param, f"also read by {reason}")
            else:
                state.block(state.ids_of(item), reason)
    axis = _carrier_axis(state, ins, outs)
    for o in outs:
        if o.shape:
            ax = axis if axis is not None and axis < len(o.shape) else (
                1 if len(o.shape) >= 2 else 0)
            shape = [1] * len(o.shape)
            shape[ax] = max(o.shape[ax], 1)
            o.ids = state.fresh(shape[ax]).reshape(shape)
            state.sources.append(SourceRec(o.ids.ravel(), None, blocked=reason))


def _carrier_axis(state: TraceState, ins: List[Val], outs: List[Val]) -> Optional[int]:
    """The axis that carries channels in an op's first traced input (the one axis along which
    its ids vary), when the outputs have that input's rank: token tensors [N, L, C] keep their
    channels last, so whatever follows an op we cannot follow still sees channels there."""
    for v in ins:
        ids = state.ids_of(v) if v.items is None else None
        if ids is None or v.param is not None:
            continue
        varying = [a for a in range(ids.ndim) if ids.shape[a] > 1]
        if len(varying) == 1 and all(len(o.shape) in (0, ids.ndim) for o in outs):
            return varying[0]
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Running a trace
# ---------------------------------------------------------------------------------------------


def shape_of(value: Any) -> Tuple[int, ...]:
    try:
        return tuple(int(s) for s in value.shape)
    except Exception:  # vectors have no shape
        return ()


def flat_outputs(outputs: Any) -> List[Any]:
    """The values of a network's outputs, however nested (a tensor, or lists, tuples and dicts
    of them, as detection and segmentation nets return); non-tensor leaves are dropped."""
    if isinstance(outputs, dict):
        return [v for item in outputs.values() for v in flat_outputs(item)]
    if isinstance(outputs, (list, tuple)):
        return [v for item in outputs for v in flat_outputs(item)]
    return [outputs] if hasattr(outputs, "id") else []


def build_program(net: paddle.nn.Layer, input_shape: Sequence[int],
                  training: bool = False,
                  input_spec: Optional[List[Any]] = None) -> Tuple[Any, List[Any]]:
    """The PIR main program of `net` for one input of `input_shape`, and its output values
    (flattened: a network may return a list, tuple or dict of tensors).

    Args:
        net: the network; each layer's mode is restored afterwards.
        input_shape: batch first.
        training: build the training-mode program (branches under `if self.training:`)
            instead of the eval-mode one. Building never runs the network, so BatchNorm
            statistics are untouched.
        input_spec: the forward's arguments (`training_graph.example_spec`), instead of one
            float input of `input_shape`.

    `paddle.jit.to_static` replaces `net.forward` in place; we undo that before returning.
    """
    from paddle.static import InputSpec

    had_forward = "forward" in net.__dict__
    old_forward = net.__dict__.get("forward")
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.train() if training else net.eval()
    try:
        static = paddle.jit.to_static(
            net, input_spec=input_spec or [InputSpec(list(input_shape), "float32", "x")],
            full_graph=True)
        with _no_op_callstacks():
            concrete = static.forward.concrete_program
        return concrete.main_program, flat_outputs(concrete.outputs)
    except OSError as e:  # inspect could not read forward's source
        raise NoSourceError(
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


def _eager_run(net: paddle.nn.Layer, training: bool, args: List[Any]) -> Callable[[], Any]:
    """One eager forward in the given mode (each layer's mode restored), for the stubs."""
    def run() -> Any:
        modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
        net.train() if training else net.eval()
        try:
            return net(*args)
        finally:
            for layer, mode in modes:
                layer.training = mode
    return run


def convert(net: paddle.nn.Layer, input_shape: Sequence[int], training: bool = False,
            input_spec: Optional[List[Any]] = None,
            example: Optional[List[Any]] = None) -> Tuple[Any, List[Any], Any]:
    """`build_program`, stubbing the sublayers whose forward does not convert (`graph.stubs`):
    returns the program, its outputs and the `StubRecord` for `run_trace`. `example` is the
    forward's arguments when `input_spec` is given (the stubs imitate one eager forward)."""
    from .stubs import build_with_stubs

    args = example if example is not None else [paddle.zeros(list(input_shape), "float32")]
    (program, outputs), record = build_with_stubs(
        net, lambda: build_program(net, input_shape, training, input_spec),
        _eager_run(net, training, args), "training forward" if training else "eval forward")
    return program, outputs, record


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


def run_trace(program: Any, outputs: Sequence[Any], state: Optional[TraceState] = None,
              warn: bool = True) -> TraceState:
    """Walk the program's ops in order, letting each op handler move channel ids (the built-in
    handlers register when `prune_callbacks.graph.ops` is imported, as `graph` does).

    Args:
        program: a PIR program (`build_program`).
        outputs: its output values; their channels are never pruned.
        state: continue in this state (a second program of the same network: parameters keep
            their element ids); a new one when None.
        warn: warn about ops no handler understands.
    """
    state = TraceState() if state is None else state
    state.vals = {}  # value ids are only unique within one program
    n_members = len(state.members)
    for op in program.global_block().ops:
        trace_op(state, op)
    unite_shared_uses(state, n_members)
    if state.stubs is not None:
        for vid, path in state.stubs.inputs.items():
            v = state.vals.get(vid)
            if v is None:
                continue
            free = state.stubs.free_axes.get((path, state.stubs.leaf.get(vid, -1)))
            ids = state.ids_of(v) if v.items is None else None
            if free is not None and ids is not None and all(  # it reads only sizes that pruning
                    a in free for a in range(ids.ndim) if ids.shape[a] > 1):  # leaves alone
                continue
            for item in (v.items or [v]):
                if item.param is not None:
                    state.opaque_params.setdefault(item.param, _stub_reason(path))
                else:
                    state.block(state.ids_of(item), _stub_reason(path))
        state.stubbed += [p for p in state.stubs.paths if p not in state.stubbed]
        state.stubs = None
    for out in outputs:
        v = state.vals.get(out.id)
        if v is not None:
            state.block(state.ids_of(v), "network output is never pruned")
    if warn:
        _warn_unknown(state, stacklevel=3)
    return state


def unite_shared_uses(state: TraceState, start: int = 0) -> None:
    """One layer called on several inputs (a head shared by every pyramid level): unite the ids
    of every use of each parameter axis in `state.members[start:]`, so the inputs' channels, and
    the outputs', form one group and surgery slices the layer once. Uses of different shapes
    are left apart (the graph then leaves the layer whole)."""
    first: Dict[Tuple[str, int, int], MemberRec] = {}
    for m in state.members[start:]:
        key = (m.param, m.axis, m.blocks)
        twin = first.setdefault(key, m)
        if twin is not m and twin.ids.shape == m.ids.shape:
            state.uf.union_arrays(twin.ids, m.ids)


def _warn_unknown(state: TraceState, stacklevel: int) -> None:
    if state.unknown_ops:
        ops = ", ".join(f"{k} (x{v})" for k, v in sorted(state.unknown_ops.items()))
        warnings.warn(
            f"channels touching these ops are left unpruned: {ops}. Register a handler with "
            "prune_callbacks.register_op to prune through them.",
            stacklevel=stacklevel + 1,
        )


class TraceShapeError(ValueError):
    """The network does not fit the input shape (raised by handlers that check channel counts,
    e.g. a conv reading more channels than its filter has). Any other failure inside a handler
    is the tracer's own: the op is given up on (`unknown_op`) and the trace goes on."""


_RESHAPES = ("pd_op.reshape", "pd_op.reshape_", "pd_op.view_shape", "pd_op.flatten",
             "pd_op.flatten_")


def _known_shapes(state: TraceState, name: str, op_attrs: Callable[[], Dict[str, Any]],
                  ins: List[Val], outs: List[Val]) -> None:
    """Fill in sizes PIR could not infer (-1, shapes computed at run time): the batch axis takes
    the input's batch size, and one remaining -1 of a reshape follows from the element count."""
    for o in outs:
        if -1 not in o.shape:
            continue
        shape = list(o.shape)
        known = [v for v in ins if v.shape and -1 not in v.shape]
        # the batch size is the last resort for axis 0: windows or patches folded into it
        # ([B * windows, L, C]) make it larger, so sizes that follow from the op come first
        if name in _RESHAPES:
            if shape.count(-1) > 1 and shape[0] == -1 and state.batch is not None:
                shape[0] = state.batch  # several run-time sizes: axis 0 is the batch
            if shape.count(-1) == 1 and known:
                rest = int(np.prod([s for s in shape if s != -1]))
                total = int(np.prod(known[0].shape))
                if rest and total % rest == 0:
                    shape[shape.index(-1)] = total // rest
        elif name in ("pd_op.transpose", "pd_op.transpose_") and ins and -1 not in ins[0].shape:
            shape = [ins[0].shape[p] for p in op_attrs()["perm"]]
        elif name == "pd_op.slice" and ins and ins[0].shape and \
                len(ins[0].shape) - len(shape) == len(op_attrs().get("decrease_axis", [])):
            nd = len(ins[0].shape)
            dropped = {int(a) % nd for a in op_attrs().get("decrease_axis", [])}
            cut = {int(a) % nd for a in op_attrs().get("axes", [])}
            left = [-1 if a in cut else s for a, s in enumerate(ins[0].shape) if a not in dropped]
            shape = [t if s == -1 else s for s, t in zip(shape, left)]  # uncut axes keep sizes
        else:  # elementwise, activations, linear rows: the same axis of a same-rank input
            for ax, size in enumerate(shape):
                if size == -1:
                    sizes = [v.shape[ax] for v in ins if len(v.shape) == len(shape)
                             and v.shape[ax] > 0 and v.param is None]  # a weight's rows
                    # are no activation's size
                    shape[ax] = max(sizes) if sizes else -1
        if shape and shape[0] == -1 and state.batch is not None:
            shape[0] = state.batch
        o.shape = tuple(shape)


def _call_handler(state: TraceState, handler: OpHandler, op: Any, ins: List[Val],
                  outs: List[Val]) -> None:
    try:
        handler(state, op, ins, outs)
    except TraceShapeError:
        raise
    except Exception as e:  # the tracer's failure, never the user's input shape
        for o in outs:
            o.ids = None
        if any(-1 in v.shape for v in ins + outs if v.shape):  # sizes known only at run time
            logger.debug("tracing %s failed on run-time sizes (%s: %s)", op.name(),
                         type(e).__name__, e)
            unknown_op(state, op, ins, outs, why="sizes known only at run time")
            return
        logger.warning("tracing %s failed (%s: %s); its channels stay unpruned", op.name(),
                       type(e).__name__, e)
        unknown_op(state, op, ins, outs, why=f"its handler failed: {type(e).__name__}")


def trace_op(state: TraceState, op: Any) -> None:
    name = op.name()
    ins = []
    for operand in op.operands():
        src = operand.source()
        if not src.initialized():  # an absent optional input
            ins.append(Val())
            continue
        ins.append(state.vals.get(src.id) or Val(shape=shape_of(src)))
    outs = []
    for res in op.results():
        v = Val(shape=shape_of(res))
        state.vals[res.id] = v
        outs.append(v)
    if name == "builtin.parameter":
        outs[0].param = op.attrs()["parameter_name"]
        return
    blocks = list(op.blocks())  # the container itself is always truthy
    if blocks and op_key(name) not in OP_HANDLERS:  # `if`/`while`: graph.control_flow
        _enter_control_flow(state, op, blocks)
    _known_shapes(state, name, op.attrs, ins, outs)
    if name == "pd_op.data" and outs and outs[0].shape:
        state.batch = outs[0].shape[0] if outs[0].shape[0] > 0 else None
    handler = OP_HANDLERS.get(op_key(name))
    if handler is None:
        unknown_op(state, op, ins, outs)
    else:
        _call_handler(state, handler, op, ins, outs)
    if state.stubs is not None and state.stubs.outputs:
        for res, v in zip(op.results(), outs):
            path = state.stubs.outputs.get(res.id)
            if path is not None and v.shape:  # what a stubbed layer returns: nobody's channels
                v.const = None
                ax = 1 if len(v.shape) >= 2 else 0
                shape = [1] * len(v.shape)
                shape[ax] = max(v.shape[ax], 1)
                v.ids = state.fresh(shape[ax]).reshape(shape)
                state.sources.append(SourceRec(v.ids.ravel(), None, blocked=_stub_reason(path)))


def _stub_reason(path: str) -> str:
    return (f"read or made by {path}, whose forward paddle.jit.to_static cannot convert (it is "
            "left out of the trace: what it does with these channels is unknown)")


# ---------------------------------------------------------------------------------------------
# Both modes: branches that run only in training
# ---------------------------------------------------------------------------------------------

_TRAINING_WORD = re.compile(r"\btraining\b")


def _forward_reads_training(net: paddle.nn.Layer) -> bool:
    """Whether some user-defined layer's forward mentions `training` (paddle's own layers only
    switch kernels, e.g. dropout or batch statistics, never the graph's shape)."""
    seen = set()
    for layer in net.sublayers(include_self=True):
        cls = type(layer)
        if cls in seen or cls.__module__.startswith("paddle."):
            continue
        seen.add(cls)
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):  # no source: be safe and trace both modes
            return True
        if _TRAINING_WORD.search(source):
            return True
    return False


def _op_names(program: Any) -> List[str]:
    """The program's ops, with the sizes written into it (`full_int_array`: reshape targets,
    slice bounds): a training branch that only reshapes to other sizes differs too."""
    out = []
    for op in program.global_block().ops:
        name = op.name()
        if name == "pd_op.full_int_array":
            name += repr(op.attrs().get("value"))
        out.append(name)
    return out


class TraceModes(str, enum.Enum):
    """Which programs `trace_network` reads. A `str` enum: `"auto"` works where one is asked."""

    AUTO = "auto"  # the training program too when the graph differs there
    BOTH = "both"  # always both
    EVAL = "eval"  # the eval program only (what is deployed)

    def __str__(self) -> str:
        return self.value


def trace_network(net: paddle.nn.Layer, input_shape: Sequence[int],
                  modes: "TraceModes | str" = TraceModes.AUTO,
                  train_spec: Optional[List[Any]] = None,
                  train_example: Optional[List[Any]] = None) -> TraceState:
    """Trace `net` in eval mode and, where its graph differs there, in training mode too.

    The two programs run through one TraceState; each parameter axis used in both gets its ids
    of the two traces united (`merge_training_members`), so a channel group holds every consumer
    of both modes (a train-only auxiliary head included) and the pruned network runs in both.
    FLOPs records stay apart: `state.macs` (eval, what is deployed), `state.train_macs`.

    Args:
        net: the network (left unchanged, each layer's mode restored).
        input_shape: batch first.
        modes: "auto" (train program only when a user-defined forward mentions `training` and
            the two programs' op lists differ), "both", or "eval".
        train_spec: the training forward's arguments (`training_graph.example_spec` of a real
            training batch, targets included), from which the training program is built; in
            "auto" mode it is traced when the forward mentions `training` or takes more than
            one argument. Without it, a training program that cannot be built
            from one input of `input_shape` (a detector's loss needs targets) is skipped:
            `state.train_failure` says why, `state.eval_params` which parameters the eval
            program reads (`training_graph.hold_train_only_feeders` takes it from there).

    Raises:
        ValueError: unknown `modes`.
    """
    try:
        modes = TraceModes(modes)
    except ValueError:
        raise ValueError(f"modes must be 'auto', 'both' or 'eval' (a TraceModes), got "
                         f"{modes!r}") from None
    try:
        program, outputs, stubs = convert(net, input_shape)
    except TraceShapeError:
        raise
    except Exception as e:  # noqa: BLE001  (paddle raises anything from user code)
        return _trace_training_only(net, input_shape, train_spec, train_example, e)
    if stubs.paths and train_spec is not None:  # the training program shows what they hide
        return _trace_training_only(net, input_shape, train_spec, train_example,
                                    f"{', '.join(stubs.paths)} do(es) not convert")
    state = TraceState()
    state.stubs = stubs
    state = run_trace(program, outputs, state, warn=False)
    state.train_macs = list(state.macs)
    both = modes == TraceModes.BOTH
    more_args = train_spec is not None and len(train_spec) > 1  # targets: a training forward
    if both or (modes == TraceModes.AUTO and (more_args or _forward_reads_training(net))):
        try:
            train_program, train_outputs, train_stubs = convert(
                net, input_shape, True, train_spec, train_example)
        except Exception as e:  # noqa: BLE001  (paddle raises anything from user code)
            if train_spec is not None:
                raise TypeError(f"cannot trace the training forward of {type(net).__name__} "
                                f"with the training inputs given: {_last_line(e)}") from e
            state.train_failure = _last_line(e)
            state.eval_params = {op.attrs()["parameter_name"]  # every parameter is declared,
                                 for op in program.global_block().ops  # the used ones read
                                 if op.name() == "builtin.parameter"
                                 and not op.results()[0].use_empty()}
            _warn_unknown(state, stacklevel=2)
            return state
        if both or _op_names(train_program) != _op_names(program):
            n_members, n_macs = len(state.members), len(state.macs)
            state.stubs = train_stubs
            state.in_training = True
            n_trials = len(state.trials)
            run_trace(train_program, train_outputs, state, warn=False)
            state.in_training = False
            # sizes the training program reads that the eval one did not: a trial prune (eval)
            # cannot see them, a training run of the pruned copy does
            state.train_trials += state.trials[n_trials:]
            state.train_macs = state.macs[n_macs:]
            del state.macs[n_macs:]
            merge_training_members(state, n_members)
            state.two_modes = True
    _warn_unknown(state, stacklevel=2)
    return state


class NoSourceError(TypeError):
    """`paddle.jit.to_static` cannot read a forward's source code (a class made by `exec` or
    in an interactive session): no program of it can be built, in either mode."""


def _trace_training_only(net: paddle.nn.Layer, input_shape: Sequence[int],
                         train_spec: Optional[List[Any]], train_example: Optional[List[Any]],
                         eval_error: "Exception | str") -> TraceState:
    """The eval forward cannot be converted (post-processing written for the old static graph,
    such as PaddleDetection's NMS, or a forward taking a dict): follow the training program
    alone. Every parameter it reads is in it, so groups hold every consumer; what runs only in
    eval (post-processing) has no parameters. Its convs count FLOPs as often as an eval forward
    runs them (marked conditional: `control_flow.weigh_conditional_macs`), so a layer that
    runs only in training counts nothing."""
    from .stubs import is_shape_error

    why = eval_error if isinstance(eval_error, str) else _last_line(eval_error)
    if train_spec is None:
        if is_shape_error(eval_error) or isinstance(eval_error.__cause__, TraceShapeError) \
                or isinstance(eval_error, (TraceShapeError, NoSourceError)):
            raise eval_error  # training inputs would not help
        raise TypeError(
            f"cannot trace the eval forward of {type(net).__name__} from an input of shape "
            f"{list(input_shape)} ({_last_line(eval_error)}): pass train_inputs= (what the "
            "forward is called with on a training step, targets included) so the pruner follows "
            "the training graph instead") from eval_error
    try:
        program, outputs, stubs = convert(net, input_shape, True, train_spec, train_example)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"cannot trace the eval forward of {type(net).__name__} "
                        f"({why}) nor its training forward with the training "
                        f"inputs given ({_last_line(e)})") from e
    state = TraceState()
    state.stubs = stubs
    state.in_training = True
    state = run_trace(program, outputs, state, warn=False)
    state.in_training = False
    for mac in state.macs:
        mac.conditional = True
    state.train_macs = list(state.macs)
    state.eval_failure = why
    state.two_modes = True
    _warn_unknown(state, stacklevel=3)
    return state


def _last_line(e: BaseException) -> str:
    """The line of a (paddle) error message that says what went wrong."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
    return detail if detail.startswith(type(e).__name__) else f"{type(e).__name__}: {detail}"


def merge_training_members(state: TraceState, n_eval: int) -> None:
    """Unite the ids of each parameter axis across the eval trace (`state.members[:n_eval]`) and
    the training trace (the rest): the k-th use of an axis in one program with its k-th use in
    the other (the first when the counts differ). Training members whose axis the eval trace
    holds are dropped; the others (train-only layers) stay."""
    eval_uses: Dict[Tuple[str, int, int], List[MemberRec]] = {}
    for m in state.members[:n_eval]:
        eval_uses.setdefault((m.param, m.axis, m.blocks), []).append(m)
    train_seen: Dict[Tuple[str, int, int], int] = {}
    kept: List[MemberRec] = []
    for m in state.members[n_eval:]:
        key = (m.param, m.axis, m.blocks)
        uses = eval_uses.get(key)
        if not uses:
            kept.append(m)
            continue
        k = train_seen.get(key, 0)
        train_seen[key] = k + 1
        twin = uses[k] if k < len(uses) else uses[0]
        if twin.ids.shape == m.ids.shape:
            state.uf.union_arrays(twin.ids, m.ids)
        else:  # the two modes use the layer on different inputs: keep both, graph blocks it
            kept.append(m)
    state.members[n_eval:] = kept
