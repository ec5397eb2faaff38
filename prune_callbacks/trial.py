"""Trial pruning on a copy: does a network still compute the masked function once pruned?

Some forward code computes sizes from the channel count (`x[:, :c // 2]`, `split(x, 2)`),
other code writes them in (`x[:, :self.half]`); the traced program shows both as the same
constants. So a group cut into equal parts is pruned by one channel per part on a deep copy and
compared with the masked original. This module never leaves a change in the network it checks.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from .surgery import Mask, ParamSlices, apply_slices

logger = logging.getLogger(__name__)


def _leaves(out: Any) -> List[np.ndarray]:
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _leaves(item)]
    return [out.numpy()] if hasattr(out, "numpy") else []


def _outputs(net: nn.Layer, x: paddle.Tensor) -> List[np.ndarray]:
    modes = [(layer, layer.training) for layer in net.sublayers(include_self=True)]
    net.eval()
    try:
        with paddle.no_grad():
            return _leaves(net(x))
    finally:
        for layer, training in modes:
            layer.training = training


def trial_prune(net: nn.Layer, input_shape: Sequence[int], keep: ParamSlices,
                drop: ParamSlices, rtol: float = 1e-3) -> Optional[str]:
    """Prune a deep copy of `net` to `keep` and compare it with `net` masked by `drop`.

    Args:
        net: the network (restored bit for bit afterwards).
        input_shape: batch first.
        keep, drop: kept and removed indices per parameter and axis (state_dict keys).
        rtol: largest relative difference accepted.

    Returns:
        None when the pruned copy reproduces the masked outputs, else what went wrong.
    """
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=list(input_shape))
                         .astype("float32"))
    try:
        with Mask(net, drop):
            masked = _outputs(net, x)
        pruned_net = copy.deepcopy(net)
        apply_slices(pruned_net, keep)
        pruned = _outputs(pruned_net, x)
    except Exception as e:  # a size written into forward no longer fits: that is the answer
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
    if len(pruned) != len(masked):
        return "the pruned copy returns another number of outputs"
    for p, m in zip(pruned, masked):
        if p.shape != m.shape:
            return f"output shape {list(p.shape)} instead of {list(m.shape)}"
        err = float(np.abs(p - m).max() / max(float(np.abs(m).max()), 1e-12))
        if err > rtol:
            return f"outputs differ from masking by {err:.2g}"
    return None
