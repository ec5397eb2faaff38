"""FilterPruneCallback: prune to a FLOPs target inside `fit`, rebuild the optimizer, go on."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import paddle

from ..utils.errors import about, tagged
from ..training.distributed import all_gather, check_agree, is_main, rebuild_data_parallel
from ..planning.importance import get_criterion
from ..deploy.latency import LatencyOptions, LatencySearch, check_latency_target, plan_for_latency
from ..deploy.kernels import AUTO, check_round_to, check_runtime, latency_backend, resolve_round_to
from ..deploy.latency import LatencyMeter
from ..deploy.latency_table import measure_latency_table, verify_latency_plan
from ..planning.latency_allocation import LatencyTable
from ..training.optim import rebuild_optimizer
from ..training.data_importance import ImportanceStats
from ..planning.plans import PrunePlan, record_plan
from ..planning.allocation import STRATEGIES, auto_strategy, check_fraction
from ..graph.training_graph import LATER
from ..pruner import FilterPruner
from ..sensitivity import SensitivityResult
from ..utils.errors import check_names
from ._common import check_epoch, infer_input_shape
from .train_inputs import stop_watching, training_inputs, watch_training_inputs
from .history import PruneEvent, history_of
from .sensitivity import SensitivityCallback

logger = logging.getLogger(__name__)

SensitivitySource = Union[SensitivityCallback, SensitivityResult, str, "os.PathLike[str]", None]


class FilterPruneCallback(paddle.callbacks.Callback):
    """Prune the lowest-importance filters to remove a share of FLOPs, in the middle of `fit`.

    At the end of epoch `at_epoch`'s training (before fit evaluates that epoch, so the printed
    evaluation shows the pruned network) it plans per-group ratios, prunes the network in place,
    rebuilds the model's optimizer over the new parameters (same class, hyper-parameters,
    LRScheduler object and sliced state), and training continues in the same `fit` call.
    With `steps=k` the target is reached gradually: at epochs at_epoch .. at_epoch+k-1 each
    group's kept channel count moves 1/k of the way to the final plan, which is made once, on
    the first step.

    Pruning more than once: several FilterPruneCallbacks may share one fit (an iterative
    schedule), on the same groups or others. Each one's `flops` is a share of the network's
    FLOPs as it is when that callback makes its first step (two callbacks of 0.2 leave
    0.8 * 0.8 = 64% of the original FLOPs), and each plan's `flops_before` is the network's
    FLOPs at that moment: the pruner re-traces a network that changed since it was traced.

    Before the first training batch (`on_train_begin`) it checks the epochs, the optimizer, the
    input shape, the skip names, the sensitivity source (a file that exists, is a sensitivity
    file, and was made for this network with this criterion) and that the target can be
    reached at all (from channel counts, the largest analysed ratio and the skipped groups).

    Args:
        flops: share of FLOPs (multiply-accumulates, see `count_flops`) to remove, in (0, 1).
        at_epoch: 0-based epoch at whose end pruning (its first step) happens.
        criterion: channel importance: "l1", "l2", "fpgm", "bn_scale", "random" or registered.
        skip: groups (layer paths or Paddle parameter names such as "conv2d_26.w_0") kept whole.
        sensitivity: where the per-group sensitivity curves come from, for strategy
            "sensitivity": a SensitivityCallback in the same fit, a SensitivityResult, or the
            path of a saved analysis.
        strategy: "sensitivity" (less sensitive groups lose more, PaddleSlim's rule),
            "uniform" (the same ratio everywhere), or None (default): "sensitivity" when
            `sensitivity` is given, else "uniform".
        round_to: keep channel counts multiples of this; "auto" (default): the multiple the
            runtime's convolution kernels need on this machine (16 floats with AVX-512, 8 with
            AVX2: `deploy.kernels.channel_multiple`, logged); 1: exact channel counts. Groups no
            wider than the multiple round to a smaller power of two (`planning.fit_multiple`).
        runtime: where the pruned network will be served: "paddle_inference" (CPU, oneDNN) or
            "onnxruntime" (CPU), or the GPU runtimes "paddle_inference_gpu" / "onnxruntime_cuda"
            (rounding only, not run here). Decides `round_to="auto"` and, for a `latency`
            target, the backend it is measured on. None (default): the backend of
            `latency_options` when given, else "paddle_inference".
        steps: number of epochs over which the target is reached.
        input_shape: one input's shape, batch first; default: from the model's input spec.
        layer_norm_widths: let channels a LayerNorm normalises (a transformer's embedding
            width) be pruned, LayerNorm renormalising over the kept ones (default); False keeps
            them whole (`FilterPruner`'s switch of the same name).
        latency_aware: for a `flops` target: measure the per-group latency table on `runtime`
            first (`measure_latency_table`, about four exports per group: 1.5-2.5 minutes for
            MobileNetV1 at 224x224 on a 2-core CPU) and take, among plans meeting the same FLOPs
            target, one the table predicts faster (`FilterPruner.plan(..., latency_table=)`).
            Off by default (see docs/latency.md for what it measured). The table is kept in
            `.table`.

    Raises:
        ValueError / TypeError: at construction for bad arguments, or curves measured with
            another criterion; at `on_train_begin` for everything listed above; from
            `prune_now` once all `steps` steps were made.

    Attributes:
        plans: the PrunePlan of each step, in order (also in `history_of(model).events`).

    Examples:
        >>> model.fit(train_ds, val_ds, epochs=6, callbacks=[
        ...     FilterPruneCallback(flops=0.4, at_epoch=2, strategy="uniform"),
        ...     PrunedModelCheckpoint(save_dir="checkpoints")])  # reload: load_pruned(net, prefix)
    """

    def __init__(self, flops: Optional[float] = None, at_epoch: int = 0, criterion: str = "l1",
                 skip: Sequence[str] = (), sensitivity: SensitivitySource = None,
                 strategy: Optional[str] = None, round_to: Union[int, str] = AUTO, steps: int = 1,
                 input_shape: Optional[Sequence[int]] = None, latency: Optional[float] = None,
                 latency_options: Optional[LatencyOptions] = None, runtime: Optional[str] = None,
                 layer_norm_widths: bool = True, latency_aware: bool = False) -> None:
        super().__init__()
        if flops is not None and latency is not None:
            raise tagged("latency", ValueError(f"give exactly one of flops={flops!r} (a FLOPs cut) and "
                                               f"latency={latency!r} (a share of the measured latency)"))
        if flops is None and latency is None:
            flops = 0.4
        if latency_options is not None and not isinstance(latency_options, LatencyOptions):
            raise tagged("latency_options", TypeError(f"latency_options must be a prune_callbacks.LatencyOptions, "
                            f"got {type(latency_options).__name__}"))
        with about("latency"):
            self.latency = check_latency_target(latency) if latency is not None else None
        with about("runtime"):
            self.runtime, self.latency_options = _runtime_and_options(runtime, latency_options)
            if self.latency is not None or latency_aware is True:
                latency_backend(self.runtime)  # a GPU runtime cannot be measured here: say so now
        if not isinstance(latency_aware, bool):
            raise tagged("latency_aware", TypeError(f"latency_aware must be True or False, got {latency_aware!r}"))
        if latency_aware and latency is not None:
            raise tagged("latency_aware", ValueError(
                "latency_aware=True chooses among plans for a flops target; a latency target plans from the "
                "latency table already: drop latency_aware, or give flops= instead of latency="))
        self.latency_aware = latency_aware
        self.layer_norm_widths = bool(layer_norm_widths)
        if isinstance(sensitivity, SensitivityCallback) and sensitivity.layer_norm_widths != self.layer_norm_widths:
            raise tagged("layer_norm_widths", ValueError(
                f"layer_norm_widths={self.layer_norm_widths} but the SensitivityCallback analyses with "
                f"layer_norm_widths={sensitivity.layer_norm_widths}: give both callbacks the same value"))
        self.search: Optional[LatencySearch] = None  # the latency search's trials, once run
        self.table: Optional[LatencyTable] = None  # the measured latency table (method "table", latency_aware)
        self.flops = check_fraction(flops, "flops") if latency is None else None
        self.at_epoch = check_epoch("at_epoch", at_epoch)
        with about("criterion"):
            get_criterion(criterion)
        self.criterion = criterion
        self.skip = check_names("skip", skip)
        strategy = auto_strategy(strategy, sensitivity is not None)  # None: the curves decide
        if strategy not in STRATEGIES:
            raise tagged("strategy", ValueError(f"strategy must be one of {STRATEGIES} or None (auto), got {strategy!r}"))
        self.strategy = strategy
        if strategy == "sensitivity" and get_criterion(criterion).statistic is not None:
            raise tagged("criterion", ValueError(
                f"criterion {criterion!r} scores statistics of the pruning epoch's training steps, "
                f"which a sensitivity analysis (run before them) cannot use: pass "
                f"strategy='uniform', or a weight criterion (l1, group_l2, ...) for sensitivity"))
        with about("round_to"):
            self.round_to = check_round_to(round_to)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise tagged("steps", ValueError(f"steps must be an int >= 1 (epochs to reach the target), got {steps!r}"))
        self.steps = steps
        with about("sensitivity"):
            _check_source(sensitivity, strategy, criterion)
        self.sensitivity = sensitivity
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.plans: List[PrunePlan] = []
        self._final: Optional[Dict[str, tuple]] = None  # group -> (channels at step 1, final kept)
        self._pruner: Optional[FilterPruner] = None
        self._loaded: Optional[SensitivityResult] = None  # the file of `sensitivity`, read once
        self._stats: Optional[ImportanceStats] = None  # data-driven criteria: this epoch's hooks

    @property
    def epochs(self) -> List[int]:
        """The epochs at whose end a pruning step happens."""
        return list(range(self.at_epoch, self.at_epoch + self.steps))

    # -- fit hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs: Optional[Dict] = None) -> None:
        """Check everything that can be checked before the first batch (see the class doc)."""
        epochs = (self.params or {}).get("epochs")
        last = self.epochs[-1]
        if epochs is not None and last >= epochs and not self.plans:
            raise ValueError(
                f"FilterPruneCallback(at_epoch={self.at_epoch}, steps={self.steps}) prunes at the "
                f"end of epoch {last}, but fit has {epochs} epochs (0..{epochs - 1}); lower "
                f"at_epoch/steps or fit longer")
        if self.model._optimizer is None:
            raise ValueError("the model has no optimizer: call model.prepare(optimizer, loss, ...) "
                             "before fit")
        sens = self.sensitivity
        if isinstance(sens, SensitivityCallback) and sens.at_epoch > self.at_epoch:
            raise ValueError(
                f"the SensitivityCallback runs at epoch {sens.at_epoch}, after pruning at epoch "
                f"{self.at_epoch}: give it at_epoch <= {self.at_epoch}")
        if isinstance(sens, (str, os.PathLike)) and not os.path.exists(sens):
            raise ValueError(f"sensitivity file {os.fspath(sens)!r} does not exist: run a "
                             "SensitivityCallback (or pruner.sensitivity(..., path=...)) first, "
                             "or pass the callback itself")
        if not self.plans:  # trace now: a bad input shape, skip name or target fails before training
            self._pruner = self._new_pruner(later=True)
            if self._pruner.graph.train_failure is not None:  # its training forward needs targets:
                self._pruner = None  # check on the real inputs, before the first step runs
                watch_training_inputs(self.model, self._check_at_first_step,
                                      self.params or None)
            else:
                self._check_plan(self._pruner)
        # the training graph is traced from what fit passes
        watch_training_inputs(self.model, fit=self.params or None)

    def _check_at_first_step(self) -> None:
        self._pruner = self._new_pruner()
        self._check_plan(self._pruner)

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        stop_watching(self.model)

    def _check_plan(self, pruner: FilterPruner) -> None:
        """Skip names, the sensitivity source and the target's reachability, from channel counts."""
        for name in self.skip:
            pruner.group_index(name)
        sens, max_ratio, skip = self.sensitivity, None, list(self.skip)
        if isinstance(sens, (str, os.PathLike)):
            self._loaded = sens = SensitivityResult.load(os.fspath(sens))
            pruner.check_sensitivity(sens, f"sensitivity file {os.fspath(self.sensitivity)!r}")
        elif isinstance(sens, SensitivityResult):
            pruner.check_sensitivity(sens)
        elif isinstance(sens, SensitivityCallback):  # not run yet: its largest ratio and skips
            sens, max_ratio = None, max(self.sensitivity.ratios)
            skip += self.sensitivity.skip
        if self.strategy == "uniform":
            sens = max_ratio = None
        if self.flops is not None:  # a latency target is checked by measuring, when it prunes
            pruner.check_target(self.flops, skip, self.strategy, sens, max_ratio, self.round_to)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict] = None) -> None:
        """A data-driven criterion ("taylor", "activation") watches this epoch's training steps
        when a pruning step ends it: no second pass over the data."""
        statistic = get_criterion(self.criterion).statistic
        if statistic is not None and epoch in self.epochs \
                and len(self.plans) == self.epochs.index(epoch):
            self._stats = ImportanceStats(self.model.network, [statistic],
                                          grad_scale=self._loss_scale)
            self._stats.start()

    def _loss_scale(self) -> float:
        scaler = getattr(self.model, "_scaler", None)  # AMP's GradScaler scales the gradients
        scale = getattr(scaler, "_scale", None)  # None where AMP is off (e.g. on CPU)
        return float(scale) if scale is not None and getattr(scaler, "_enable", True) else 1.0

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        if epoch in self.epochs and len(self.plans) == self.epochs.index(epoch):
            self.prune_now(epoch)

    # -- work ---------------------------------------------------------------------------------
    def prune_now(self, epoch: Optional[int] = None) -> PrunePlan:
        """Run the next pruning step on `self.model` now (fit calls this for you)."""
        step = len(self.plans) + 1
        if step > self.steps:
            raise ValueError(
                f"this FilterPruneCallback made all its {self.steps} pruning step(s) already (see "
                f".plans); to prune again, use another FilterPruneCallback (its target is then a "
                f"share of the network's FLOPs at that moment)")
        stats, self._stats = self._stats, None
        if stats is not None:  # before tracing: its hooks must not see the trace's forwards
            stats.stop()
        pruner = self._pruner or self._new_pruner()
        self._pruner = None
        if stats is not None:
            pruner.statistics = stats
        net = self.model.network
        if step == 1:
            sens = self._sensitivities(epoch)
            table = self._latency_table(pruner) if self.latency_aware and self.latency is None else None

            def plan_for_flops(f: float) -> Dict[int, np.ndarray]:
                # no curves after a sensitivity fallback (SensitivityCallback.fallbacks): uniform
                strategy = self.strategy if sens is not None else "uniform"
                return pruner.plan(f, sens, self.skip, strategy, self.round_to, latency_table=table)

            if self.latency is not None:  # prunes copies to measure; the network itself once, below
                if is_main():  # one measurement decides for every rank (timings differ by rank)
                    self.search = self._latency_plan(pruner, sens, plan_for_flops)
                # the FLOPs cut found; later steps move toward it
                self.flops = all_gather(self.search.flops if self.search else None)[0]
                kept = self.search.kept if self.search else plan_for_flops(self.flops)
            else:
                kept = plan_for_flops(self.flops)
            groups = pruner.groups
            self._final = {groups[gi].name: (groups[gi].channels, len(k))
                           for gi, k in kept.items()}
        if self.steps > 1:
            kept = pruner.select(self._step_ratios(pruner, step))
        # every rank planned on its own copy: differing plans would desynchronise the ranks
        check_agree("pruning plan", {pruner.groups[gi].name: [int(i) for i in k]
                                     for gi, k in sorted(kept.items())})
        for listener in list(history_of(self.model).before_prune):
            listener(self.model)
        plan = pruner.apply(kept)
        self._after_surgery(net, plan)
        target = self.flops * step / self.steps
        self.plans.append(plan)
        history_of(self.model).events.append(PruneEvent(epoch if epoch is not None else -1, step,
                                                        target, plan))
        total = 1.0 - plan.flops_after / self.plans[0].flops_before
        logger.info("pruning step %d/%d at epoch %s: FLOPs %d -> %d, %.2f%% removed in all "
                    "(target %.2f%%)", step, self.steps, epoch, plan.flops_before,
                    plan.flops_after, 100 * total, 100 * target)
        return plan

    def _latency_table(self, pruner: FilterPruner) -> LatencyTable:
        """The latency table on `runtime`, measured by rank 0 and shared (timings differ by rank)."""
        if is_main():
            skip = [pruner.groups[pruner.group_index(s)].name for s in self.skip]
            self.table = measure_latency_table(pruner, self.latency_options, skip=skip,
                                               round_to=resolve_round_to(self.round_to, self.runtime))
        self.table = all_gather(self.table)[0]
        return self.table

    def _latency_plan(self, pruner: FilterPruner, sens: Optional[SensitivityResult],
                      plan_for_flops) -> LatencySearch:
        """The latency target's plan: from a measured latency table and at most two verification
        exports (`LatencyOptions.method="table"`), or by the FLOPs-cut search ("search")."""
        options = self.latency_options
        if options.method == "search":
            return plan_for_latency(pruner, self.latency, plan_for_flops, options)
        table = measure_latency_table(pruner, options, skip=self.skip,
                                      round_to=resolve_round_to(self.round_to, self.runtime))
        self.table = table

        def plan_at(share: float):
            kept = pruner.plan_latency(share, table, sens, self.skip, self.strategy)
            return kept, pruner.latency_share(table, kept)

        meter = LatencyMeter(pruner.net, pruner.input_shape, options)
        return verify_latency_plan(pruner, self.latency, plan_at, meter, tolerance=options.tolerance)

    def _step_ratios(self, pruner: FilterPruner, step: int) -> Dict[str, float]:
        ratios = {}
        for g in pruner.groups:
            if g.name not in self._final:
                continue
            start, final = self._final[g.name]
            want = start - int(round((start - final) * step / self.steps))
            if step == self.steps:
                want = final
            if want < g.channels:
                ratios[g.name] = (g.channels - want) / g.channels
        return ratios

    def _after_surgery(self, net: paddle.nn.Layer, plan: PrunePlan) -> None:
        for p in net.parameters():  # gradients of the old shapes must not be accumulated into
            p.clear_gradient(False)
        self.model._optimizer = rebuild_optimizer(self.model._optimizer, net, plan.param_slices)
        adapter = getattr(self.model, "_adapter", None)
        if getattr(adapter, "ddp_model", None) is not None:  # paddle.Model under several ranks
            adapter.ddp_model = rebuild_data_parallel(adapter.ddp_model, net, self.model._optimizer)
        record_plan(self.model, plan)  # the ledger save_pruned and PrunedModelCheckpoint write out

    def _sensitivities(self, epoch: Optional[int]) -> Optional[SensitivityResult]:
        if self.strategy != "sensitivity":
            return None
        sens = self.sensitivity
        if isinstance(sens, SensitivityCallback):
            if sens.result is None:  # same epoch, listed after us: run it now
                sens.set_model(self.model)
                sens.run(epoch)
            return sens.result
        if isinstance(sens, (str, os.PathLike)):
            sens = self._loaded or SensitivityResult.load(os.fspath(sens))
        hist = history_of(self.model)
        if hist.sensitivity is None:  # let PruneVisualDL show the curves the plan came from
            hist.sensitivity, hist.sensitivity_epoch = sens, epoch
        return sens

    def resume_state(self) -> Optional[Dict[str, Any]]:
        """What a run resumed between two pruning steps needs (None before the first step): the
        final plan made on step 1 (per group: channels then, channels kept at the end), the FLOPs
        target and the steps made. Plain JSON data."""
        if self._final is None:
            return None
        return {"final": {g: [int(a), int(b)] for g, (a, b) in self._final.items()},
                "flops": self.flops, "steps_done": len(self.plans)}

    def continue_from(self, plans: Sequence[PrunePlan], state: Mapping[str, Any], first_epoch: int) -> None:
        """Continue a gradual pruning stopped after `len(plans)` of its steps (a resumed run): the
        next step is made at the end of epoch `first_epoch` of this fit, toward the final plan
        of `state` (`resume_state()` of the interrupted callback).

        Raises:
            ValueError: no step or every step made already, or `state` from another step count.
        """
        if not 0 < len(plans) < self.steps or int(state.get("steps_done", -1)) != len(plans):
            raise ValueError(f"cannot continue a {self.steps}-step pruning after {len(plans)} step(s) "
                             f"with a resume state of {state.get('steps_done')!r} step(s)")
        self.plans = list(plans)
        self._final = {g: (int(a), int(b)) for g, (a, b) in state["final"].items()}
        self.flops = float(state["flops"])
        self.latency = None  # a latency target was turned into this FLOPs cut on step 1
        self.at_epoch = first_epoch - len(plans)  # step k+1 at first_epoch (step 1 was before this fit)

    def _new_pruner(self, later: bool = False) -> FilterPruner:
        """A pruner tracing the training graph from what fit called the network with (`later`:
        before the first step, when those inputs are still to come)."""
        ds = self.sensitivity.dataset if isinstance(self.sensitivity, SensitivityCallback) else None
        shape = self.input_shape or infer_input_shape(self.model, ds)
        inputs = training_inputs(self.model)
        return FilterPruner(self.model.network, shape, self.criterion,
                            train_inputs=LATER if inputs is None and later else inputs, runtime=self.runtime,
                            layer_norm_widths=self.layer_norm_widths)


def _runtime_and_options(runtime: Optional[str], options: Optional[LatencyOptions]) -> tuple:
    """The deployment runtime and the latency options that measure on it (they must agree)."""
    if runtime is None:
        runtime = options.backend if options is not None and options.backend != "eager" else "paddle_inference"
    rt = check_runtime(runtime).value
    if options is None:
        if check_runtime(rt).gpu:
            return rt, LatencyOptions()  # rounding only: a latency target raises when it measures
        backend, onednn = latency_backend(rt)
        return rt, LatencyOptions(backend=backend, onednn=onednn)
    if options.backend not in (rt, "eager"):
        raise ValueError(f"runtime={rt!r} but latency_options.backend={options.backend!r}: the latency "
                         f"must be measured where the network is served; give them the same value")
    return rt, options


def _check_source(sensitivity: SensitivitySource, strategy: str, criterion: str) -> None:
    """The sensitivity source fits the strategy and was (or will be) measured with `criterion`."""
    if strategy != "sensitivity":
        return
    if sensitivity is None:
        raise ValueError(
            "strategy='sensitivity' needs sensitivity=<SensitivityCallback | "
            "SensitivityResult | path of a saved analysis>; or use strategy='uniform'")
    if not isinstance(sensitivity, (SensitivityCallback, SensitivityResult, str, os.PathLike)):
        raise tagged("sensitivity", TypeError("sensitivity must be a SensitivityCallback, a SensitivityResult "
                        f"or a file path; got {type(sensitivity).__name__}"))
    measured = getattr(sensitivity, "criterion", None)
    if measured is not None and get_criterion(measured).name != get_criterion(criterion).name:
        raise ValueError(
            f"the sensitivity curves are measured with criterion {measured!r} but this callback "
            f"prunes by {criterion!r}: the curves would describe other channels. Give both the "
            f"same criterion")
