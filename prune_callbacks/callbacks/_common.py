"""Argument checks and input-shape inference shared by the callbacks."""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from ..utils.errors import tagged


def check_epoch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise tagged(name, ValueError(f"{name} must be a 0-based epoch index (an int >= 0), got {value!r}"))
    return int(value)


def infer_input_shape(model: Any, dataset: Optional[Any] = None) -> List[int]:
    """One input's shape, batch first: from the model's input spec, else a dataset sample."""
    for spec in getattr(model, "_inputs", None) or []:
        shape = list(getattr(spec, "shape", []) or [])
        if len(shape) >= 2 and all(s is not None and s > 0 for s in shape[1:]):
            return [1] + [int(s) for s in shape[1:]]
        break
    if dataset is not None and len(dataset):
        x = np.asarray(dataset[0][0])
        return [1] + list(x.shape)
    raise ValueError(
        "cannot tell the network's input shape: pass input_shape=[1, C, H, W] to the callback, "
        "or build paddle.Model(net, inputs=[InputSpec([None, C, H, W])])")
