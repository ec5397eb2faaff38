"""Control flow: trace the ops inside `pd_op.if` branches and `pd_op.while` bodies.

A tensor-dependent `if` (PP-YOLOE+'s head) or a `while` becomes one op whose sub-blocks hold the
ops, convs included, reading outer values by name. We trace every block in place (the same
handlers, the same state), then unite what the branches yield into each result (like an add:
whichever branch runs, the channels downstream are the same ones), and a loop's carried values
with what its body yields back. A branch that changes channel meaning (an op no handler
follows, a literal-size constant) blocks the ids it touches, so the group is left whole with
that reason. Convs inside count FLOPs as often as they run on the traced input (an eager pass,
as `count_flops` does): `weigh_conditional_macs`. This module only reads the network.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ..layers.registry import layer_handler, network_batch
from .tracing import (SourceRec, TraceState, Val, broadcast_ids, register_op,
                      shape_of, trace_op, unknown_op)

logger = logging.getLogger(__name__)

_YIELD = "cf.yield"


def _trace_block(state: TraceState, block: Any) -> List[Optional[Val]]:
    """Trace a block's ops; return the values its closing `cf.yield` hands back."""
    n_macs = len(state.macs)
    yielded: List[Optional[Val]] = []
    for inner in block.ops:
        if inner.name() == _YIELD:
            yielded = [state.vals.get(o.source().id) if o.source().initialized() else None
                       for o in inner.operands()]
            continue
        trace_op(state, inner)
    for mac in state.macs[n_macs:]:
        mac.conditional = True
    return yielded


def _join(state: TraceState, out: Val, values: List[Optional[Val]], what: str) -> None:
    """`out` is one of `values` depending on the data: unite their channel ids (as an add
    would). A value nobody traces (a constant) of a size fixed along channels blocks them."""
    traced = [(v, state.ids_of(v)) for v in values if v is not None]
    with_ids = [(v, ids) for v, ids in traced if ids is not None and v.items is None]
    if not with_ids:
        out.ids = None
        return
    nd = max(ids.ndim for _, ids in with_ids)
    if any(ids.ndim != nd for _, ids in with_ids):
        reason = f"{what} yields values of different ranks"
        state.block(np.concatenate([ids.ravel() for _, ids in with_ids]), reason)
        out.ids = None
        if out.shape:  # whatever reads it sees channels nobody may prune
            out.ids = state.fresh(1).reshape((1,) * len(out.shape))
            state.sources.append(SourceRec(out.ids.ravel(), None, blocked=reason))
        return
    main = with_ids[0][1]
    for _, ids in with_ids[1:]:
        joint = tuple(max(a, b) for a, b in zip(ids.shape, main.shape))
        state.uf.union_arrays(broadcast_ids(ids, joint), broadcast_ids(main, joint))
    for v, ids in traced:
        if ids is None and v.shape and len(v.shape) == nd and any(
                v.shape[a] > 1 and main.shape[a] > 1 for a in range(nd)):
            state.block(main, f"{what} yields a constant of fixed size along these channels")
    out.ids = main
    if not out.shape or -1 in out.shape:  # PIR leaves sizes open where branches differ
        shapes = [v.shape for v, _ in with_ids if v.shape and -1 not in v.shape]
        if shapes:
            out.shape = tuple(shapes[0])


@register_op("if")
def _if(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Both branches traced; each result unites what the two branches yield for it."""
    branches = [_trace_block(state, b) for b in op.blocks()]
    for k, out in enumerate(outs):
        _join(state, out, [b[k] if k < len(b) else None for b in branches],
              "a branch of pd_op.if")


@register_op("while")
def _while(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """Operands (cond, *init); the body's arguments are the carried values, its `cf.yield`
    gives (cond, *next). Each carried value keeps the same channels in every iteration: its
    initial ids, the body's argument and the next value are united."""
    (body,) = list(op.blocks())
    init = ins[1:]
    args = list(body.args())
    if len(args) != len(init):
        unknown_op(state, op, ins, outs, why="a loop whose carried values we cannot match")
        return
    for arg, v in zip(args, init):
        state.vals[arg.id] = Val(shape=v.shape or shape_of(arg), ids=state.ids_of(v),
                                  const=v.const)
    yielded = _trace_block(state, body)[1:]
    for k, out in enumerate(outs):
        carried = [init[k] if k < len(init) else None, yielded[k] if k < len(yielded) else None]
        _join(state, out, carried, "the body of pd_op.while")


def _calls(net: nn.Layer, input_shape: List[int], params: set,
           example: Optional[List[Any]] = None) -> Tuple[Dict[str, int], Dict[str, int]]:
    """How often each parameter's layer runs in one eval forward on zeros (as `count_flops`
    runs it), and its MACs there; on `example` (the forward's arguments) when zeros of
    `input_shape` are not what the forward takes (a dict of inputs)."""
    counts: Dict[str, int] = {}
    macs: Dict[str, int] = {}
    hooks = []
    for layer in net.sublayers(include_self=True):
        names = [p.name for p in layer.parameters(include_sublayers=False) if p.name in params]
        if names:
            def hook(layer: nn.Layer, inputs: Any, output: Any, names: List[str] = names) -> None:
                handler = layer_handler(layer)
                cost = handler.call_macs(layer, inputs, output) if handler is not None else 0
                for n in names:
                    counts[n] = counts.get(n, 0) + 1
                    macs[n] = macs.get(n, 0) + cost
            hooks.append(layer.register_forward_post_hook(hook))
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        with paddle.no_grad():
            try:
                with network_batch(int(input_shape[0])):
                    net(paddle.zeros(list(input_shape), dtype="float32"))
            except Exception:  # noqa: BLE001  (the user's forward)
                if example is None:
                    raise
                counts.clear()
                macs.clear()
                first = next((v for v in example if isinstance(v, paddle.Tensor)), None)
                with network_batch(int(first.shape[0]) if first is not None else 1):
                    net(*example)
    finally:
        for h in hooks:
            h.remove()
        for layer, training in modes:
            layer.training = training
    return counts, macs


def weigh_conditional_macs(graph: Any, net: nn.Layer, state: TraceState,
                           example: Optional[List[Any]] = None) -> None:
    """Convs and linears inside control flow count as often as they run on the traced input:
    a branch not taken counts nothing, a loop body once per iteration. Predicted FLOPs then
    equal `count_flops` (which runs the same input). The training count reuses the eval weights.
    `graph` is the ChannelGraph being built (typed Any: channels imports this module)."""
    owned = set(graph.paddle_names().values())  # as ChannelGraph keeps them: parameters only
    recs = [m for m in state.macs if m.param in owned]
    if not any(m.conditional for m in recs):
        return
    # traced from the training program alone: see which layers the eval forward runs too
    cond = owned if state.eval_failure else {m.param for m in recs if m.conditional}
    try:
        calls, eager_macs = _calls(net, list(graph.input_shape), cond, example)
    except Exception as e:  # noqa: BLE001  (the user's forward, on zeros)
        logger.warning("an eval forward on zeros failed (%s: %s): FLOPs of the convs under "
                       "control flow count every branch once", type(e).__name__, e)
        return
    if state.eval_failure:
        state.eval_params = set(calls)
    uses: Dict[str, List[int]] = {}  # param -> [unconditional uses, conditional uses]
    for m in recs:
        u = uses.setdefault(m.param, [0, 0])
        u[1 if m.conditional else 0] += 1
    weights = {p: max(calls.get(p, 0) - u[0], 0) / u[1] for p, u in uses.items() if u[1]}
    # only under control flow (or traced from the training program alone): its uses may run
    # on other sizes than in the eval forward (one call per level against one on all levels
    # concatenated), so weigh by the MACs the eval forward really spends there
    traced: Dict[str, int] = {}
    for m in recs:
        if m.conditional:
            traced[m.param] = traced.get(m.param, 0) + m.full_macs()
    for p, u in uses.items():
        if u[0] == 0 and traced.get(p) and p in eager_macs:
            weights[p] = eager_macs[p] / traced[p]
    for m, mac in zip(recs, graph.mac_census):
        if m.conditional:
            mac.weight = weights[m.param]
    if state.eval_failure:  # traced from the training program alone: its counts are its own
        return
    for m, mac in zip([m for m in state.train_macs if m.param in owned],
                      graph.train_mac_census):
        if m.conditional and m.param in weights:
            mac.weight = weights[m.param]
