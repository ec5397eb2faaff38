"""Group a network's channels into sets that must be pruned together.

`ChannelGraph` traces the network (`tracing`, with the op handlers of `op_handlers`), then turns
channel ids into groups: ids joined by residual adds form one group, every parameter axis holding
them becomes a member, and anything that cannot follow a pruned channel count makes its group
unprunable with a reason. This module only reads the network; it never changes a parameter.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import paddle

from . import ops  # noqa: F401  (importing it registers the built-in op handlers)
from . import control_flow, ops_deformable, ops_elementwise, ops_gather  # noqa: F401  (more ops)
from .training_graph import (LATER, TrainInputs, example_batch, example_spec,
                             hold_eval_only_feeders, hold_train_only_feeders)
from . import attention  # noqa: F401  (tokens and attention heads; after the op modules above)
from . import norms  # LayerNorm widths (the layer_norm_widths switch)
from ..layers.registry import layer_handler
from .routes import CopyProbe, RoutedGroup, Slices, Unroutable, group_lines
from ..layers.surgery import (allow_plain_parameters, apply_slices, copy_for_pruning,
                              install_forwards, reset_counts, track_count, trial_prune,
                              trial_train_run, untrack_count)
from .tracing import (MacKind, MacRec, MemberRec, Role, TraceModes, TraceState, compress_ids,
                      connected_components, trace_network)

__all__ = ["ChannelGraph", "Group", "ParamAxis"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# From ids to groups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamAxis:
    """How the positions along one axis of one parameter map to group channels.

    `group[i]` is the index of the group that position i belongs to (-1: never pruned) and
    `channel[i]` its channel index inside that group. For a grouped conv's input axis both
    arrays have shape [blocks, per_block].
    """

    key: str  # structured name (state_dict key)
    axis: int
    group: np.ndarray
    channel: np.ndarray
    role: Role

    @property
    def blocks(self) -> int:
        return self.group.shape[0] if self.group.ndim == 2 else 1


@dataclass
class Group:
    """A set of coupled channels that must be removed together, index by index.

    A group that channel shuffles route differently at each width (`ChannelGraph.routed`,
    ShuffleNetV2 stages) holds every channel of every producer; `partition` labels the
    producer, and every producer keeps the same count.
    """

    name: str
    param_name: str  # Paddle name of the leading weight (PaddleSlim style), "" if none
    channels: int
    prunable: bool
    reason: str = ""
    layers: Tuple[str, ...] = ()
    members: Tuple[Tuple[str, int], ...] = ()  # (param key, axis)
    partition: Optional[np.ndarray] = None  # block label per channel (-1: free)
    producers: Tuple[Tuple[str, int], ...] = ()  # (param key, out axis) of layers minting it
    norms: Tuple[str, ...] = ()  # keys of per-channel norm scales (BatchNorm weight)

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return f"Group({self.name!r}, channels={self.channels}, {state})"


@dataclass
class _Mac:
    kind: MacKind
    kernel_spatial: int
    blocks: int
    out: Tuple[Dict[int, int], int]  # positions per group, positions never pruned
    inp: Tuple[Dict[int, int], int]
    weight: float = 1.0  # calls per forward of an op inside control flow (else 1)


def add_axis_slices(keep_sl: Dict[str, Dict[int, Any]], drop_sl: Dict[str, Dict[int, Any]],
                    key: str, axis: int, keep: np.ndarray) -> None:
    """Record the kept and removed positions of one parameter axis from its boolean `keep`
    (2-D for a grouped conv's input axis: one row of positions per block)."""
    if keep.ndim == 2:
        keep_sl.setdefault(key, {})[axis] = [np.flatnonzero(r).tolist() for r in keep]
        drop_sl.setdefault(key, {})[axis] = [np.flatnonzero(~r).tolist() for r in keep]
    else:
        keep_sl.setdefault(key, {})[axis] = np.flatnonzero(keep).tolist()
        drop_sl.setdefault(key, {})[axis] = np.flatnonzero(~keep).tolist()


class ChannelGraph:
    """Coupled channel groups of a network, read from its PIR program.

    Args:
        net: the network (left unchanged).
        input_shape: one input's shape, batch first, e.g. [1, 3, 32, 32]; FLOPs are counted
            per sample whatever the batch size.
        supports_layer: tells whether surgery knows a layer; channels of parameters in other
            layers are left unpruned.
        modes: which programs to trace (see `tracing.trace_network`): "auto" adds the
            training-mode program when the network's graph differs there (branches under
            `if self.training:`), so groups hold the consumers of both modes.
        layer_norm_widths: let channels a LayerNorm normalises be pruned (its weight and bias
            sliced, statistics over the kept channels; `graph.norms`), or keep them whole.
        train_inputs: what the forward is called with on a training step (a batch, targets
            included, or a callable returning one; `training_graph.example_spec`): the
            training program is traced from it. Without it, a training forward that cannot be
            traced from `input_shape` leaves the eval graph, with the groups that may feed
            train-only layers held whole (`training_graph.hold_train_only_feeders`).
    """

    def __init__(self, net: paddle.nn.Layer, input_shape: Sequence[int],
                 supports_layer: Callable[[paddle.nn.Layer], bool] = lambda layer: True,
                 modes: "TraceModes | str" = "auto",
                 train_inputs: Optional[TrainInputs] = None, layer_norm_widths: bool = True) -> None:
        self.layer_norm_widths = bool(layer_norm_widths)
        reset_counts(net)  # counts an earlier trace tracked describe the network as it was
        # one batch for everything below (a callable draws a new one at every call)
        batch = example_batch(train_inputs)
        install_forwards(net, input_shape)  # registered forwards (AttentionPruning(forward=))
        with norms.layer_norm_widths(layer_norm_widths):
            state = trace_network(net, input_shape, modes, example_spec(batch), batch)
        self.train_failure = state.train_failure  # the training program could not be built
        self._modes = modes
        self.two_modes = state.two_modes
        self.input_shape = tuple(int(s) for s in input_shape)
        self._owner: Dict[str, Tuple[str, str, paddle.nn.Layer]] = {}  # pname -> key, path, layer
        self._buffers: Dict[str, str] = {}  # tensor name -> structured key
        for path, layer in net.named_sublayers(include_self=True):
            for attr, p in layer.named_parameters(include_sublayers=False):
                self._owner[p.name] = (f"{path}.{attr}" if path else attr, path, layer)
            for attr, b in layer.named_buffers(include_sublayers=False):
                if b is not None:
                    self._buffers[b.name] = f"{path}.{attr}" if path else attr
        self.plain_params: Set[str] = set()  # per-channel parameters of unregistered layers
        self._build(state, supports_layer)
        attention.attach_head_counts(self, net, state)
        if train_inputs is not LATER:
            hold_train_only_feeders(self, net, state)
        control_flow.weigh_conditional_macs(self, net, state,
                                            batch if state.eval_failure else None)
        hold_eval_only_feeders(self, net, state)
        allow_plain_parameters(net, self.plain_params)
        # group index -> its routes, for groups that shuffles route differently at each width
        self.routed: Dict[int, RoutedGroup] = {}
        self._trial_split_groups(net)
        self._trial_training_groups(net, batch)
        self._route_groups(net, state)

    # -- construction ----------------------------------------------------------------------
    def _build(self, st: TraceState, supports_layer: Callable[[paddle.nn.Layer], bool]) -> None:
        """Channel classes (ids joined by the union-find) -> groups -> parameter axes.

        A group starts as every class that one op mints together (a conv's filters), joined
        across ops by the classes they share (a residual add). A group free of blocked channels
        is then split so that every layer touching it sees all of its channels, equally often:
        a concat added to a conv output would otherwise put two producers in one group, and one
        of them could lose all its channels while the group kept some.
        """
        blocked = _blocked_channels(st)
        root = st.uf.root_table()
        gcomp, flat = _source_components(st, root)
        sig = _class_signatures(st, root, gcomp, blocked)
        classes = _number_classes(root, flat, gcomp, sig)
        reasons = _Reasons()
        for ids, why in blocked:
            reasons.add(classes.groups_of(ids), why)
        lead = _lead_params(st, classes)
        self.param_axes: Dict[Tuple[str, int], ParamAxis] = {}
        # group -> ints kept by layers with no handler that equal the width of their own
        # per-channel parameter: (layer path, attribute, parameter key, axis)
        self._kept_ints: Dict[int, List[Tuple[str, str, str, int]]] = {}
        parts = self._add_param_axes(st, classes, reasons, supports_layer)
        partitions, self._split_groups = _block_partitions(st, classes, reasons)
        # group -> what a trial prune of a copy must confirm (a split, a shuffle, kept ints);
        # MAC records per census below: read by the graph's sibling modules (attention,
        # control_flow) that extend this class's analysis
        self.trial_whats: Dict[int, str] = {}
        self._train_trials: Dict[int, str] = {}
        for ids, what in st.train_trials:  # verified by a training run of a pruned copy
            for gi in classes.groups_of(ids):
                self._train_trials.setdefault(gi, what)
        for ids, what in st.trials:  # a channel shuffle: verified like a split
            for gi in classes.groups_of(ids):
                self._split_groups.add(gi)
                self.trial_whats.setdefault(gi, what)
        for gi, ints in self._kept_ints.items():  # widths kept as ints: verified likewise
            self._split_groups.add(gi)
            self.trial_whats.setdefault(gi, _ints_what(ints))
        self.groups: List[Group] = self._make_groups(classes, lead, parts, partitions, reasons)
        # groups left whole only because shuffles nest splits: the route model may prune them
        self._reroute = sorted(gi for gi in reasons.fixable if gi in self.trial_whats)
        self.mac_census = [_mac_census(m, classes) for m in st.macs if m.param in self._owner]
        self.train_mac_census = [_mac_census(m, classes) for m in st.train_macs
                            if m.param in self._owner]

    def _add_param_axes(self, st: TraceState, classes: "_Classes", reasons: "_Reasons",
                        supports_layer: Callable[[paddle.nn.Layer], bool]) -> "_GroupParts":
        """Fill `self.param_axes` from the trace's members; return what each group holds."""
        parts = _GroupParts(len(classes.channels))
        for m in st.members:
            grp, ch = classes.locate(m.ids)
            hit = _touched(grp)
            if m.param not in self._owner:
                what = (f"buffer {self._buffers[m.param]}" if m.param in self._buffers
                        else f"tensor {m.param}")
                reasons.add(hit, f"{what} holds per-channel values but is not a parameter, so "
                                 "it cannot be sliced")
                continue
            key, path, layer = self._owner[m.param]
            prev = self.param_axes.get((key, m.axis))
            if m.param in st.opaque_params:
                reasons.add(hit, f"parameter {key} is {st.opaque_params[m.param]}")
            if prev is not None and not (np.array_equal(prev.group, grp)
                                         and np.array_equal(prev.channel, ch)):
                reasons.add(set(hit) | set(_touched(prev.group)),
                            f"parameter {key} is used with different channels")
                continue
            self.param_axes[(key, m.axis)] = ParamAxis(key, m.axis, grp, ch, m.role)
            # a plain parameter used in arithmetic (a LayerScale `x * self.gamma`, a position
            # embedding) by a layer with no handler: its forward reads the tensor itself, so
            # slicing it is enough. Ints the layer keeps equal to the count (`self.embed_dim`)
            # may be read by its forward or not: a trial prune decides (`_trial_kept_ints`)
            plain = m.role == Role.NORM and layer_handler(layer) is None
            if plain:
                self.plain_params.add(key)
                ints = _kept_ints(layer, int(m.ids.shape[-1]))
                if ints:
                    for gi in hit:
                        self._kept_ints.setdefault(gi, []).extend(
                            (path, a, key, m.axis) for a in ints)
            if not supports_layer(layer) and not plain:
                reasons.add(hit, f"layer {path or '<root>'} ({type(layer).__name__}) has no "
                                 "registered surgery; see "
                                 "prune_callbacks.register_layer_type")
            parts.add(hit, key, m.axis, path, m.role)
        return parts

    def _make_groups(self, classes: "_Classes", lead: Dict[int, str], parts: "_GroupParts",
                     partitions: Dict[int, np.ndarray], reasons: "_Reasons") -> List[Group]:
        """One Group per group index, named after the layer of its lead parameter."""
        groups: List[Group] = []
        used: Dict[str, int] = {}
        for i in range(len(classes.channels)):
            pname = lead.get(i, "")
            if pname and pname in self._owner:
                name = self._owner[pname][1] or "<root>"
                used[name] = used.get(name, 0) + 1
                if used[name] > 1:  # a producer whose channels were split over several groups
                    name = f"{name}#{used[name]}"
            else:
                name = f"<unnamed:{i}>"
                reasons.add([i], "no conv or linear layer produces these channels")
            groups.append(Group(
                name=name, param_name=pname, channels=int(classes.channels[i]),
                prunable=i not in reasons.by_group, reason=reasons.by_group.get(i, ""),
                layers=tuple(parts.layers[i]), members=tuple(parts.members[i]),
                partition=partitions.get(i), producers=tuple(parts.producers[i]),
                norms=tuple(parts.norms[i]),
            ))
        return groups

    def _trial_split_groups(self, net: paddle.nn.Layer) -> None:
        """A group cut into equal parts, or passing a channel shuffle, prunes only if the
        forward computes the part sizes (and the shuffle's reshape sizes) from the channel
        count: prune one channel per part (one channel if it has no parts) on a copy and
        compare with masking (`surgery.trial_prune`); sizes written into the code leave the
        group whole. All such groups are tried together first (one copy); only if that
        fails, one by one."""
        todo: List[Tuple[int, Slices, Slices]] = []
        for gi in sorted(self._split_groups):
            g = self.groups[gi]
            if not g.prunable:
                continue
            drop = np.zeros(g.channels, dtype=bool)
            if g.partition is None:
                drop[-1] = True
            else:
                for b in np.unique(g.partition):
                    drop[np.flatnonzero(g.partition == b)[-1]] = True
            if drop.all():
                continue
            todo.append((gi, *self.group_slices(gi, ~drop)))
        if len(todo) > 1 and self._trial_together(net, todo):
            return
        for gi, keep_sl, drop_sl in todo:
            g = self.groups[gi]
            failure = self._trial_kept_ints(net, gi, keep_sl, drop_sl)
            if failure is not None:
                g.prunable = False
                what = self.trial_whats.get(gi, "split or slice")
                g.reason = (f"{what} sizes written into the code: pruning one channel per "
                            f"part on a copy did not reproduce masking ({failure})")
                warnings.warn(f"group {g.name} left unpruned: {g.reason}", stacklevel=4)

    def _trial_training_groups(self, net: paddle.nn.Layer,
                               example: Optional[List[Any]]) -> None:
        """Groups whose pruning rests on sizes only the training forward computes (a dropout
        mask drawn with the input's shape): prune one channel of each on a copy and run a
        training forward on the training inputs (zeros of the input shape without them), all
        groups at once and, if that fails, one by one; a group whose run fails stays whole."""
        todo = [gi for gi in sorted(self._train_trials) if self.groups[gi].prunable
                and self.groups[gi].channels > 1]
        if not todo:
            return
        args = example if example is not None else [paddle.zeros(list(self.input_shape))]

        keeps = {}
        for gi in todo:
            mask = np.ones(self.groups[gi].channels, dtype=bool)
            mask[-1] = False
            keeps[gi] = self.group_slices(gi, mask)[0]
        together = _merged(keeps.values())
        if together is not None and trial_train_run(net, together, args) is None:
            return
        for gi in todo:
            failure = trial_train_run(net, keeps[gi], args)
            if failure is not None:
                g = self.groups[gi]
                g.prunable = False
                g.reason = (f"{self._train_trials[gi]} sizes written into the code: a training "
                            f"forward of a copy pruned by one channel failed ({failure})")
                warnings.warn(f"group {g.name} left unpruned: {g.reason}", stacklevel=4)
    def _trial_together(self, net: paddle.nn.Layer,
                        todo: List[Tuple[int, Slices, Slices]]) -> bool:
        """Trial-prune every group of `todo` on one copy, their kept ints as `_trial_kept_ints`
        tries them first: True when the copy reproduces masking (each group then passes alone as
        well: its sizes follow the tensor), else False with the ints left alone again (the groups
        are tried one by one)."""
        keep = _merged(k for _, k, _ in todo)
        drop = _merged(d for _, _, d in todo)
        if keep is None or drop is None:
            return False  # two groups cut one axis: only apart
        ints = [i for gi, _, _ in todo if self.groups[gi].channels not in self.input_shape[2:]
                for i in self._kept_ints.get(gi, [])]
        _sync_ints(net, ints, True)
        if trial_prune(net, self.input_shape, keep, drop) is None:
            if ints:
                logger.info("%s kept equal to their widths as they prune", _int_names(ints))
            return True
        _sync_ints(net, ints, False)
        return False

    def _trial_kept_ints(self, net: paddle.nn.Layer, gi: int, keep_sl: Slices,
                         drop_sl: Slices) -> Optional[str]:
        """Trial-prune group `gi`, deciding the ints its layers keep equal to the width
        (`self.embed_dim = 768` next to a position embedding). They are first kept in sync with
        the pruned width (`surgery.track_count`), so attributes such as `embed_dim` stay true
        for code the trace never runs (a `reset_classifier`); if the copy then differs from
        masking, they are left alone and tried again (a forward that never reads them passes
        either way). When the width also equals a size of the input (`img_size = 32` at 32x32
        next to a width of 32), an int may be that size: they are tried left alone first and
        synced only if the forward needs it. Synced ints are logged. The failure with them in
        sync is returned when neither passes."""
        ints = self._kept_ints.get(gi, [])
        if not ints:
            return trial_prune(net, self.input_shape, keep_sl, drop_sl)
        ambiguous = self.groups[gi].channels in self.input_shape[2:]
        failures: List[str] = []
        for synced in ((False, True) if ambiguous else (True, False)):
            _sync_ints(net, ints, synced)
            failure = trial_prune(net, self.input_shape, keep_sl, drop_sl)
            if failure is None:
                if synced:
                    logger.info("group %s: %s kept equal to its width as it prunes",
                                self.groups[gi].name, _int_names(ints))
                return None
            failures.append(failure)
        _sync_ints(net, ints, False)
        return failures[-1] if ambiguous else failures[0]

    def param_key(self, name: str) -> Optional[str]:
        """The structured key (`features.3.weight`) of the parameter Paddle names `name`
        (`conv2d_26.w_0`), None for a tensor that is not one of the network's parameters."""
        owner = self._owner.get(name)
        return owner[0] if owner else None

    def paddle_names(self) -> Dict[str, str]:
        """Structured parameter key (`features.3.weight`) -> Paddle's own name (`conv2d_26.w_0`),
        for every parameter of the traced network."""
        return {key: pname for pname, (key, _, _) in self._owner.items()}

    def _route_groups(self, net: paddle.nn.Layer, st: TraceState) -> None:
        """Give groups left whole by nested splits of shuffled channels (ShuffleNetV2 stages) a
        route model (`routes.RoutedGroup`): every channel of every producer becomes one of the
        group's channels, and a width prunes when a pruned, traced copy shows it exactly (tried
        here at a few widths, `_first_widths`; others when asked for). Groups it cannot
        describe, or that no width tried prunes, keep their reason."""
        if not self._reroute:
            return
        root = st.uf.root_table(untied=True)
        key_of = {pname: key for key, pname in self.paddle_names().items()}
        probe = self._probe(net)
        known = _width_caches(net, (self.input_shape, str(self._modes)))
        for gi in self._reroute:
            g = self.groups[gi]
            axes = {ax: pa for ax, pa in self.param_axes.items() if (pa.group == gi).any()}
            try:
                if any((pa.group != gi).any() for pa in axes.values()):
                    raise Unroutable("a parameter axis also holds channels of other groups")
                lines = group_lines(st.members, key_of, root, lambda ax: ax in axes)
                rg = RoutedGroup(g.name, lines, g.producers, probe,
                                 known.setdefault(tuple(sorted(axes)), {}))
            except Unroutable as e:
                g.reason += f"; nor can routes describe it: {e}"
                continue
            why = _first_fit(rg)
            if why:
                g.reason += f"; nor do routes prune it: {why}"
                warnings.warn(f"group {g.name} left unpruned: {g.reason}", stacklevel=4)
                continue
            self.routed[gi] = rg
            for ax, pa in axes.items():
                self.param_axes[ax] = ParamAxis(pa.key, pa.axis, pa.group,
                                                rg.base.lines[ax], pa.role)
            g.channels, g.partition, g.prunable, g.reason = rg.channels, rg.labels, True, ""

    def _probe(self, net: paddle.nn.Layer) -> CopyProbe:
        """Trace and trial-prune copies of `net` as this graph traced it (held weakly)."""
        ref = weakref.ref(net)
        shape, modes, plain = self.input_shape, self._modes, set(self.plain_params)

        def alive() -> paddle.nn.Layer:
            target = ref()
            if target is None:
                raise RuntimeError("the network of this channel graph no longer exists")
            return target

        def trace(keep: Slices) -> Tuple[TraceState, Dict[str, str], paddle.nn.Layer]:
            pruned = copy_for_pruning(alive())  # with the head counts tracked so far
            allow_plain_parameters(pruned, plain)
            apply_slices(pruned, keep)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with norms.layer_norm_widths(self.layer_norm_widths):
                    state = trace_network(pruned, shape, modes)
            _blocked_channels(state)  # as _build does: generic parameters become members
            return state, {p.name: key for key, p in pruned.named_parameters()}, pruned

        def trial(keep: Slices, drop: Slices, pruned: paddle.nn.Layer) -> Optional[str]:
            return trial_prune(alive(), shape, keep, drop, pruned_copy=pruned)

        return CopyProbe(trace, trial)

    def group_slices(self, gi: int, kept: np.ndarray) -> Tuple[Dict[str, Dict[int, Any]],
                                                                Dict[str, Dict[int, Any]]]:
        """Kept and removed indices per parameter (state_dict key) and axis when group `gi`
        keeps the channels where the boolean mask `kept` is True."""
        if gi in self.routed:  # kept in the order the pruned network's shuffles give them
            return self.routed[gi].slices(np.flatnonzero(kept))
        keep_sl: Dict[str, Dict[int, Any]] = {}
        drop_sl: Dict[str, Dict[int, Any]] = {}
        for (key, axis), pa in self.param_axes.items():
            sel = pa.group == gi
            if not sel.any():
                continue
            keep = np.ones(pa.group.shape, dtype=bool)
            keep[sel] = kept[pa.channel[sel]]
            add_axis_slices(keep_sl, drop_sl, key, axis, keep)
        return keep_sl, drop_sl

    # -- queries -------------------------------------------------------------------------
    def flops(self, kept: Optional[Dict[int, int]] = None, training: bool = False) -> int:
        """Multiply-accumulates of convs and linears, per sample, when group i keeps `kept[i]`
        channels: of the eval-mode network (what is deployed), or of the training-mode one
        (auxiliary heads included) with `training=True`.

        Exact when each channel of a group occupies the same number of positions in a layer
        (true for every layer we have seen: flatten repeats each channel H*W times).
        """
        kept = kept or {}

        def count(c: Tuple[Dict[int, int], int]) -> float:
            counts, fixed = c
            total = float(fixed)
            for gi, n in counts.items():
                g = self.groups[gi]
                total += n * (kept.get(gi, g.channels) / g.channels)
            return total

        total = 0
        for mac in (self.train_mac_census if training else self.mac_census):
            out = round(count(mac.out))
            if mac.kind == MacKind.DEPTHWISE:
                inp = 1
            elif mac.kind == MacKind.GROUPED:
                inp = round(count(mac.inp)) // mac.blocks
            else:
                inp = round(count(mac.inp))
            total += out * inp * mac.kernel_spatial * mac.weight
        return int(round(total))


# Per network: the widths its routed groups were measured at, while its structure (layers,
# parameter shapes) stays the same; held weakly, so the table never keeps a network alive.
_WIDTHS: "weakref.WeakKeyDictionary[paddle.nn.Layer, Tuple[Any, Dict[Any, Any]]]" = \
    weakref.WeakKeyDictionary()


def _width_caches(net: paddle.nn.Layer, how: Tuple[Any, ...]) -> Dict[Any, Any]:
    """The width caches of `net`'s routed groups (keyed by the group's parameter axes) for
    this trace setting `how`; emptied when a layer or a parameter shape changed since."""
    structure = (how, tuple(id(layer) for layer in net.sublayers()),
                 tuple((key, tuple(p.shape)) for key, p in net.named_parameters()))
    held = _WIDTHS.get(net)
    if held is None or held[0] != structure:
        held = (structure, {})
        _WIDTHS[net] = held
    return held[1]


def _first_widths(width: int) -> List[int]:
    """Widths (per producer) a routed group is first tried at, in order: half, all but one, a
    quarter, then half's neighbours; the first that prunes exactly verifies the group."""
    half = width // 2
    order = [half, width - 1, width // 4, half - 1, half + 1]
    return list(dict.fromkeys(w for w in order if 1 <= w < width))


def _first_fit(rg: RoutedGroup) -> str:
    """'' when one of the first widths tried (`_first_widths`) prunes `rg` exactly, else why
    not; a forward that fails or differs from masking at one width is not tried at others."""
    tried: List[int] = []
    for w in _first_widths(rg.width):
        tried.append(w)
        if rg.feasible(w):
            return ""
        why = rg.why_not(w)
        if not why.other_widths_may_fit:
            return why
    return (f"no width among {tried} of {rg.width} per producer prunes exactly "
            f"({rg.why_not(tried[0]) if tried else 'it has one channel per producer'})")


def _kept_ints(layer: paddle.nn.Layer, count: int) -> List[str]:
    """The attributes in which a layer stores `count` as a number (`self.embed_dim = 768`),
    which slicing its parameters would leave stale."""
    return sorted(a for a, v in vars(layer).items() if type(v) is int and v == count)


def _ints_what(ints: Sequence[Tuple[str, str, str, int]]) -> str:
    names = sorted({f"{path or '<root>'}.{attr}" for path, attr, _, _ in ints})
    return (f"ints kept equal to the width ({', '.join(names)}; tried in sync with the pruned "
            "width and left alone)")


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    mapping: Dict[int, int] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        if (x < 0) != (y < 0):
            return False
        if x >= 0 and mapping.setdefault(x, y) != y:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The steps of ChannelGraph._build
# ---------------------------------------------------------------------------------------------


def _touched(grp: np.ndarray) -> List[int]:
    """The groups (sorted) that the positions `grp` fall into."""
    return np.unique(grp[grp >= 0]).tolist()


@dataclass(frozen=True)
class _Classes:
    """Where each channel class (a union-find root) landed: its group and its channel there."""

    root: np.ndarray  # id -> class
    group: np.ndarray  # class -> group index, -1 outside every group
    channel: np.ndarray  # class -> channel index inside its group
    channels: np.ndarray  # group index -> channel count

    def locate(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        r = self.root[ids]
        return self.group[r], self.channel[r]

    def groups_of(self, ids: np.ndarray) -> List[int]:
        return _touched(self.locate(ids)[0])


class _Reasons:
    """Why each group cannot be pruned; the first reason given for a group wins."""

    def __init__(self) -> None:
        self.by_group: Dict[int, str] = {}
        self.fixable: Set[int] = set()  # groups whose reason a route model may lift

    def add(self, groups: Iterable[int], why: str, fixable: bool = False) -> None:
        for gi in groups:
            if fixable and gi not in self.by_group:
                self.fixable.add(gi)
            self.by_group.setdefault(gi, why)


class _GroupParts:
    """Per group, in first-seen order: parameter axes, layers, producer axes and norm scales."""

    def __init__(self, n_groups: int) -> None:
        self.members: List[List[Tuple[str, int]]] = [[] for _ in range(n_groups)]
        self.layers: List[List[str]] = [[] for _ in range(n_groups)]
        self.producers: List[List[Tuple[str, int]]] = [[] for _ in range(n_groups)]
        self.norms: List[List[str]] = [[] for _ in range(n_groups)]

    def add(self, groups: Iterable[int], key: str, axis: int, path: str, role: Role) -> None:
        for gi in groups:
            if (key, axis) not in self.members[gi]:
                self.members[gi].append((key, axis))
            if path not in self.layers[gi]:
                self.layers[gi].append(path)
            if role == Role.OUT and (key, axis) not in self.producers[gi]:
                self.producers[gi].append((key, axis))
            if role == Role.NORM and key.endswith("weight") and key not in self.norms[gi]:
                self.norms[gi].append(key)


def _merged(parts: Iterable[Slices]) -> Optional[Slices]:
    """The slices of several groups as one (for a single trial of them together); None when
    two of them cut the same parameter axis (they can only be tried apart)."""
    out: Slices = {}
    for part in parts:
        for key, axes in part.items():
            if set(axes) & set(out.get(key, {})):
                return None
            out.setdefault(key, {}).update(axes)
    return out


KeptInt = Tuple[str, str, str, int]  # layer path, attribute, parameter key, axis


def _sync_ints(net: paddle.nn.Layer, ints: Sequence[KeptInt], synced: bool) -> None:
    """Keep these ints in sync with their parameter axis when pruned (`track_count`), or not."""
    for path, attr, key, axis in ints:
        if synced:
            track_count(net, path, attr, key, axis, 1)
        else:
            untrack_count(net, path, attr)


def _int_names(ints: Sequence[KeptInt]) -> str:
    return ", ".join(f"{path or '<root>'}.{attr}" for path, attr, _, _ in ints)


def _blocked_channels(st: TraceState) -> List[Tuple[np.ndarray, str]]:
    """(ids, reason) of every channel that must never be pruned, in the order reasons win.

    Parameters used by generic ops (a conv bias add, a learnable scale) become members of
    `st.members` on the way.
    """
    blocked: List[Tuple[np.ndarray, str]] = []
    for pname, elems in st.param_elems.items():
        r = st.uf.roots(elems)
        varying = [ax for ax in range(r.ndim) if compress_ids(r).shape[ax] > 1]
        if len(varying) == 1:
            ax = varying[0]
            line = np.moveaxis(r, ax, 0).reshape(r.shape[ax], -1)[:, 0]
            st.members.append(MemberRec(pname, ax, line, Role.NORM))
        elif len(varying) > 1:
            blocked.append((elems, f"parameter {pname} couples channels on several axes"))
    blocked.extend((src.ids, src.blocked) for src in st.sources if src.blocked)
    blocked.extend(st.blocks)
    return blocked


def _source_components(st: TraceState, root: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Join the classes that each source mints together.

    Returns:
        (component of each class, the classes of every source's ids in program order).
    """
    srcs = [root[src.ids] for src in st.sources]
    heads = [np.full(len(r), r[0]) for r in srcs if len(r)]
    flat = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    gcomp = connected_components(len(root), np.concatenate(heads) if heads else flat, flat)
    return gcomp, flat


def _class_signatures(st: TraceState, root: np.ndarray, gcomp: np.ndarray,
                      blocked: List[Tuple[np.ndarray, str]]) -> np.ndarray:
    """A signature per class: which parameter axes hold it, and how often. Classes of one
    component with different signatures become different groups; a component holding blocked
    channels stays whole (signature 0), since it is never pruned anyway."""
    rng = np.random.default_rng(0x5EED)
    sig = np.zeros(len(root), dtype=np.uint64)
    axis_weight: Dict[Tuple[str, int], np.uint64] = {}
    for m in st.members:
        w = axis_weight.setdefault((m.param, m.axis), np.uint64(rng.integers(1, 2**63)))
        cls, counts = np.unique(root[m.ids.ravel()], return_counts=True)
        sig[cls] += w * counts.astype(np.uint64)
    for entry in st.partitions:
        if isinstance(entry, tuple):  # equal parts of a split: one group, blocks kept equal
            cls = np.unique(root[entry[0].ravel()])
            if len(np.unique(gcomp[cls])) == 1:
                sig[cls] = np.bitwise_xor.reduce(np.unique(sig[cls])) | np.uint64(1)
    if blocked:
        frozen = gcomp[root[np.concatenate([ids.ravel() for ids, _ in blocked])]]
        sig[np.isin(gcomp, frozen)] = 0
    return sig


def _number_classes(root: np.ndarray, flat: np.ndarray, gcomp: np.ndarray,
                    sig: np.ndarray) -> _Classes:
    """Groups: the classes met in sources, keyed by (component, signature), numbered in
    program order of their earliest class; channels numbered in class order inside each."""
    n = len(root)
    first_pos = np.full(n, -1, dtype=np.int64)
    if len(flat):
        uniq, idx = np.unique(flat, return_index=True)
        first_pos[uniq] = idx
    classes = np.flatnonzero(first_pos >= 0)
    classes = classes[np.argsort(first_pos[classes], kind="stable")]
    keys: Dict[Tuple[int, int], int] = {}
    class_group = np.full(n, -1, dtype=np.int64)
    for c, gk in zip(classes.tolist(), zip(gcomp[classes].tolist(), sig[classes].tolist())):
        class_group[c] = keys.setdefault(gk, len(keys))
    first_class = np.full(len(keys), n, dtype=np.int64)
    np.minimum.at(first_class, class_group[classes], classes)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[np.argsort(first_class, kind="stable")] = np.arange(len(keys))
    class_group[classes] = rank[class_group[classes]]
    class_chan = np.full(n, -1, dtype=np.int64)
    channels = np.zeros(len(keys), dtype=np.int64)
    for c, gi in zip(classes.tolist(), class_group[classes].tolist()):
        class_chan[c] = channels[gi]
        channels[gi] += 1
    return _Classes(root, class_group, class_chan, channels)


def _lead_params(st: TraceState, classes: _Classes) -> Dict[int, str]:
    """Paddle name of each group's lead weight: the first producer all of whose channels the
    group holds, else the first producer holding some of them."""
    lead: Dict[int, str] = {}
    partial: Dict[int, str] = {}
    for src in st.sources:
        if src.param is None:
            continue
        gs = classes.groups_of(src.ids)
        for gi in gs:
            (lead if len(gs) == 1 else partial).setdefault(gi, src.param)
    return {**partial, **lead}


def _block_partitions(st: TraceState, classes: _Classes,
                      reasons: _Reasons) -> Tuple[Dict[int, np.ndarray], Set[int]]:
    """Blocks of a group that must each lose the same number of channels: the input and output
    blocks of grouped convolutions, and the equal parts a split or a half-slice cuts a tensor
    into (the forward computes their sizes from the pruned count, so they must stay equal).

    Returns:
        (group index -> block label of each of its channels (-1: in no block), the groups cut
        by a split or a slice).
    """
    partitions: Dict[int, np.ndarray] = {}
    split_groups: Set[int] = set()
    for entry in st.partitions:
        part, what = entry if isinstance(entry, tuple) else (entry, "grouped convolution")
        grp, ch = classes.locate(part)
        gi_set = set(grp.ravel().tolist())
        if len(gi_set) != 1 or -1 in gi_set:
            reasons.add(gi_set - {-1}, f"{what} spans several channel groups, so its parts "
                                       "cannot be kept equal")
            continue
        if not _disjoint_rows(ch):
            reasons.add(gi_set, f"a channel shuffle tied channels together (so that every "
                                f"shuffled run keeps the same positions) and the {what} cuts "
                                "tied channels apart or holds them unevenly, so its parts "
                                "cannot be kept equal", fixable=True)
            continue
        gi = gi_set.pop()
        labels = np.full(int(classes.channels[gi]), -1, dtype=np.int64)
        for k in range(ch.shape[0]):
            labels[ch[k]] = k
        if gi in partitions and not _same_partition(partitions[gi], labels):
            reasons.add([gi], f"{what} and another split or grouped convolution disagree on "
                              "channel blocks (in ShuffleNetV2 stages, splits of the shuffled "
                              "channels nest: the channels masking keeps would reach the "
                              "pruned network's splits in another order unless each stage "
                              "kept a width-dependent pattern, which tied channels cannot "
                              "express)",
                        fixable=True)
        partitions[gi] = labels
        if isinstance(entry, tuple):
            split_groups.add(gi)
    return partitions, split_groups


def _disjoint_rows(ch: np.ndarray) -> bool:
    """Whether no channel appears in two blocks and every channel of the blocks appears equally
    often: a channel shuffle ties channels together, so one channel may hold several positions
    of a block; equal counts of positions then follow from equal counts of channels."""
    rows = [np.unique(r, return_counts=True) for r in ch.reshape(ch.shape[0], -1)]
    chans = np.concatenate([c for c, _ in rows])
    counts = np.concatenate([n for _, n in rows])
    return len(np.unique(chans)) == len(chans) and bool((counts == counts[0]).all())


def _mac_census(m: MacRec, classes: _Classes) -> _Mac:
    """A conv/linear op's positions per group, for `ChannelGraph.flops`."""
    def census(ids: np.ndarray) -> Tuple[Dict[int, int], int]:
        grp, _ = classes.locate(ids)
        gs, counts = np.unique(grp, return_counts=True)
        tally = dict(zip(gs.tolist(), counts.tolist()))
        return {g: c for g, c in tally.items() if g >= 0}, tally.get(-1, 0)

    blocks = m.in_ids.shape[0] if m.in_ids.ndim == 2 else 1
    return _Mac(m.kind, m.kernel * m.spatial, blocks, census(m.out_ids), census(m.in_ids))
