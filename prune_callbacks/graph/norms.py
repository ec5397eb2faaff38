"""Embedding widths through LayerNorm: the residual stream of a transformer may lose channels.

Removing channels from a LayerNorm's input changes the mean and variance every kept channel is
normalised with, so a pruned LayerNorm is not a masked one. With `layer_norm_widths` on (the
default) its weight and bias are sliced with the channels and its statistics taken over the kept
ones; the reference is the network with those channels removed from every layer, and masking
renormalises the same way (`layers.registry.LayerNormPruning.mask`), so masked equals pruned and
a sensitivity analysis measures the pruned network. Each such group is verified by a trial prune
on a copy (a forward that writes the width in, or a LayerNorm that cannot renormalise when
masked, leaves it whole). Off, those channels stay whole. This module only reads the program.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, List

from . import ops
from .tracing import OP_HANDLERS, MemberRec, Role, TraceState, Val, register_op

WIDTH_TRIAL = ("LayerNorm width (the forward must read the width from the tensor or from the "
               "parameters, never write it in)")

OFF_REASON = (ops.LAYER_NORM_REASON + "; layer_norm_widths=False keeps them so: with True, "
              "LayerNorm's weight and bias are sliced and its statistics taken over the kept "
              "channels (the reference is the network with those channels removed everywhere)")

_WIDTHS: "contextvars.ContextVar[bool]" = contextvars.ContextVar("layer_norm_widths",
                                                                 default=True)


@contextlib.contextmanager
def layer_norm_widths(on: bool) -> Iterator[None]:
    """Trace with LayerNorm widths prunable (`on`) or kept whole."""
    token = _WIDTHS.set(bool(on))
    try:
        yield
    finally:
        _WIDTHS.reset(token)


_base_layer_norm = OP_HANDLERS["layer_norm"]  # whatever handled it before


@register_op("layer_norm")
def _layer_norm(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    """LayerNorm over the last axis: weight and bias follow the channels (see the module)."""
    x = ins[0]
    ids = state.ids_of(x)
    nd = len(x.shape)
    begin = int(op.attrs().get("begin_norm_axis", nd - 1)) % max(nd, 1)
    normalised = ids is not None and any(ids.shape[a] > 1 for a in range(begin, ids.ndim))
    if not normalised:
        _base_layer_norm(state, op, ins, outs)
        return
    if not _WIDTHS.get():
        state.block(ids, OFF_REASON)
        outs[0].ids = ids
        return
    line = state.channel_ids(x, nd - 1) if begin == nd - 1 else None
    params = [v for v in ins[1:] if v.param is not None]
    if line is None or not params:
        _base_layer_norm(state, op, ins, outs)
        return
    for v in params:
        state.members.append(MemberRec(v.param, 0, line, Role.NORM))
    state.trials.append((line.copy(), WIDTH_TRIAL))
    outs[0].ids = ids
