"""`pd_op.deformable_conv`: how channel ids flow through a deformable convolution.

Operands (x, offset, filter, mask): the filter mixes x's channels into new output channels as
a conv's does (`ops.trace_conv`); the offset (2 x deformable_groups x kernel positions) and mask
(deformable_groups x kernel positions) have sizes the kernel fixes, so the convs producing
them keep their output channels. With several deformable groups, each run of input channels
reads its own offsets: the runs lose equal counts (and the output channels stay a multiple of
the deformable groups, which the kernel requires). Registration only.
"""
from __future__ import annotations

from typing import Any, List

from .ops import trace_conv
from .tracing import TraceState, Val, register_op

OFFSET_REASON = ("offset or mask of a deformable conv: its size is fixed by the kernel and the "
                 "deformable groups")

@register_op("deformable_conv")
def _deformable_conv(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    x, offset, w = ins[0], ins[1], ins[2]
    mask = ins[3] if len(ins) > 3 else None
    for v in (offset, mask):
        if v is not None and v.param is None:
            state.block(state.ids_of(v), OFFSET_REASON)
    trace_conv(state, op, [x, w], outs)
    dg = int(op.attrs().get("deformable_groups", 1))
    line = state.channel_ids(x, 1) if state.ids_of(x) is not None else None
    out_line = state.channel_ids(outs[0], 1) if outs[0].ids is not None else None
    if dg > 1 and line is not None and len(line) % dg == 0:
        state.partitions.append((line.reshape(dg, -1).copy(), "deformable groups"))
        if out_line is not None and len(out_line) % dg == 0:  # the kernel wants out % dg == 0
            state.partitions.append((out_line.reshape(dg, -1).copy(), "deformable groups"))
    elif dg > 1:
        state.block(state.ids_of(x), "deformable groups over a channel layout we cannot split")
