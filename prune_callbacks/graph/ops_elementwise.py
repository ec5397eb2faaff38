"""Element-wise ops that map channels one to one, registered as pass-through in one place.

Clean-up ops on feature maps (`where`, `isnan`, comparisons, logical ops, `clip`, `sign`, `cast`
...) compute each output element from the same element of their inputs: a unary one passes its
input's channels on; one with several inputs couples them like an add
(`ops.trace_elementwise`, which also handles broadcasting and constants of fixed size). This
module only registers handlers.
"""
from __future__ import annotations

from typing import Any, List

from .ops import trace_elementwise
from .tracing import TraceState, Val, register_op

# One input, one output of the same shape: channel c out of channel c in. Activations and
# arithmetic ops registered by `ops` (relu, clip, sign, cast, scale, add, multiply, maximum ...)
# are left to it: registering them twice would override whatever handler it gives them.
UNARY = tuple("""
    isnan isinf isfinite logical_not bitwise_not nan_to_num neg reciprocal rsqrt log log2 log10
    log1p expm1 sin cos tan asin acos atan sinh cosh asinh acosh atanh trunc frac logit
    hardshrink softshrink increment stop_gradient detach
""".split())

# several inputs broadcast against each other, element by element (like an add)
MULTI = tuple("""
    where equal not_equal greater_than greater_equal less_than less_equal logical_and
    logical_or logical_xor bitwise_and bitwise_or bitwise_xor fmax fmin remainder floor_divide
    atan2 heaviside copysign
""".split())

# new tensors shaped like their input (`paddle.zeros_like(x)`): they follow its channel count,
# so in `where(mask, x, zeros_like(x))` they must not count as a constant of fixed size (this
# replaces `ops`' constant handler for them; importing `ops` first keeps the order)
SHAPED_LIKE = ("full_like", "zeros_like", "ones_like")


@register_op(*UNARY)
def _unary(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    outs[0].ids = state.ids_of(ins[0])


register_op(*MULTI)(trace_elementwise)


@register_op(*SHAPED_LIKE)
def _shaped_like(state: TraceState, op: Any, ins: List[Val], outs: List[Val]) -> None:
    outs[0].const = op.attrs().get("value")
    outs[0].ids = state.ids_of(ins[0]) if ins and ins[0].param is None else None
