"""Vision transformers in the trace: tokens on axis 1 and multi-head attention.

Op handlers layered over the built-in ones (`ops`), registered when this module is imported (as
`channels` does): each handles the transformer case and hands every other case to the built-in
handler. Tokens: a class/distillation token concatenated on the token axis shares the channels
of the tokens it joins; slicing tokens (`x[:, 0]`) passes channels; a parameter indexed along an
axis (a relative position bias table) shares that axis's channels. Heads: a projection reshaped
to `[.., heads, head_dim]` (or a fused qkv to `[.., 3, heads, head_dim]`) that flows into a
matmul of two activations is an attention cut; such a matmul joins every channel of one batch
position (a head) of both operands into one class, so a head is the pruning unit across q, k,
v, the bias table and the output projection. Sizes the forward writes for heads are verified by
a trial prune on a copy (`TraceState.trials`). This module only reads op attributes and shapes.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import ops
from .tracing import (OP_HANDLERS, SourceRec, TraceState, Val, broadcast_ids, compress_ids,
                      op_key, register_op, unknown_op)

HEADS_TRIAL = ("attention heads (the forward must reshape q, k and v with the layer's head count "
               "and merge the heads with -1 or num_heads * head_dim, not with the input's "
               "width C, e.g. PaddleClas's `C // self.num_heads`; register a forward that "
               "does with AttentionPruning(forward=...))")
"""What a head group's trial prune checks: that the forward reshapes q, k and v with a head count
that follows the pruned one (`self.num_heads`, synced, or -1), and merges heads with a width that
follows too (`-1` or `num_heads * head_dim`, not the input's `C`)."""

# ops an attention cut passes through between the projection's reshape and q @ k^T
_ON_THE_WAY = {"transpose", "slice", "split", "split_with_num", "builtin.split", "scale",
               "multiply", "divide", "cast", "unbind", "builtin.slice"}


def _mark_attention(state: TraceState, ids: np.ndarray) -> None:
    state.attention_ids = np.union1d(state.attention_ids, np.unique(ids))


def _in_attention(state: TraceState, ids: Optional[np.ndarray]) -> bool:
    """Whether the ids that vary in `ids` all come from an attention cut."""
    if ids is None or not any(s > 1 for s in ids.shape):
        return False
    return bool(np.isin(np.unique(ids), state.attention_ids).all())


def _is_parameter(value: Any) -> bool:
    try:
        return value.get_defining_op().name() == "builtin.parameter"
    except Exception:  # block arguments have no defining op
        return False


def _leads_to_attention(op: Any, depth: int = 6) -> bool:
    """Whether an output of `op` reaches, through index and scaling ops only, a matmul of two
    activations (q @ k^T or attn @ v)."""
    frontier = deque([(op, 0)])
    seen = set()
    while frontier:
        cur, d = frontier.popleft()
        for res in cur.results():
            try:
                users = res.all_used_ops()
            except Exception:
                continue
            for user in users:
                key = op_key(user.name())
                if key == "matmul":
                    operands = [o.source() for o in user.operands()]
                    if not any(_is_parameter(v) for v in operands):
                        return True
                elif (key in _ON_THE_WAY or user.name() in _ON_THE_WAY) and d < depth \
                        and id(user) not in seen:
                    seen.add(id(user))
                    frontier.append((user, d + 1))
    return False


def _varying(ids: Optional[np.ndarray]) -> int:
    return 0 if ids is None else sum(1 for s in ids.shape if s > 1)


_base_reshape = OP_HANDLERS["reshape"]  # whatever handled it before


@register_op("reshape", "flatten", "squeeze", "unsqueeze", "view_shape")
def _reshape(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """A projection cut into heads on its way to attention, or heads merged back: channels
    follow; the sizes are checked by the heads trial. Anything else: the built-in handler."""
    before = state.ids_of(ins[0])
    if before is not None and ins[0].param is None:
        if _in_attention(state, before):  # heads merged back (or moved): sizes trialled
            ops.reshape_like(state, ins[0], outs[0], lambda a: a)
            return
        if _varying(before) == 1 and op_key(op.name()) in ("reshape", "view_shape"):
            ops.reshape_like(state, ins[0], outs[0], lambda a: a)
            if _varying(outs[0].ids) > 1 and _leads_to_attention(op):  # cut into heads
                _mark_attention(state, before)
                state.trials.append((np.unique(before), HEADS_TRIAL))
                return
            outs[0].ids = None
        target = ins[1].const if len(ins) > 1 else None
        c_out = _regroups_tokens(before, ins[0].shape, outs[0].shape) \
            if op_key(op.name()) in ("reshape", "view_shape") else None
        literal = c_out is not None and (target is None or len(np.asarray(target).ravel())
                                         != len(outs[0].shape) or
                                         np.asarray(target).ravel()[c_out] not in (-1, 0))
        if literal:
            ops.reshape_like(state, ins[0], outs[0], lambda a: a)
            state.trials.append((np.unique(before), TOKENS_TRIAL))
            return
    _base_reshape(state, op, ins, outs)


TOKENS_TRIAL = ("reshape to a fixed channel count? (a reshape of tokens, [N, L, C] <-> "
                "[N, H, W, C], [N, C, L] <-> [N, C, H, W] or windows, shows C as a literal: the "
                "forward must read it from the tensor)")


def _regroups_tokens(ids: np.ndarray, before: Any, after: Any) -> Optional[int]:
    """A reshape that regroups the token (and window) axes around one channel axis and keeps
    that axis whole: `[N, L, C] -> [N, H, W, C]`, `[N, C, L] -> [N, C, H, W]` and back. Returns
    the channel axis of the output (None: not such a reshape). Static shapes show C as a
    literal either way, so a trial prune checks that the forward reads it from the tensor."""
    if not before or not after or ids.ndim != len(before) or _varying(ids) != 1:
        return None
    c = next(a for a, s in enumerate(ids.shape) if s > 1)
    if c == len(before) - 1 and int(before[-1]) == int(after[-1]):
        return len(after) - 1  # channels last on both sides: `[N * L, C] -> [N, L, C]` too
    if c == 0:
        return None
    lead = int(np.prod([abs(int(s)) for s in before[:c]]))
    acc = 1
    for a, s in enumerate(after):
        if acc == lead and int(s) == int(before[c]):
            # tokens regrouped, not only unit axes added or dropped (a channel shuffle's
            # `[N, 2, H, W] -> [N, 2, 1, H, W]` at one channel per branch is the shuffle's)
            kept = [int(x) for i, x in enumerate(before) if i not in (0, c) and x != 1]
            now = [int(x) for i, x in enumerate(after) if i not in (0, a) and x != 1]
            return a if kept != now else None
        acc *= abs(int(s))
    return None


_base_slice = OP_HANDLERS["slice"]  # whatever handled it before


@register_op("slice")
def _slice(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """`x[:, 0]` (the class token) and other slices along axes that carry no channels pass the
    channels; `qkv[0]` of an attention cut takes q's channels. Else: the built-in handler."""
    x, out = ins[0], outs[0]
    attrs = op.attrs()
    starts = ins[1].const if len(ins) > 1 else attrs.get("starts")
    ends = ins[2].const if len(ins) > 2 else attrs.get("ends")
    ids = state.ids_of(x)
    axes = [int(a) % max(len(x.shape), 1) for a in attrs.get("axes", [])]
    if ids is None or starts is None or ends is None or not axes:
        _base_slice(state, op, ins, outs)
        return
    starts = np.asarray(starts).ravel().tolist()
    ends = np.asarray(ends).ravel().tolist()
    varying = [a for a in axes if ids.shape[a] > 1]
    if varying and not (_in_attention(state, ids) and attrs.get("decrease_axis")):
        _base_slice(state, op, ins, outs)
        return
    if not varying and not attrs.get("decrease_axis"):
        _base_slice(state, op, ins, outs)
        return
    full = broadcast_ids(ids, x.shape)
    for a in varying:  # checked once heads are known (`attach_head_counts`)
        rows = np.moveaxis(full, a, 0).reshape(full.shape[a], -1)
        state.attention_slices.append(rows)
    index: List[Any] = [slice(None)] * len(x.shape)
    for a, s, e in zip(axes, starts, ends):
        index[a] = slice(int(s), int(e))
    taken = full[tuple(index)]
    drop = sorted({int(a) % len(x.shape) for a in attrs.get("decrease_axis", [])})
    taken = taken.reshape([n for a, n in enumerate(taken.shape) if a not in drop]) if drop \
        else taken
    out.ids = compress_ids(taken.reshape(out.shape))


@register_op("strided_slice")
def _strided_slice(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """`x[:, 0::2, 1::2, :]` (Swin's patch merging) along axes that carry no channels passes
    them; along a channel axis it is given up on."""
    x, out = ins[0], outs[0]
    ids = state.ids_of(x)
    if ids is None:
        out.ids = None
        return
    axes = [int(a) % max(len(x.shape), 1) for a in op.attrs().get("axes", [])]
    if not axes or ids.ndim != len(out.shape) or any(ids.shape[a] > 1 for a in axes):
        unknown_op(state, op, ins, outs, why="strided slice along a channel axis")
        return
    out.ids = ids


_base_concat = OP_HANDLERS["concat"]  # whatever handled it before


@register_op("concat")
def _concat(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Tokens joined on an axis that carries no channels (a class token before the patches):
    every piece shares the channels at each position of the other axes."""
    parts, out = ins[0].items or [], outs[0]
    axis = int(np.asarray(ins[1].const).ravel()[0]) % len(out.shape)
    pieces = []
    for p in parts:
        ids = state.ids_of(p)
        if ids is None or ids.ndim != len(out.shape) or ids.shape[axis] != 1:
            _base_concat(state, op, ins, outs)
            return
        pieces.append((ids, p.shape[axis]))
    if len(pieces) < 2 or not any(n > 1 for _, n in pieces) \
            or not any(_varying(ids) for ids, _ in pieces):
        _base_concat(state, op, ins, outs)
        return
    joint = tuple(max(ids.shape[a] for ids, _ in pieces) for a in range(len(out.shape)))
    first = broadcast_ids(pieces[0][0], joint)
    for ids, _ in pieces[1:]:
        state.uf.union_arrays(first, broadcast_ids(ids, joint))
    out.ids = compress_ids(first)


_base_index_select = OP_HANDLERS["index_select"]  # whatever handled it before
_base_gather = OP_HANDLERS["gather"]  # whatever handled it before


def _param_lookup(state: TraceState, op: Any, ins: List[Val], outs: List[Val],
                  axis: int) -> bool:
    """A parameter indexed along `axis` by a run-time index (a relative position bias table):
    which rows are read is unknown, so the rows share one class per position of the other axes;
    the other axes' channels pass. False when not a parameter."""
    x, out = ins[0], outs[0]
    if x.param is None or len(out.shape) != len(x.shape):
        return False
    ids = state.ids_of(x)
    full = broadcast_ids(ids, x.shape)
    first = np.take(full, [0], axis=axis)
    state.uf.union_arrays(np.broadcast_to(first, full.shape), full)
    out.ids = compress_ids(first)
    return True


@register_op("index_select")
def _index_select(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    axis = int(op.attrs().get("axis", 0)) % max(len(ins[0].shape), 1)
    if not _param_lookup(state, op, ins, outs, axis):
        _base_index_select(state, op, ins, outs)


@register_op("gather")
def _gather(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    axes = ops.axes_operand(op, ins, len(ins[0].shape), operand=2) or [0]
    if len(axes) != 1 or not _param_lookup(state, op, ins, outs, axes[0]):
        _base_gather(state, op, ins, outs)


_base_matmul = OP_HANDLERS["matmul"]  # whatever handled it before


@register_op("matmul")
def _matmul(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """A matmul of two activations (q @ k^T, attn @ v): see `_activation_matmul`. A linear
    layer (a parameter operand): the built-in handler."""
    if ins[1].param is not None or ins[0].param is not None:
        _base_matmul(state, op, ins, outs)
        return
    _activation_matmul(state, op, ins, outs)


def _activation_matmul(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """A[..., M, K] @ B[..., K, N].

    Where channels vary along the batch axes (heads), each batch position is one unit: every
    channel of A and B there joins one class (removing a head from q, k and v together leaves
    the other heads' scores and outputs, as masking them does). Else channels on the contracted
    axis K are joined position by position (masking a dimension in both operands removes its
    product terms, as removing it does), and M (of A) or N (of B) carries the output's
    channels. Other layouts are given up on."""
    a, b, out = ins[0], ins[1], outs[0]
    ia, ib = state.ids_of(a), state.ids_of(b)
    attrs = op.attrs()
    if ia is None or ib is None or len(a.shape) < 2 or len(b.shape) < 2:
        unknown_op(state, op, ins, outs, why="matmul of two activations with an untraced "
                                             "operand")
        return
    nd = len(out.shape)
    ia = ia.reshape((1,) * (nd - ia.ndim) + ia.shape)
    ib = ib.reshape((1,) * (nd - ib.ndim) + ib.shape)
    if attrs.get("transpose_x", False):
        ia = np.swapaxes(ia, -1, -2)
    if attrs.get("transpose_y", False):
        ib = np.swapaxes(ib, -1, -2)
    nb = nd - 2
    batch = tuple(max(ia.shape[x], ib.shape[x]) for x in range(nb))
    if any(s > 1 for s in batch):  # heads: one class per batch position
        fa = broadcast_ids(ia, batch + ia.shape[-2:]).reshape(batch + (-1,))
        fb = broadcast_ids(ib, batch + ib.shape[-2:]).reshape(batch + (-1,))
        head = fa[..., :1]
        state.uf.union_arrays(np.broadcast_to(head, fa.shape), fa)
        state.uf.union_arrays(np.broadcast_to(head, fb.shape), fb)
        _mark_attention(state, np.concatenate([fa.ravel(), fb.ravel()]))
        out.ids = compress_ids(head.reshape(batch + (1, 1)))
        return
    a_m, a_k = ia.shape[-2] > 1, ia.shape[-1] > 1
    b_k, b_n = ib.shape[-2] > 1, ib.shape[-1] > 1
    if (a_m and a_k) or (b_k and b_n) or (a_m and b_n):
        unknown_op(state, op, ins, outs, why="matmul of two activations with channels on "
                                             "several axes")
        return
    k = max(ia.shape[-1], ib.shape[-2])
    ka = broadcast_ids(ia.reshape(-1), (k,)) if ia.shape[-1] > 1 \
        else np.repeat(ia.reshape(-1)[:1], k)
    kb = broadcast_ids(ib.reshape(-1), (k,)) if ib.shape[-2] > 1 \
        else np.repeat(ib.reshape(-1)[:1], k)
    if a_k or b_k:
        state.uf.union_arrays(ka, kb)
    shape = [1] * nd
    if a_m:
        shape[-2] = ia.shape[-2]
        out.ids = ia.reshape(-1).reshape(shape)
    elif b_n:
        shape[-1] = ib.shape[-1]
        out.ids = ib.reshape(-1).reshape(shape)
    else:  # scores over tokens: no channel of their own
        ids = state.fresh(1).reshape(shape)
        state.sources.append(SourceRec(ids.ravel(), None, blocked="attention scores carry no "
                                                                  "channels"))
        out.ids = ids


@register_op("uniform", "gaussian", "randint", "bernoulli", "randperm", "rand", "randn")
def _random(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Random tensors (DropPath's keep mask) carry no channels."""
    for o in outs:
        o.ids = None


# ---------------------------------------------------------------------------------------------
# Head counts: the int an attention layer keeps (`num_heads`) follows its pruned heads
# ---------------------------------------------------------------------------------------------

_HEAD_ATTRS = ("num_heads", "n_heads", "heads", "_num_heads", "nhead", "num_attention_heads")


def _common_path(g: Any) -> List[str]:
    """The path segments the layers of group `g` share (their nearest common ancestor)."""
    parts = [p.split(".") if p else [] for p in g.layers]
    common: List[str] = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return common


def _attention_owner(g: Any, layers: Dict[str, Any]) -> str:
    """The class name of the nearest common ancestor of head group `g`'s layers."""
    layer = layers.get(".".join(_common_path(g)))
    return type(layer).__name__ if layer is not None else "<the attention class>"


def _head_count_of(g: Any, layers: Dict[str, Any]) -> Optional[Tuple[str, Any, str]]:
    """(path, layer, attribute) of the int head count of head group `g`: on the nearest common
    ancestor of its layers that holds one equal to its channels; None if none does."""
    from ..layers.registry import AttentionPruning, layer_handler

    common = _common_path(g)
    for n in range(len(common), -1, -1):
        path = ".".join(common[:n])
        layer = layers.get(path)
        handler = layer_handler(layer) if layer is not None else None
        names = (handler.head_count_attr,) if isinstance(handler, AttentionPruning) \
            else _HEAD_ATTRS
        attr = next((a for a in names if type(getattr(layer, a, None)) is int
                     and getattr(layer, a) == g.channels), None)
        if attr is not None:
            return path, layer, attr
    return None


def attach_head_counts(graph: Any, net: Any, state: TraceState) -> None:
    """For each head group (channels from an attention cut), find the attention layer: the
    nearest common ancestor of the group's layers holding an int head count equal to the
    group's channels (the attribute its registered `AttentionPruning` names, else `num_heads`
    and the other `_HEAD_ATTRS`, as `paddle.nn.MultiHeadAttention` and PaddleClas's layers
    keep). Surgery then sets it after slicing (`surgery.track_count`), so the attention layer's
    own per-head parameters (a relative position bias table) slice without a registered
    handler. Without such a count the heads trial decides (a forward that reshapes with -1)."""
    from ..layers.registry import layer_handler
    from ..layers.surgery import track_count

    att = state.attention_ids
    if not len(att):
        return
    head_groups = set()
    for m in state.members:
        key = graph.param_key(m.param)
        if key is not None and np.isin(m.ids, att).any():
            pa = graph.param_axes.get((key, m.axis))
            if pa is not None:
                head_groups.update(np.unique(pa.group[pa.group >= 0]).tolist())
    layers = dict(net.named_sublayers(include_self=True))
    _check_part_slices(graph, state)
    founds = {gi: _head_count_of(graph.groups[gi], layers) for gi in sorted(head_groups)
              if graph.groups[gi].producers and graph.groups[gi].layers}
    claims = Counter((f[0], f[2]) for f in founds.values() if f is not None)
    for gi, found in founds.items():
        g = graph.groups[gi]
        if found is not None and claims[(found[0], found[2])] > 1:
            # one int for several attentions' heads (a model-wide `num_heads` on an ancestor):
            # not theirs to set; the heads trial decides whether their forwards follow
            found = None
        if found is None:
            owner = _attention_owner(g, layers)
            hint = (f" (these are attention heads: register the attention layer, e.g. "
                    f"register_layer_type({owner}, AttentionPruning('<the name of its head "
                    "count>')), or with AttentionPruning(forward=...), a forward that reads its "
                    "sizes from its parameters)")
            if not g.prunable and "has no registered surgery" in g.reason:
                g.reason += hint
            elif graph.trial_whats.get(gi) == HEADS_TRIAL:  # said if the trial fails
                graph.trial_whats[gi] = HEADS_TRIAL + hint
            continue
        path, layer, attr = found
        key, axis = g.producers[0]
        pa = graph.param_axes[(key, axis)]
        per = int((pa.group == gi).sum()) // g.channels
        track_count(net, path, attr, key, axis, per)
        # the attention layer's own per-head parameters: sliced as plain tensors, its count synced
        if layer_handler(layer) is None:
            own = [k for k, _ in g.members if k.rpartition(".")[0] == path]
            graph.plain_params.update(own)
            stale = f"layer {path or '<root>'} ({type(layer).__name__}) has no registered surgery"
            if not g.prunable and g.reason.startswith(stale):
                g.prunable, g.reason = True, ""


PART_SLICE_REASON = ("a slice picks single heads (an index along the heads axis): the index would "
                     "point at another head once heads are pruned")


def _check_part_slices(graph: Any, state: TraceState) -> None:
    """`qkv[0]` picks q out of `[3, B, heads, N, head_dim]`: every index along that axis holds
    the same heads, so pruning a head keeps the index right. An index along the heads axis
    itself (`q[:, 0]`) holds one head: its group stays whole."""
    root = state.uf.root_table()
    for rows in state.attention_slices:
        sets = [frozenset(np.unique(root[r]).tolist()) for r in rows]
        if len(set(sets)) == 1:
            continue
        bad = np.unique(root[rows])
        hit = set()
        for m in state.members:
            key = graph.param_key(m.param)
            pa = graph.param_axes.get((key, m.axis)) if key else None
            if pa is not None and np.isin(root[np.asarray(m.ids)], bad).any():
                hit.update(np.unique(pa.group[pa.group >= 0]).tolist())
        for gi in hit:
            g = graph.groups[gi]
            if g.prunable:
                g.prunable, g.reason = False, PART_SLICE_REASON
