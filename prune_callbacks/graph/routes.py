"""Routed groups: channels that channel shuffles move to width-dependent places.

In a ShuffleNetV2 stage the splits of shuffled channels nest, so no fixed tie of positions fits
every width. Instead each channel's ROUTE (the parameter axes it reaches through index-only ops)
is read from the trace, and the pruned network's routes from a trace of a pruned copy at the
candidate width; a width is feasible when no route needs more channels than the original holds.
This module reads networks and prunes copies of them; it never changes the network itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .tracing import MemberRec, TraceState

logger = logging.getLogger(__name__)

AxisKey = Tuple[str, int]  # (parameter state_dict key, axis)
Route = Tuple[Tuple[AxisKey, int], ...]  # ((axis, positions the channel holds there), ...)
Lines = Dict[AxisKey, np.ndarray]  # axis -> untied channel class at each position
Slices = Dict[str, Dict[int, List[int]]]


@dataclass(frozen=True)
class CopyProbe:
    """What a routed group may do with the network: `trace(keep)` prunes a copy to `keep` and
    traces it (returning the trace, the copy's Paddle parameter name -> state_dict key, and
    the copy); `trial(keep, drop, copy)` fills that copy with the network's `keep` slices and
    compares it with the network masked by `drop` (`surgery.trial_prune`: None if equal, else
    what differed). Neither changes the network."""

    trace: Callable[[Slices], Tuple[TraceState, Dict[str, str], Any]]
    trial: Callable[[Slices, Slices, Any], Optional[str]]


class Unroutable(Exception):
    """A group the route model cannot describe; the message says why."""


@dataclass(frozen=True)
class Routing:
    """Where the channels of a group sit: `classes` (untied channel classes, ascending, so in
    the order their producers mint them), the route of each, and per parameter axis the index
    of the class at each position."""

    classes: np.ndarray
    routes: Tuple[Route, ...]
    lines: Dict[AxisKey, np.ndarray]

    def by_route(self) -> Dict[Route, List[int]]:
        """Class indices per route, ascending."""
        out: Dict[Route, List[int]] = {}
        for c, r in enumerate(self.routes):
            out.setdefault(r, []).append(c)
        return out


def group_lines(members: Sequence[MemberRec], key_of: Mapping[str, str], root: np.ndarray,
                wanted: Callable[[AxisKey], bool]) -> Lines:
    """The untied classes at each position of every member axis `wanted` picks.

    Args:
        members: the trace's members (parameter axes and the ids at their positions).
        key_of: Paddle parameter name -> state_dict key (members of other tensors are skipped).
        root: untied root table of the trace (`root_table(untied=True)`).
        wanted: `wanted((key, axis))` says whether a parameter axis belongs to the group.

    Raises:
        Unroutable: an axis of grouped blocks, or one used twice with different channels.
    """
    lines: Lines = {}
    for m in members:
        key = key_of.get(m.param)
        if key is None or not wanted((key, m.axis)):
            continue
        line = root[np.asarray(m.ids, dtype=np.int64)]
        ax = (key, m.axis)
        if line.ndim != 1:
            raise Unroutable(f"parameter {key} reads the channels in blocks (a grouped "
                             "convolution), which routes do not describe")
        if ax in lines and not np.array_equal(lines[ax], line):
            raise Unroutable(f"parameter {key} is used on different channels")
        lines[ax] = line
    return lines


def routing(lines: Lines) -> Routing:
    """Classes, routes and per-axis class indices of `lines`."""
    classes = np.unique(np.concatenate([line for line in lines.values()]))
    idx = {ax: np.searchsorted(classes, line) for ax, line in lines.items()}
    parts: List[List[Tuple[AxisKey, int]]] = [[] for _ in classes]
    for ax in sorted(idx):
        cs, counts = np.unique(idx[ax], return_counts=True)
        for c, n in zip(cs.tolist(), counts.tolist()):
            parts[c].append((ax, n))
    return Routing(classes, tuple(tuple(p) for p in parts), idx)


class Refusal(str):
    """Why a width does not prune exactly. `other_widths_may_fit` is False when the forward
    itself failed or differed from masking (sizes written into the code): no width will do."""

    other_widths_may_fit: bool = False


class _Shortage(Refusal):
    """The width's routes do not fit the original's (another width may)."""

    other_widths_may_fit = True


@dataclass(frozen=True)
class _Width:
    """The pruned network at one width: channels per route, and per parameter axis the
    (route, rank inside the route, occurrence) of the channel at each position."""

    counts: Dict[Route, int]
    order: Dict[AxisKey, List[Tuple[Route, int, int]]]


def _width_table(copy_routing: Routing) -> _Width:
    rank: Dict[int, int] = {}
    counts: Dict[Route, int] = {}
    for c, r in enumerate(copy_routing.routes):
        rank[c] = counts.get(r, 0)
        counts[r] = rank[c] + 1
    order: Dict[AxisKey, List[Tuple[Route, int, int]]] = {}
    for ax, line in copy_routing.lines.items():
        seen: Dict[int, int] = {}
        entries = []
        for c in line.tolist():
            entries.append((copy_routing.routes[c], rank[c], seen.get(c, 0)))
            seen[c] = seen.get(c, 0) + 1
        order[ax] = entries
    return _Width(counts, order)


WidthCache = Dict[int, Union[_Width, Refusal]]  # width -> its table, or why it does not prune


class RoutedGroup:
    """A group whose channels shuffles route differently at each width.

    Every producer keeps the same number of channels (`width`); the pruned network at that width
    is a pruned copy, traced to read which route each of its positions carries. A channel set
    fits when it holds, per route, exactly the channels the copy's routes ask for; the pruned
    tensors then hold the kept channels in the copy's order, so every parameter axis is sliced
    in that order (not sorted).

    Args:
        name: the group's name (for messages).
        lines: untied class per position of every parameter axis holding the group.
        producers: the producers' output axes, in group order.
        probe: traces and trial-prunes copies of the network (`CopyProbe`).
        known: widths measured on an earlier trace of the same unchanged network (filled in
            as new widths are measured).

    Raises:
        Unroutable: the producers do not each mint their own, equally many channels.
    """

    def __init__(self, name: str, lines: Lines, producers: Sequence[AxisKey],
                 probe: CopyProbe, known: Optional[WidthCache] = None) -> None:
        self.name = name
        self.base = routing(lines)
        self.probe = probe
        self.producers = tuple(producers)
        self.labels = self._producer_labels()
        self.width = int((self.labels == 0).sum())  # channels per producer
        self.positions = {ax: {c: np.flatnonzero(line == c).tolist() for c in np.unique(line)}
                          for ax, line in self.base.lines.items()}
        # what each width gave; `known` (shared with earlier traces of the same, unchanged
        # network) saves tracing its copies again
        self._widths: WidthCache = known if known is not None else {}
        self._widths.setdefault(self.width, _width_table(self.base))

    @property
    def channels(self) -> int:
        return len(self.base.classes)

    def _producer_labels(self) -> np.ndarray:
        labels = np.full(self.channels, -1, dtype=np.int64)
        for k, ax in enumerate(self.producers):
            line = self.base.lines.get(ax)
            if line is None or len(np.unique(line)) != len(line):
                raise Unroutable(f"producer {ax[0]} does not mint one channel per filter")
            if (labels[line] >= 0).any():
                raise Unroutable("an add joins channels of several producers")
            labels[line] = k
        if (labels < 0).any():
            raise Unroutable("some channels come from no conv or linear layer")
        sizes = np.bincount(labels)
        if len(set(sizes.tolist())) != 1:
            raise Unroutable(f"its producers make different channel counts {sizes.tolist()}, "
                             "so no common width fits them")
        return labels

    # -- widths ----------------------------------------------------------------------------
    def feasible(self, width: int) -> bool:
        """Whether every producer keeping `width` channels prunes exactly (computed once)."""
        return isinstance(self._table(width), _Width)

    def why_not(self, width: int) -> Refusal:
        """Why a width does not prune exactly ('' when it does)."""
        t = self._table(width)
        return t if isinstance(t, Refusal) else Refusal("")

    def nearest(self, width: int) -> int:
        """The feasible width closest to `width` (the smaller one on a tie); the full width
        always is one."""
        width = min(max(int(width), 1), self.width)
        for d in range(self.width):
            for w in (width - d, width + d):
                if 1 <= w <= self.width and self.feasible(w):
                    return w
        return self.width

    def _table(self, width: int) -> Union[_Width, Refusal]:
        if width not in self._widths:
            if not 1 <= width <= self.width:
                raise ValueError(f"group {self.name!r} has {self.width} channels per producer; "
                                 f"width {width} is outside 1..{self.width}")
            self._widths[width] = self._measure(width)
        return self._widths[width]

    def _measure(self, width: int) -> Union[_Width, Refusal]:
        """Prune a copy to `width`, trace it and compare its routes with the original's; then
        prune a copy in the routes' order and check it against masking."""
        keep: Slices = {}
        for (key, axis), line in self.base.lines.items():
            size = len(line) * width
            if size % self.width:
                return _Shortage(f"axis {axis} of {key} would hold {size / self.width:g} "
                                 "channels")
            keep.setdefault(key, {})[axis] = list(range(size // self.width))
        try:
            st, key_of, pruned = self.probe.trace(keep)
            lines = group_lines(st.members, key_of, st.uf.root_table(untied=True),
                                lambda ax: ax in self.base.lines)
        except Unroutable as e:
            return Refusal(f"the copy at width {width}: {e}")
        except Exception as e:  # the forward could not run at this width
            logger.debug("group %s: the copy at width %d failed", self.name, width,
                         exc_info=True)
            detail = str(e).strip().splitlines()
            return Refusal(f"the copy at width {width} failed: {type(e).__name__}: "
                           f"{detail[-1] if detail else ''}")
        if set(lines) != set(self.base.lines):
            return Refusal(f"the copy at width {width} uses other parameter axes")
        leak = _leak(st, key_of, lines)
        if leak:
            return _Shortage(f"at width {width} {leak}")
        table = _width_table(routing(lines))
        have = {r: len(cs) for r, cs in self.base.by_route().items()}
        if any(n > have.get(r, 0) for r, n in table.counts.items()):
            return _Shortage(f"at width {width} some routes need more channels than the "
                             "original holds")
        first = self._pick(table, np.zeros(self.channels))
        failure = self.probe.trial(*self._slices(first, table), pruned)
        if failure is not None:
            return Refusal(f"pruning a copy to width {width} did not reproduce masking "
                           f"({failure})")
        return table

    # -- channels --------------------------------------------------------------------------
    def select(self, scores: np.ndarray, width: int) -> np.ndarray:
        """The channels (sorted) kept at a feasible `width`: per route, the highest scores.

        Raises:
            ValueError: `width` does not prune exactly (see `nearest`).
        """
        table = self._table(width)
        if isinstance(table, Refusal):
            raise ValueError(f"group {self.name!r} cannot keep {width} channels per producer: "
                             f"{table}; use nearest() for a width that prunes exactly")
        return self._pick(table, scores)

    def _pick(self, table: _Width, scores: np.ndarray) -> np.ndarray:
        by_route = self.base.by_route()
        kept: List[int] = []
        for r, n in table.counts.items():
            cs = np.asarray(by_route[r])
            kept.extend(cs[np.argsort(-scores[cs], kind="stable")[:n]].tolist())
        return np.sort(np.asarray(kept, dtype=np.int64))

    def check(self, kept: np.ndarray) -> _Width:
        """The width table `kept` fits.

        Raises:
            ValueError: channels repeated or out of range, producers keeping different counts,
                or channels that do not follow the routes.
        """
        kept = np.asarray(kept, dtype=np.int64)
        if len(np.unique(kept)) != len(kept) or ((kept < 0) | (kept >= self.channels)).any():
            raise ValueError(f"group {self.name!r}: kept channels must be distinct indices in "
                             f"0..{self.channels - 1}, got {kept.tolist()}")
        per = np.bincount(self.labels[kept], minlength=len(self.producers))
        if len(set(per.tolist())) != 1 or per[0] == 0:
            raise ValueError(f"group {self.name!r}: every producer must keep the same number of "
                             f"channels (>= 1), got {per.tolist()}; choose channels with "
                             "FilterPruner.select")
        table = self._table(int(per[0]))
        if isinstance(table, Refusal):
            raise ValueError(f"group {self.name!r} cannot keep {per[0]} channels per producer: "
                             f"{table}")
        got: Dict[Route, int] = {}
        for c in np.asarray(kept).tolist():
            got[self.base.routes[c]] = got.get(self.base.routes[c], 0) + 1
        if got != table.counts:
            raise ValueError(f"group {self.name!r}: the kept channels do not follow the routes "
                             f"the pruned network gives its {per[0]} channels per producer; "
                             "choose channels with FilterPruner.select")
        return table

    def slices(self, kept: np.ndarray) -> Tuple[Slices, Slices]:
        """Kept positions (in the pruned network's order) and removed positions per parameter
        and axis.

        Raises:
            ValueError: `kept` does not fit the routes (see `check`).
        """
        return self._slices(kept, self.check(kept))

    def _slices(self, kept: np.ndarray, table: _Width) -> Tuple[Slices, Slices]:
        by_route: Dict[Route, List[int]] = {}
        for c in np.sort(np.asarray(kept, dtype=np.int64)).tolist():
            by_route.setdefault(self.base.routes[c], []).append(c)
        keep: Slices = {}
        drop: Slices = {}
        for (key, axis), entries in table.order.items():
            pos = self.positions[(key, axis)]
            order = [pos[by_route[r][rank]][occ] for r, rank, occ in entries]
            keep.setdefault(key, {})[axis] = order
            gone = set(range(len(self.base.lines[(key, axis)]))) - set(order)
            drop.setdefault(key, {})[axis] = sorted(gone)
        return keep, drop


def _leak(st: TraceState, key_of: Mapping[str, str], lines: Lines) -> str:
    """Why the copy's group channels reach something outside the group ('' if they do not):
    another parameter axis, or channels that are never pruned (an output, an unknown op)."""
    root = st.uf.root_table(untied=True)
    classes = np.unique(np.concatenate(list(lines.values())))
    for m in st.members:
        key = key_of.get(m.param)
        if key is not None and (key, m.axis) not in lines \
                and np.isin(root[np.asarray(m.ids, dtype=np.int64)], classes).any():
            return f"the channels also reach parameter {key}"
    for ids, why in st.blocks:
        if np.isin(root[ids], classes).any():
            return f"some channels are blocked: {why}"
    return ""
