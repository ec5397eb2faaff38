"""From kept channels per group to kept (and removed) positions per parameter axis.

Shared by the pruner facade (which chooses the channels) and `deploy.shapes` (which reads the
counts from a checkpoint's shapes). Pure reading of a `ChannelGraph`; it never changes a network.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .channels import ChannelGraph, add_axis_slices

__all__ = ["kept_slices"]

Slices = Dict[str, Dict[int, Any]]


def kept_slices(graph: ChannelGraph, kept: Mapping[int, np.ndarray]) -> Tuple[Slices, Slices]:
    """Per parameter (state_dict key) and axis, the positions kept and removed when group `gi`
    keeps the channels `kept[gi]`; routed groups in the order their pruned shuffles give them."""
    keep_sl: Slices = {}
    drop_sl: Slices = {}
    masks = {}
    for gi, k in kept.items():
        m = np.zeros(graph.groups[gi].channels, dtype=bool)
        m[np.asarray(k, dtype=np.int64)] = True
        if gi in graph.routed:  # its axes hold it alone, in the pruned shuffles' order
            if not m.all():
                keep, drop = graph.routed[gi].slices(np.flatnonzero(m))
                for key, axes in keep.items():
                    keep_sl.setdefault(key, {}).update(axes)
                for key, axes in drop.items():
                    drop_sl.setdefault(key, {}).update(axes)
            continue
        masks[gi] = m
    for (key, axis), pa in graph.param_axes.items():
        hit = [gi for gi in masks if np.any(pa.group == gi)]
        if not hit:
            continue
        keep_mask = np.ones(pa.group.shape, dtype=bool)
        for gi in hit:
            sel = pa.group == gi
            keep_mask[sel] = masks[gi][pa.channel[sel]]
        if not keep_mask.all():
            add_axis_slices(keep_sl, drop_sl, key, axis, keep_mask)
    return keep_sl, drop_sl
