"""FilterPruner: the engine's front door. Traces a network, scores channels, masks or prunes them.

It ties the graph (which channels are coupled), importance (which to drop), planning (how many)
and surgery (how to drop them) together, and records each plan it applies in the network's plan
ledger (`plan.record_plan`). It never swaps optimizers, saves files or talks to paddle.Model;
callbacks and `io` do that.
"""
from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn

from .layers.flops import count_params
from .graph.channels import ChannelGraph, Group
from .graph.selection import kept_slices
from .planning.importance import Criterion, Source, get_criterion
from .planning.plans import GroupPlan, PrunePlan, record_plan
from .planning.allocation import (PlanGroup, auto_strategy, check_fraction, check_reachable, n_keep,
                                  plan_group_ratios)
from .sensitivity import DEFAULT_RATIOS, EvalData, SensitivityResult, analyse, top1_metric
from .sensitivity.fingerprint import network_signature
from .layers.surgery import Mask, apply_slices, supports_layer
from .utils.errors import check_names, tagged
from .deploy.kernels import AUTO, Runtime, check_runtime, resolve_round_to
from .planning.latency_allocation import LatencyTable, plan_latency_widths, predict_share, trade_for_latency

logger = logging.getLogger(__name__)

Kept = Dict[int, np.ndarray]  # group index -> sorted kept channel indices
Names = Union[str, Sequence[str]]  # group names, or one name
Sensitivities = Union[SensitivityResult, str, "os.PathLike[str]", Mapping[str, Mapping[float, float]]]
RoundTo = Union[int, str]  # an int >= 1, or "auto": the runtime's channel multiple (deploy.kernels)
AUTO_SLACK = 0.005  # round_to="auto" plans land within this of a FLOPs target (else a finer multiple)


def _validate_shape(input_shape: Any) -> Tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"input_shape must be a list of ints such as [1, 3, 32, 32], got {input_shape!r}")
    if len(input_shape) < 2 or not all(isinstance(s, (int, np.integer)) and s > 0
                                       for s in input_shape):
        raise ValueError(
            f"input_shape must hold positive ints, batch first, such as [1, 3, 32, 32]; "
            f"got {list(input_shape)!r}")
    return tuple(int(s) for s in input_shape)


class FilterPruner:
    """Structured filter pruning of any Paddle CNN.

    Args:
        net: the network to prune (a `paddle.nn.Layer`, or a `paddle.DataParallel` around one).
        input_shape: the shape of one input, batch first, e.g. [1, 3, 32, 32].
        criterion: channel importance: "l1" (default), "l2", "fpgm", "bn_scale", "random", or a
            registered name (see `prune_callbacks.register_criterion`).
        train_inputs: what the network's forward is called with on a training step, targets
            included (a tensor, a tuple/list of the positional arguments, or a callable returning
            one, called at each trace): the training graph is traced from it, so layers that run
            only in training (a detector's loss head, an OCR recogniser's training-only decoder)
            keep the channels they read. Without it, a training forward that cannot be traced
            from `input_shape` alone is left out, and groups that may feed layers the eval
            forward never runs are held whole (with a warning). The callbacks pass what `fit`
            really calls the network with.
        layer_norm_widths: channels a LayerNorm normalises (a transformer's embedding width)
            are prunable: LayerNorm's weight and bias are sliced and its statistics taken over
            the kept channels; masks renormalise the same way (`graph.norms`). False keeps them
            whole (`Group.reason` says so).
        runtime: where the pruned network will be served ("paddle_inference", "onnxruntime", or
            a GPU runtime, see `deploy.kernels.Runtime`): planning's default `round_to="auto"`
            keeps channel counts in the multiples its kernels need on this machine.
        statistics: an `ImportanceStats` that watched training steps, for the data-driven
            criteria "taylor" and "activation" (FilterPruneCallback passes its own); "group_l2"
            scores all of a group's parameters.

    Raises:
        TypeError: `net` is not a Layer or `input_shape` not a list of ints.
        ValueError: `input_shape` does not fit the network, or an unknown criterion.

    Examples:
        >>> pruner = FilterPruner(net, [1, 3, 32, 32])
        >>> [g.name for g in pruner.groups if g.prunable]
        >>> plan = pruner.prune({"conv1.0": 0.3})
        >>> plan.pruned_flops
    """

    def __init__(self, net: nn.Layer, input_shape: Sequence[int] = (1, 3, 32, 32),
                 criterion: Union[str, Criterion] = "l1", train_inputs: Any = None,
                 layer_norm_widths: bool = True,
                 runtime: Union[str, Runtime] = Runtime.PADDLE_INFERENCE,
                 statistics: Any = None) -> None:
        if isinstance(net, paddle.DataParallel):
            net = net._layers
        if not isinstance(net, nn.Layer):
            raise TypeError(f"net must be a paddle.nn.Layer, got {type(net).__name__}")
        self.net = net
        self.input_shape = _validate_shape(input_shape)
        self.criterion = get_criterion(criterion)
        self.train_inputs = train_inputs
        self.layer_norm_widths = bool(layer_norm_widths)
        self.runtime = check_runtime(runtime)
        # training statistics (training.data_importance.ImportanceStats) for data-driven criteria
        self.statistics = statistics
        self._graph: Optional[ChannelGraph] = None
        self._param_map: Optional[Dict[str, Any]] = None
        self._traced_as: Optional[Tuple[Any, ...]] = None
        self._trace()
        self._sensitivity: Optional[SensitivityResult] = None

    # -- graph ----------------------------------------------------------------------------
    def _structure(self) -> Tuple[Any, ...]:
        """A cheap signature of what the trace depends on: the sublayers (by identity) and every
        parameter's structured name and shape. Pruning, surgery or a replaced layer change it."""
        return (tuple(id(layer) for layer in self.net.sublayers()),
                tuple((key, tuple(p.shape)) for key, p in self.net.named_parameters()))

    def _trace(self) -> ChannelGraph:
        # No eager pass to check the shape: it cost as much as the trace, which reports shape
        # errors itself (PIR shape inference, plus the tracer's channel checks).
        self._param_map = None
        self._traced_as = self._structure()
        try:
            self._graph = ChannelGraph(self.net, self.input_shape, supports_layer,
                                       train_inputs=self.train_inputs,
                                       layer_norm_widths=self.layer_norm_widths)
        except (ValueError, RuntimeError) as e:  # paddle reports shape errors as these
            first = str(e).strip().splitlines()
            detail = next((ln for ln in reversed(first) if "Error" in ln or "Invalid" in ln),
                          first[-1] if first else "")
            raise ValueError(
                f"input_shape {list(self.input_shape)} does not fit the network: {detail.strip()} "
                "-- pass the shape of one input batch, e.g. [1, 3, 32, 32]") from e
        return self._graph

    @property
    def graph(self) -> ChannelGraph:
        """The traced channel graph of the network as it is now.

        The network is traced again whenever it changed since the last trace (another pruner, a
        callback or a hand edit pruned or replaced layers): plans never rest on stale channel
        counts.
        """
        if self._graph is None or self._structure() != self._traced_as:
            if self._graph is not None:
                logger.info("the network changed since it was traced (pruned or edited): tracing "
                            "it again")
            return self._trace()
        return self._graph

    @property
    def groups(self) -> List[Group]:
        """Every group of coupled channels, prunable or not, in network order."""
        return self.graph.groups

    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    def group_index(self, name: str) -> int:
        """Index of the group called `name` (a layer path, or a Paddle parameter name such as
        `conv2d_26.w_0` of any layer producing the group's channels).

        Raises:
            ValueError: no such group; close matches are suggested.
        """
        if not isinstance(name, str):
            raise TypeError(f"group names are strings, got {name!r}")
        aliases = self._aliases()
        if name in aliases:
            return aliases[name]
        close = difflib.get_close_matches(name, list(aliases), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown group {name!r}{hint} (see FilterPruner.groups for the names)")

    def _aliases(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        graph = self.graph
        by_key = graph.paddle_names()
        for i, g in enumerate(graph.groups):
            out.setdefault(g.name, i)
            if g.param_name:
                out.setdefault(g.param_name, i)
            for key, _ in g.producers:
                out.setdefault(key.rpartition(".")[0], i)
                if key in by_key:
                    out.setdefault(by_key[key], i)
        return out

    # -- selection ------------------------------------------------------------------------
    def _params(self) -> Dict[str, Any]:
        """state_dict key -> Parameter; surgery keeps the objects, so this is built once."""
        if self._param_map is None:
            self._param_map = dict(self.net.named_parameters())
        return self._param_map

    def importance(self, group: Union[str, int]) -> np.ndarray:
        """Score of each channel of a group (higher = more important)."""
        gi = group if isinstance(group, int) else self.group_index(group)
        g = self.groups[gi]
        params = self._params()
        pa_map = self.graph.param_axes
        sources = g.producers
        crit = self.criterion
        if crit.source is Source.NORM:
            sources = tuple((k, 0) for k in g.norms)
            if not sources and crit.statistic is not None:  # the producers' own statistic
                sources = g.producers
            elif not sources:
                logger.warning("group %s has no normalisation scale; %s falls back to l1",
                               g.name, crit.name)
                return self._score(g, gi, g.producers, lambda key: params[key].numpy(), pa_map,
                                   get_criterion("l1"))
        elif crit.source is Source.GROUP:
            sources = tuple(ka for ka, pa in pa_map.items()
                            if ka[0] in params and not params[ka[0]].stop_gradient
                            and (pa.group == gi).any())  # trained ones: not running statistics
        tensor_of = (lambda key: params[key].numpy()) if crit.statistic is None else \
            self._statistic_of(crit)
        return self._score(g, gi, sources, tensor_of, pa_map, crit)

    def _statistic_of(self, crit: Criterion) -> Any:
        if self.statistics is None:
            raise ValueError(
                f"criterion {crit.name!r} scores {crit.statistic!r} statistics of training steps: "
                f"use it from FilterPruneCallback (it gathers them during its pruning epoch), or "
                f"pass FilterPruner(..., statistics=ImportanceStats(net, [{crit.statistic!r}]))")
        return lambda key: self.statistics.tensor(crit.statistic, key)

    @staticmethod
    def _score(g: Group, gi: int, sources: Iterable[Tuple[str, int]], tensor_of: Any,
               pa_map: Dict[Tuple[str, int], Any], crit: Criterion) -> np.ndarray:
        scores = np.zeros(g.channels, dtype=np.float64)
        for key, axis in sources:
            pa = pa_map[(key, axis)]
            w = tensor_of(key)
            if pa.blocks > 1 and w.ndim > 1:  # a grouped conv's input axis: scored per block
                w = w.reshape((pa.blocks, w.shape[0] // pa.blocks) + w.shape[1:])
                s = np.concatenate([crit.score(b, axis) for b in w])
            else:
                s = crit.score(w, axis)
            sel = pa.group.ravel() == gi
            np.add.at(scores, pa.channel.ravel()[sel], s[sel])
        return crit.combine(scores) if crit.combine is not None else scores

    def select(self, ratios: Mapping[str, float], round_to: RoundTo = 1) -> Kept:
        """Channels each named group keeps when it loses `ratio` of its least important ones.

        Rounding (PaddleSlim's): round(ratio * channels) go, to nearest, at least one stays
        (`planning.n_keep`), and with `round_to=N` the kept count is rounded up to a multiple
        of N. Groups feeding grouped convolutions lose the same
        number of channels in every block (round_to does not apply to them). Groups that
        channel shuffles route (`graph.routed`, ShuffleNetV2 stages) keep, per producer, the
        width nearest to the ratio's that prunes exactly, and per route their best channels.
        """
        round_to = resolve_round_to(round_to, self.runtime, log=False)
        if not isinstance(ratios, Mapping):
            raise TypeError(f"ratios must map group names to floats, got {type(ratios).__name__}")
        kept: Kept = {}
        for name, ratio in ratios.items():
            gi = self.group_index(name)
            g = self.groups[gi]
            if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, numbers.Real) \
                    or not 0.0 <= float(ratio) < 1.0:
                raise ValueError(f"ratio for {name!r} must be in [0, 1), got {ratio!r}")
            if not g.prunable:
                raise ValueError(f"group {g.name!r} cannot be pruned: {g.reason}")
            routed = self.graph.routed.get(gi)
            if routed is not None:  # the nearest width the pruned network's shuffles allow
                width = routed.nearest(n_keep(routed.width, float(ratio)))
                kept[gi] = routed.select(self.importance(gi), width)
            else:
                kept[gi] = self._keep(g, self.importance(gi), float(ratio), round_to)
        return kept

    @staticmethod
    def _keep(g: Group, scores: np.ndarray, ratio: float, round_to: int) -> np.ndarray:
        def keep_in(idx: np.ndarray, rounding: int) -> np.ndarray:
            order = np.argsort(-scores[idx], kind="stable")
            return idx[order[:n_keep(len(idx), ratio, rounding)]]

        if g.partition is None:
            return np.sort(keep_in(np.arange(g.channels), round_to))
        parts = [keep_in(np.flatnonzero(g.partition == b), 1)
                 for b in np.unique(g.partition)]
        return np.sort(np.concatenate(parts))

    def slices(self, kept: Kept) -> Tuple[Dict[str, Dict[int, Any]], Dict[str, Dict[int, Any]]]:
        """Per parameter and axis, the indices kept and the indices removed."""
        return kept_slices(self.graph, kept)

    # -- actions --------------------------------------------------------------------------
    def mask(self, ratios: Mapping[str, float], round_to: int = 1) -> Mask:
        """Zero the channels `prune(ratios)` would remove, at every coupled layer; reversible.

        Use as a context manager (`with pruner.mask({...}): ...`) or call `.restore()`.
        """
        _, drop = self.slices(self.select(ratios, round_to))
        return Mask(self.net, drop)

    def prune(self, ratios: Mapping[str, float], round_to: int = 1) -> PrunePlan:
        """Physically remove the least important `ratio` of the channels of each named group.

        Returns:
            The PrunePlan: kept/removed channels per group, FLOPs and params before and after.

        Raises:
            ValueError: unknown group (close matches suggested), ratio outside [0, 1), or a
                group that cannot be pruned.
        """
        kept = self.select(ratios, round_to)
        return self.apply(kept)

    def apply(self, kept: Kept) -> PrunePlan:
        """Prune to an explicit selection (group index -> kept channels)."""
        groups = self.groups
        # from channel counts: equal to count_flops on every zoo model (tests), no forward passes
        flops_before = self.graph.flops({})
        flops_after = self.graph.flops({gi: len(k) for gi, k in kept.items()})
        params_before = count_params(self.net)
        keep_sl, _ = self.slices(kept)
        gplans = []
        for gi, k in sorted(kept.items()):
            g = groups[gi]
            removed = sorted(set(range(g.channels)) - set(int(i) for i in k))
            gplans.append(GroupPlan(g.name, g.channels, tuple(int(i) for i in k), tuple(removed)))
        apply_slices(self.net, keep_sl)
        self._graph = None  # channel layout changed: trace again on next use
        plan = PrunePlan(
            groups=tuple(gplans), flops_before=flops_before,
            flops_after=flops_after,
            params_before=params_before, params_after=count_params(self.net),
            input_shape=self.input_shape, criterion=self.criterion.name,
            param_slices={k: {ax: tuple(map(_tuplify, v)) if _nested(v) else tuple(v)
                              for ax, v in axes.items()} for k, axes in keep_sl.items()},
        )
        record_plan(self.net, plan)  # the plan ledger: save_pruned(net, ...) finds it there
        logger.info("pruned %d groups: FLOPs %d -> %d (-%.2f%%)", len(gplans), plan.flops_before,
                    plan.flops_after, 100 * plan.pruned_flops)
        return plan

    # -- sensitivity and planning ----------------------------------------------------------
    def sensitivity(self, eval_fn: Any, ratios: Sequence[float] = DEFAULT_RATIOS,
                    path: Optional[str] = None, skip: Sequence[str] = (),
                    max_loss: Optional[float] = None, metric: Optional[Callable] = None,
                    batch_size: int = 64, num_samples: Optional[int] = None,
                    cache: bool = True) -> SensitivityResult:
        """Sensitivity of every prunable group (see `prune_callbacks.sensitivity.analyse`).

        Args:
            eval_fn: `eval_fn() -> float` (higher is better), or a dataset of (input, label)
                samples evaluated with `metric` (default top-1 accuracy), batched by the engine,
                which then replays each group's unaffected prefix from a cache.
            ratios, path, skip, max_loss, cache: see `analyse`.
            metric: `metric(logits, labels) -> (correct, count)` for a dataset.
            batch_size, num_samples: batching of a dataset.
        """
        if callable(eval_fn) and not hasattr(eval_fn, "__getitem__"):
            evaluate: Any = eval_fn
        elif isinstance(eval_fn, EvalData):
            evaluate = eval_fn
        elif hasattr(eval_fn, "__getitem__") and hasattr(eval_fn, "__len__"):
            evaluate = EvalData(eval_fn, metric or top1_metric, batch_size, num_samples)
        else:
            raise TypeError(
                "eval_fn must be a callable returning a float, or a dataset of (input, label) "
                f"samples; got {type(eval_fn).__name__}")
        result = analyse(self, evaluate, ratios, path, check_names("skip", skip), max_loss, cache)
        self._sensitivity = result
        return result

    def sensitive(self, eval_func: Optional[Callable[[], float]] = None,
                  sen_file: Optional[str] = None, pruned_params: Optional[Sequence[str]] = None,
                  skip_vars: Sequence[str] = ()) -> Dict[str, Dict[float, float]]:
        """PaddleSlim's `sensitive()`: with no arguments, the last analysis as
        `{group: {ratio: loss}}`; with `eval_func`, run (or resume from `sen_file`) the analysis."""
        if eval_func is None:
            if self._sensitivity is None and sen_file and os.path.exists(sen_file):
                self._sensitivity = SensitivityResult.load(sen_file)
            return self._sensitivity.curves() if self._sensitivity is not None else {}
        skip = list(skip_vars)
        if pruned_params is not None:
            keep = {self.group_index(p) for p in pruned_params}
            skip += [g.name for i, g in enumerate(self.groups) if g.prunable and i not in keep]
        return self.sensitivity(eval_func, path=sen_file, skip=skip).curves()

    def plan(self, flops: float, sensitivities: Optional[Sensitivities] = None,
             skip: Names = (), strategy: Optional[str] = None, round_to: RoundTo = AUTO,
             latency_table: Optional[LatencyTable] = None) -> Kept:
        """Channels each group keeps so that the network loses `flops` of its FLOPs.

        Describes the groups to `planning.plan_group_ratios` (FLOPs from channel counts, through
        the traced graph) and selects the channels of the ratios it returns; with
        `latency_table`, then trades width between groups toward the plan the table predicts
        fastest (`planning.latency_allocation.trade_for_latency`). Prunes nothing.
        The target is relative to the network as it is now (pruned before or not).

        Args:
            flops, sensitivities, skip, strategy, round_to, latency_table: see `prune_to_flops`.

        Returns:
            Group index -> kept channel indices (for `apply`).

        Raises:
            ValueError: see `prune_to_flops`.
        """
        auto = isinstance(round_to, str) and round_to == AUTO
        if auto:  # a bad target is an error now, not a reason to try finer multiples
            check_fraction(flops, "FLOPs target")
        if latency_table is not None:
            self._check_table(latency_table)
        round_to = resolve_round_to(round_to, self.runtime)
        curves = self._curves(sensitivities)
        strategy = auto_strategy(strategy, curves is not None)
        skip_names = [self.groups[self.group_index(s)].name for s in check_names("skip", skip)]
        groups, base = self._plan_groups(), self.graph.flops({})
        while True:
            try:
                ratios = plan_group_ratios(groups, self.graph.flops, curves, flops, skip_names, strategy,
                                           round_to)
            except ValueError:  # beyond reach at this multiple; a finer one may reach it
                if not auto or round_to == 1:
                    raise
            else:
                kept = self.select(ratios, round_to)
                cut = 1.0 - self.graph.flops({gi: len(k) for gi, k in kept.items()}) / base
                if not auto or round_to == 1 or cut <= float(flops) + AUTO_SLACK:
                    if latency_table is None:
                        return kept
                    return self._trade(kept, latency_table, float(flops), curves, strategy, skip_names, round_to)
            # "auto" keeps the target within AUTO_SLACK: widths too small to round well (a small
            # network's) get a finer multiple instead of a plan far past the target
            logger.info("round_to='auto': multiples of %d do not reach a %.3f FLOPs cut within %.3f; trying "
                        "multiples of %d", round_to, float(flops), AUTO_SLACK, round_to // 2)
            round_to //= 2

    def _check_table(self, table: Any) -> None:
        if not isinstance(table, LatencyTable):
            raise tagged("latency_table", TypeError(
                f"latency_table must be a LatencyTable (deploy.latency_table.measure_latency_table), got "
                f"{type(table).__name__}"))
        here = {g.name: g.channels for g in self.groups}
        for name, n in table.channels.items():
            if here.get(name) != n:
                what = f"{here[name]} channels here" if name in here else "no such group here"
                raise tagged("latency_table", ValueError(
                    f"latency_table was measured on another network or before it was pruned: group {name!r} "
                    f"has {n} channels in the table, {what}; measure it again on the network as it is now"))

    def _trade(self, kept: Kept, table: LatencyTable, flops: float, curves: Any, strategy: str,
               skip: Sequence[str], round_to: int) -> Kept:
        """`kept` with width traded between groups where `table` predicts it faster (same FLOPs cut)."""
        counts = {gi: len(k) for gi, k in kept.items()}
        traded = trade_for_latency(self._plan_groups(), self.graph.flops, table, counts, flops,
                                   curves if strategy == "sensitivity" else None, skip, round_to,
                                   slack=AUTO_SLACK)
        out: Kept = {gi: k for gi, k in kept.items() if traded.get(gi) == len(k)}
        changed = {self.groups[gi].name: (self.groups[gi].channels - w) / self.groups[gi].channels
                   for gi, w in traded.items() if gi not in out}
        out.update(self.select(changed))  # single-block groups: the exact count (round_to 1)
        return out

    def plan_latency(self, target: float, table: LatencyTable, sensitivities: Optional[Sensitivities] = None,
                     skip: Names = (), strategy: Optional[str] = None, max_ratio: float = 0.9) -> Kept:
        """Channels each group keeps so that the predicted latency share is at most `target`.

        Widths come from a measured latency table (`deploy.latency_table.measure_latency_table`):
        only widths where latency drops, sensitivity weighed against time saved
        (`planning.latency_allocation.plan_latency_widths`). Prunes nothing.

        Args:
            target: latency share in (0, 1), predicted by the table.
            table: the LatencyTable measured on this network as it is now.
            sensitivities, skip, strategy: as for `plan` ("uniform": no curves).
            max_ratio: the largest share of a group's channels removed.

        Raises:
            ValueError: a bad target, one the table cannot reach, or an unknown skip name.
        """
        curves = self._curves(sensitivities)
        if auto_strategy(strategy, curves is not None) == "uniform":
            curves = None
        skip_names = [self.groups[self.group_index(s)].name for s in check_names("skip", skip)]
        widths = plan_latency_widths(self._plan_groups(), table, target, curves, skip_names, max_ratio,
                                     flops_fn=self.graph.flops)
        channels = {g.name: g.channels for g in self.groups}
        return self.select({name: (channels[name] - w) / channels[name] for name, w in widths.items()})

    def latency_share(self, table: LatencyTable, kept: Kept, interpolate: bool = False) -> float:
        """The latency share `table` predicts for `kept` (as `plan_latency` predicts it; with
        `interpolate`, as `plan(..., latency_table=)` does)."""
        widths = {self.groups[gi].name: len(k) for gi, k in kept.items() if len(k) < self.groups[gi].channels}
        return predict_share(table, widths, self._plan_groups(), self.graph.flops, interpolate=interpolate)

    def check_target(self, flops: float, skip: Names = (), strategy: Optional[str] = None,
                     sensitivities: Optional[Sensitivities] = None,
                     max_ratio: Optional[float] = None, round_to: RoundTo = AUTO) -> None:
        """Raise now if `plan(flops, ...)` could not reach `flops`, from channel counts alone.

        Args:
            flops, skip, strategy, round_to: as for `plan`.
            sensitivities: the curves, when known already.
            max_ratio: for strategy "sensitivity" before the curves exist: the largest ratio the
                analysis will measure (every group not in `skip` is then assumed to have a curve).

        Raises:
            ValueError: the target is not a fraction, every group is skipped or unprunable, or
                the target exceeds the largest reachable reduction.
        """
        # "auto" falls back to finer multiples down to 1 when a coarse one cannot reach (see plan)
        round_to = 1 if round_to == AUTO else resolve_round_to(round_to, self.runtime, log=False)
        curves = self._curves(sensitivities)
        if curves is None and max_ratio is not None:
            curves = {g.name: {float(max_ratio): 0.0} for g in self.prunable_groups}
        strategy = auto_strategy(strategy, curves is not None)
        skip_names = [self.groups[self.group_index(s)].name for s in check_names("skip", skip)]
        check_reachable(self._plan_groups(), self.graph.flops, flops, skip_names, strategy,
                        curves, round_to)

    def _plan_groups(self) -> List[PlanGroup]:
        routed = self.graph.routed
        return [PlanGroup(g.name, g.channels, _units(g), g.prunable,
                          routed[i].nearest if i in routed else None)
                for i, g in enumerate(self.groups)]

    def _curves(self, sens: Optional[Sensitivities]) -> Optional[Dict[str, Dict[float, float]]]:
        """`{group: {ratio: loss}}` from a SensitivityResult (checked to fit this network and
        criterion), its file, or a plain mapping (PaddleSlim's format, taken as it is)."""
        if sens is None:
            return None
        if isinstance(sens, (str, os.PathLike)):
            sens = SensitivityResult.load(os.fspath(sens))
        if isinstance(sens, SensitivityResult):
            self.check_sensitivity(sens)
            return sens.curves()
        if isinstance(sens, Mapping):  # keys may be PaddleSlim parameter names: group aliases
            return {self.groups[self.group_index(g)].name:
                    {float(r): l for r, l in pts.items()} if isinstance(pts, Mapping) else pts
                    for g, pts in sens.items()}
        raise TypeError(f"sensitivities must be a SensitivityResult, the path of its file, or a "
                        f"{{group: {{ratio: loss}}}} mapping; got {type(sens).__name__}")

    def check_sensitivity(self, sens: SensitivityResult, where: str = "the sensitivity result") -> None:
        """Raise unless `sens` was measured on this network as it is now, with this criterion.

        Raises:
            ValueError: another criterion, another network (the message says what differs), or a
                baseline that is not a finite number (a diverged network).
        """
        if sens.criterion != self.criterion.name:
            raise ValueError(
                f"{where} was measured with criterion {sens.criterion!r}, but this pruner removes "
                f"channels by {self.criterion.name!r}: the curves would describe other channels. "
                f"Use criterion={sens.criterion!r}, or analyse with {self.criterion.name!r}")
        if sens.baseline is None or not math.isfinite(float(sens.baseline)):
            raise ValueError(f"{where} has baseline metric {sens.baseline!r}: the network had "
                             f"diverged when it was analysed; analyse it again")
        sens.check_network(network_signature(self.net, self.groups), where)

    def prune_to_flops(self, flops: float, sensitivities: Optional[Sensitivities] = None,
                       skip: Names = (), strategy: Optional[str] = None,
                       round_to: RoundTo = AUTO, latency_table: Optional[LatencyTable] = None) -> PrunePlan:
        """Prune so that the network loses `flops` of its FLOPs (see `planning.plan_group_ratios`).

        The share is of the network's FLOPs as it is now: pruning twice by 0.2 leaves 0.64 of
        the original FLOPs.

        Args:
            flops: share of FLOPs to remove, in (0, 1) (a Python or numpy number).
            sensitivities: a SensitivityResult (or the path of its JSON file), measured on this
                network as it is now with this pruner's criterion; or a plain
                `{group: {ratio: loss}}` mapping (PaddleSlim's `sensitive()` format), taken as
                it is. Defaults to the last analysis run by this pruner.
            skip: group names (a list, or one name as a str) left untouched.
            strategy: "sensitivity" (less sensitive groups lose more), "uniform", or None
                (default): "sensitivity" when there are curves, else "uniform".
            round_to: keep channel counts multiples of this; "auto" (default): the multiple the
                runtime's kernels need on this machine (`deploy.kernels.channel_multiple`, logged),
                halved (logged) while the plan would overshoot the target by more than half a
                point (widths too small to round well); 1: exact counts. A group no wider than
                the multiple rounds to a smaller power of two (`planning.fit_multiple`); no group
                is rounded wider than it is or to zero channels.
            latency_table: a LatencyTable measured on this network as it is now
                (`deploy.latency_table.measure_latency_table`, on the runtime it will be served by,
                at the same multiple): among plans that meet the same FLOPs target (within half a
                point), take one the table predicts faster, by trading width between groups (no
                group cut to a loss above the plan's most-cut group; see
                `planning.latency_allocation.trade_for_latency`). None (default): the FLOPs plan.

        Raises:
            ValueError: see `planning.plan_group_ratios`; an unknown group in `skip`; curves
                measured with another criterion or on another network, or holding NaN; a
                `latency_table` measured on another network.
            TypeError: `sensitivities` or `latency_table` of another type.
        """
        sens = sensitivities if sensitivities is not None else self._sensitivity
        return self.apply(self.plan(flops, sens, skip, strategy, round_to, latency_table))

    def sensitive_prune(self, pruned_flops: float, skip_vars: Sequence[str] = (),
                        align: Optional[int] = None) -> PrunePlan:
        """PaddleSlim's `sensitive_prune(0.4, skip_vars=[...])`, on the last analysis."""
        return self.prune_to_flops(pruned_flops, skip=skip_vars, strategy="sensitivity",
                                   round_to=align or 1)

    # -- FLOPs ---------------------------------------------------------------------------
    def flops(self, ratios: Optional[Mapping[str, float]] = None, round_to: int = 1) -> int:
        """MACs the network would have after `prune(ratios)`, computed without pruning."""
        counts = {gi: len(k) for gi, k in self.select(ratios or {}, round_to).items()}
        return self.graph.flops(counts)


def _units(group: Group) -> Tuple[int, ...]:
    """Block sizes of a group that feeds grouped convolutions; () for one free block."""
    if group.partition is None:
        return ()
    return tuple(int((group.partition == b).sum()) for b in np.unique(group.partition))


def _nested(v: Any) -> bool:
    return len(v) > 0 and isinstance(v[0], (list, tuple))


def _tuplify(v: Any) -> Any:
    return tuple(v)
