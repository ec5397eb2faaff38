"""Read a pruned network's architecture from its weights' shapes alone, and shrink a fresh copy to it.

For checkpoints without a plan file (paddle's ModelCheckpoint, ``model.save``,
``paddle.save(net.state_dict())``, other tools): each group's kept channel count is solved from
the saved shape of every parameter axis that holds it, checked to agree across all of them, and a
fresh network is shrunk to those counts. Which channels are kept does not matter (the saved
weights overwrite them). Never imports the pruner facade or the callbacks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from ..graph.channels import ChannelGraph, Group
from ..graph.selection import kept_slices
from ..layers.flops import count_params
from ..layers.surgery import apply_slices, supports_layer
from ..planning.plans import GroupPlan, PrunePlan, record_plan

logger = logging.getLogger(__name__)

__all__ = ["prune_to_state_dict", "plan_from_shapes", "kept_counts", "DEFAULT_INPUT_SHAPE",
           "SHAPES_CRITERION"]

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
"""Input shape the network is traced at when none is given (any shape the network accepts works
unless a Linear follows a flatten of feature maps: then it must be the training input's)."""
SHAPES_CRITERION = "shapes"
"""The ``criterion`` of a plan inferred from shapes: its kept channels are the first ones."""


@dataclass(frozen=True)
class _Axis:
    """One parameter axis as a linear equation: size = fixed + sum(per[g] * kept[g])."""

    key: str
    axis: int
    size: int  # in the checkpoint
    fixed: int  # positions of no group
    per: Dict[int, Fraction]  # group -> positions per kept unit (channel, or routed width)


def _shape_of(value: Any) -> Tuple[int, ...]:
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))


def _axes(graph: ChannelGraph, shapes: Mapping[str, Tuple[int, ...]]) -> List[_Axis]:
    groups = graph.groups
    out = []
    for (key, axis), pa in graph.param_axes.items():
        # a grouped conv's input axis counts channels per block, and the block count follows
        # the pruned width: the output axes determine those groups; the final shape check covers it
        if pa.group.ndim != 1 or key not in shapes:
            continue
        if axis >= len(shapes[key]):
            raise ValueError(f"parameter {key!r} has shape {list(shapes[key])} in the checkpoint, but "
                             f"this network's has more than {axis} axes: build the network with the "
                             f"saved architecture")
        per: Dict[int, Fraction] = {}
        for gi in np.unique(pa.group[pa.group >= 0]).tolist():
            sel = pa.group == gi
            # positions per unit: per channel, or per channel of each producer for a routed group
            # (its unknown is the width every producer keeps; an axis holds some producers only)
            units = graph.routed[gi].width if gi in graph.routed else groups[gi].channels
            occupied = np.bincount(pa.channel[sel].ravel(), minlength=groups[gi].channels)
            if gi not in graph.routed and len(set(occupied.tolist())) != 1:
                per = {}  # channels of uneven multiplicity: no linear equation in the kept count
                break
            per[gi] = Fraction(int(sel.sum()), units)
        if per:
            out.append(_Axis(key, axis, int(shapes[key][axis]), int((pa.group < 0).sum()), per))
    return out


def kept_counts(graph: ChannelGraph, shapes: Mapping[str, Sequence[int]]) -> Dict[int, int]:
    """How many channels each group of `graph` kept, read from the saved parameter `shapes`.

    Every parameter axis holding a group's channels gives an equation in the kept counts; they
    are solved one unknown at a time and every one is checked.

    Args:
        graph: the channel graph of the fresh (unpruned) network.
        shapes: state_dict key -> saved shape.

    Returns:
        Group index -> kept count, for every group some parameter axis holds.

    Raises:
        ValueError: two parameters disagree on a group's count (the message names both
            parameters and both counts), a saved size fits no count of a group, or a group's
            count cannot be determined.
    """
    groups = graph.groups
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    axes = _axes(graph, shapes)
    counts: Dict[int, int] = {}
    source: Dict[int, str] = {}

    def units(gi: int) -> int:
        return graph.routed[gi].width if gi in graph.routed else groups[gi].channels

    def implied(ax: _Axis, gi: int) -> int:
        rest = ax.size - ax.fixed - sum(m * counts[g] for g, m in ax.per.items() if g != gi)
        n = Fraction(rest) / ax.per[gi]
        g = groups[gi]
        if n.denominator != 1 or not 1 <= n <= units(gi):
            raise ValueError(
                f"parameter {ax.key!r} has {ax.size} positions on axis {ax.axis} in the checkpoint, which "
                f"fits no channel count of group {g.name!r} (1 to {g.channels} in this network): the "
                f"checkpoint was saved from another architecture, or the file was altered (or, after a "
                f"flatten, the network was traced at another input size: pass input_shape)")
        return int(n)

    progress = True
    while progress:
        progress = False
        for ax in axes:
            unknown = [gi for gi in ax.per if gi not in counts]
            if len(unknown) == 1:
                counts[unknown[0]] = implied(ax, unknown[0])
                source[unknown[0]] = ax.key
                progress = True
    for ax in axes:
        if any(gi not in counts for gi in ax.per):
            continue
        if len(ax.per) == 1:
            (gi,) = ax.per
            got = implied(ax, gi)
            if got != counts[gi]:
                raise ValueError(
                    f"the checkpoint's shapes disagree on group {groups[gi].name!r}: parameter "
                    f"{ax.key!r} holds {got} of its channels, parameter {source[gi]!r} holds "
                    f"{counts[gi]}; the file was altered or mixes two networks")
        elif ax.fixed + sum(m * counts[g] for g, m in ax.per.items()) != ax.size:
            want = int(ax.fixed + sum(m * counts[g] for g, m in ax.per.items()))
            names = ", ".join(f"{groups[g].name!r} {counts[g]} (from {source[g]!r})" for g in ax.per)
            raise ValueError(
                f"the checkpoint's shapes disagree: parameter {ax.key!r} has {ax.size} positions on axis "
                f"{ax.axis}, but the groups it holds kept {want} ({names})")
    # a routed group's unknown was its width per producer: its kept count is that times producers
    counts = {gi: n * len(graph.routed[gi].producers) if gi in graph.routed else n
              for gi, n in counts.items()}
    held = {gi for ax in axes for gi in ax.per}
    unknown = sorted(held - set(counts))
    if unknown:
        raise ValueError(f"the checkpoint's shapes do not determine how many channels groups "
                         f"{[groups[g].name for g in unknown]} kept (their parameters each hold "
                         f"several groups); save the model with prune_callbacks.save_pruned")
    return counts


def _select(graph: ChannelGraph, gi: int, count: int, where: str) -> np.ndarray:
    """`count` channels of group `gi` that the network can keep: the first ones (per block of a
    grouped conv; per route at the matching width of a routed group)."""
    g: Group = graph.groups[gi]
    if not g.prunable:
        raise ValueError(f"parameter {where!r} in the checkpoint holds {count} of the {g.channels} "
                         f"channels of group {g.name!r}, which cannot be pruned in this network "
                         f"({g.reason}): build the network with the saved architecture's arguments")
    routed = graph.routed.get(gi)
    if routed is not None:
        producers = len(routed.producers)
        width = count // producers
        if count % producers or not routed.feasible(width):
            raise ValueError(f"group {g.name!r} cannot keep {count} channels ({producers} producers, "
                             f"parameter {where!r}): the saved shapes fit no width its channel "
                             f"shuffles prune to")
        return routed.select(np.zeros(routed.channels), width)
    if g.partition is None:
        return np.arange(count)
    blocks = [np.flatnonzero(g.partition == b) for b in np.unique(g.partition)]
    if count % len(blocks) or count // len(blocks) > min(len(b) for b in blocks):
        raise ValueError(f"group {g.name!r} feeds a grouped convolution of {len(blocks)} blocks, which "
                         f"must lose channels equally, but parameter {where!r} holds {count} of them")
    return np.sort(np.concatenate([b[: count // len(blocks)] for b in blocks]))


def plan_from_shapes(net: nn.Layer, shapes: Mapping[str, Any],
                     input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE) -> PrunePlan:
    """The plan that shrinks a fresh `net` to the saved `shapes` (keeping the first channels).

    Args:
        net: a freshly built (or less pruned) network of the saved architecture; left unchanged.
        shapes: state_dict key -> saved tensor or shape (a state dict as ``paddle.load`` gives it).
        input_shape: one input's shape, batch first, that the network is traced at.

    Returns:
        A PrunePlan (``criterion`` "shapes"); an empty one (no groups) when nothing was pruned.

    Raises:
        ValueError: the network cannot be traced at `input_shape`, or the shapes do not fit it
            (see :func:`kept_counts`).
    """
    saved = {k: _shape_of(v) if not isinstance(v, (tuple, list)) else tuple(v) for k, v in shapes.items()}
    try:
        graph = ChannelGraph(net, input_shape, supports_layer)
    except (ValueError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"cannot trace {type(net).__name__} at input shape {list(input_shape)} to read "
                         f"the checkpoint's architecture ({lines[-1] if lines else type(e).__name__}); "
                         f"pass input_shape=[1, C, H, W] of the training inputs") from e
    counts = kept_counts(graph, saved)
    where = {gi: key for (key, _), pa in graph.param_axes.items() for gi in set(pa.group.ravel().tolist())}
    kept = {gi: _select(graph, gi, n, where.get(gi, "?")) for gi, n in sorted(counts.items())
            if n != graph.groups[gi].channels}
    keep_sl, _ = kept_slices(graph, kept)
    params_before = count_params(net)
    # from the saved shapes: net itself stays unchanged
    params_after = params_before - sum(
        int(np.prod(p.shape)) - int(np.prod(saved[k])) for k, p in net.named_parameters()
        if k in saved and tuple(p.shape) != saved[k])
    gplans = []
    for gi, k in sorted(kept.items()):
        g = graph.groups[gi]
        removed = sorted(set(range(g.channels)) - set(int(i) for i in k))
        gplans.append(GroupPlan(g.name, g.channels, tuple(int(i) for i in k), tuple(removed)))
    return PrunePlan(
        groups=tuple(gplans), flops_before=graph.flops({}),
        flops_after=graph.flops({gi: len(k) for gi, k in kept.items()}),
        params_before=params_before, params_after=params_after,
        input_shape=tuple(int(s) for s in input_shape), criterion=SHAPES_CRITERION,
        param_slices={key: {ax: tuple(tuple(b) for b in v) if v and isinstance(v[0], list) else tuple(v)
                            for ax, v in axes.items()} for key, axes in keep_sl.items()})


def shrink_to_shapes(net: nn.Layer, state_dict: Mapping[str, Any],
                     input_shape: Optional[Sequence[int]] = None) -> PrunePlan:
    """Prune `net` (keys checked already) to the state dict's shapes, record the plan, return it.

    Raises:
        ValueError: see :func:`plan_from_shapes`; tensors that still do not fit afterwards.
    """
    shape = tuple(input_shape) if input_shape is not None else DEFAULT_INPUT_SHAPE
    plan = plan_from_shapes(net, state_dict, shape)
    if plan.groups:
        apply_slices(net, {k: dict(axes) for k, axes in plan.param_slices.items()})
        record_plan(net, plan)
    bad = [(k, list(_shape_of(state_dict[k])), list(v.shape)) for k, v in net.state_dict().items()
           if list(_shape_of(state_dict[k])) != list(v.shape)]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {a}, network {b}" for k, a, b in bad[:8])
        raise ValueError(f"{len(bad)} tensor(s) still do not fit after shrinking {type(net).__name__} to the "
                         f"checkpoint's channel counts: {lines}. Build the network with the saved "
                         f"architecture's arguments.")
    return plan


def prune_to_state_dict(net: nn.Layer, state_dict: Mapping[str, Any],
                        input_shape: Optional[Sequence[int]] = None, *, load: bool = True) -> nn.Layer:
    """Shrink a freshly built network to the shapes of a pruned network's state dict, and load it.

    The architecture is read from the shapes (see :func:`plan_from_shapes`); the plan that shrank
    the network is recorded on it (``record_plan``), so :func:`prune_callbacks.save_pruned` saves
    it with a plan file afterwards.

    Args:
        net: the network, built as the saved one was before pruning (a ``paddle.Model``'s
            ``network`` for a Model).
        state_dict: e.g. ``paddle.load("ckpt/final.pdparams")``.
        input_shape: one input's shape, batch first; default ``[1, 3, 224, 224]``. Only networks
            whose Linear follows a flatten of feature maps need the training input's shape.
        load: also load the weights (``net.set_state_dict``), after checking every key and shape.

    Returns:
        `net`, pruned (and loaded).

    Raises:
        TypeError: `net` is not a Layer or `state_dict` not a mapping.
        ValueError: keys that differ from the network's; shapes that disagree (the message names
            the parameter and the two counts) or that no pruning of this network gives.

    Examples:
        >>> net = prune_to_state_dict(paddle.vision.models.mobilenet_v1(num_classes=10),
        ...                           paddle.load("ckpt/final.pdparams"))
    """
    if isinstance(net, paddle.DataParallel):
        net = net._layers
    if not isinstance(net, nn.Layer):
        raise TypeError(f"net must be a paddle.nn.Layer, got {type(net).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of state_dict keys to tensors (as paddle.load gives), "
                        f"got {type(state_dict).__name__}")
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"the state dict does not match {type(net).__name__}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}. Build the network with the same architecture "
                         f"and arguments as the saved one.")
    plan = shrink_to_shapes(net, state_dict, input_shape)
    logger.info("inferred the architecture of %s from the state dict's shapes: %d group(s) pruned, FLOPs %d "
                "-> %d, params %d -> %d", type(net).__name__, len(plan.groups), plan.flops_before,
                plan.flops_after, plan.params_before, plan.params_after)
    if load:
        net.set_state_dict(dict(state_dict))
    return net
