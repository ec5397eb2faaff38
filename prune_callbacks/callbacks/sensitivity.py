"""SensitivityCallback: run the sensitivity analysis at the end of a chosen epoch of `fit`."""
from __future__ import annotations

import logging
import numbers
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import paddle

from ..utils.errors import about, tagged
from ..planning.importance import get_criterion
from ..graph.training_graph import LATER
from ..pruner import FilterPruner
from ..sensitivity import (DEFAULT_RATIOS, EvalData, SensitivityResult, UnresolvableMetric, check_ratios,
                           loss_metric, top1_metric)
from ..sensitivity.analysis import check_file
from ..sensitivity.evaluation import HANDFUL
from ..utils.errors import check_names
from ._common import check_epoch, infer_input_shape
from .history import SensitivityFallback, history_of
from .train_inputs import stop_watching, training_inputs, watch_training_inputs

logger = logging.getLogger(__name__)

METRICS = ("top1", "loss")
"""Sensitivity metrics chosen by name (see `SensitivityCallback`'s `metric`)."""


class SensitivityCallback(paddle.callbacks.Callback):
    """Measure each prunable group's sensitivity at the end of epoch `at_epoch`'s training.

    It runs after that epoch's training and before fit's evaluation of it, leaves the network's
    train/eval mode, its weights and the model's metrics as they were, and publishes the result
    (`self.result`, and `history_of(model).sensitivity`) for `FilterPruneCallback` and
    `PruneVisualDL`. With `path`, every point is saved as it is measured; an analysis in `path`
    is resumed (or, complete, reused) when it was made for this very network (every group,
    layer type and parameter shape) with the same criterion, ratios and data, and the baseline
    measured when the analysis runs equals the one in the file (one evaluation pass).

    Before the first training batch (`on_train_begin`) it checks the input shape, the skip
    names, that `path` is a writable file (not a directory) and, if it exists, that it is a
    sensitivity file made for this network; then it reads the evaluation samples into batches
    (never in `__init__`), which it frees once the analysis is done. Each fit starts with no
    result.

    Args:
        eval_data: a dataset of (input, label) samples (batched by the engine, which can then
            replay unchanged layers from a cache) or `eval_fn() -> float`, higher is better.
        at_epoch: 0-based epoch at whose end the analysis runs.
        ratios: pruning ratios to try per group, each in (0, 1).
        path: JSON file for the results (resumed if it exists); None keeps them in memory.

    Raises:
        TypeError / ValueError: at construction for bad arguments; at `on_train_begin`, before
            any training, for an epoch past the fit, a bad input shape or skip name, or a `path`
            that is a directory, cannot be written, or holds a corrupt file, an older format or
            an analysis of another network, criterion, ratio set or data.
        num_samples: evaluate on the first `num_samples` samples only (datasets).
        batch_size: evaluation batch size (datasets).
        metric: "top1" (default: top-1 accuracy), "loss" (the evaluation loss: the model's own
            loss, e.g. the cross-entropy it was prepared with, else the softmax cross-entropy;
            continuous, lower is better, evaluated eagerly), or a
            `metric(logits, labels) -> (correct, count)` per batch (datasets). When the metric's
            baseline is 0 or not finite, or a top-1 baseline rests on fewer than a handful of
            correct samples, the analysis warns once and falls back to the loss, then to no
            curves (the pruning callback then plans uniformly); `fallbacks` (and
            `history_of(model).sensitivity_fallbacks`) record it.
        skip: groups (layer paths or parameter names) not to analyse.
        max_loss: stop a group's curve once its loss exceeds this (skipped points stay empty).
        criterion: channel importance used to choose which channels go ("l1", "l2", ...).
        input_shape: one input's shape, batch first; default: from the model's input spec,
            else from the first sample of `eval_data`.
        workers: threads evaluating batches in parallel (default: CPU cores, at most 4).
        engine: "auto" (default; datasets with the top-1 metric on the CPU: the network runs
            compiled by Paddle Inference with oneDNN, the same top-1 counts as eager masking)
            or "eager" (see `EvalData`).
        layer_norm_widths: analyse channels a LayerNorm normalises (default), as
            `FilterPruneCallback`'s switch of the same name prunes them; give both the same value.

    Examples:
        >>> sens = SensitivityCallback(val_ds, at_epoch=1, path="sen.json", num_samples=512)
        >>> model.fit(train_ds, epochs=3, callbacks=[
        ...     sens, FilterPruneCallback(flops=0.4, at_epoch=1, sensitivity=sens)])
    """

    def __init__(self, eval_data: Any, at_epoch: int = 0,
                 ratios: Sequence[float] = DEFAULT_RATIOS, path: Optional[str] = None,
                 num_samples: Optional[int] = None, batch_size: int = 64,
                 metric: Optional[Callable] = None, skip: Sequence[str] = (),
                 max_loss: Optional[float] = None, criterion: str = "l1",
                 input_shape: Optional[Sequence[int]] = None,
                 workers: Optional[int] = None, engine: str = "auto",
                 layer_norm_widths: bool = True) -> None:
        super().__init__()
        is_dataset = hasattr(eval_data, "__getitem__") and hasattr(eval_data, "__len__")
        if not is_dataset and not callable(eval_data):
            raise TypeError(
                "eval_data must be a dataset of (input, label) samples or a callable "
                f"eval_fn() -> float; got {type(eval_data).__name__}")
        if is_dataset and len(eval_data) == 0:
            raise ValueError("eval_data is empty: pass a dataset with at least one sample")
        self.at_epoch = check_epoch("at_epoch", at_epoch)
        self.ratios = check_ratios(ratios)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise tagged("path", TypeError(f"path must be a file path or None, got {type(path).__name__}"))
        self.path = os.fspath(path) if path is not None else None
        if max_loss is not None and (isinstance(max_loss, bool)
                                     or not isinstance(max_loss, numbers.Real)):
            raise tagged("max_loss", TypeError(f"max_loss must be a number or None, got {max_loss!r}"))
        with about("criterion"):  # unknown criterion: fail now, not epochs later
            get_criterion(criterion)
        self.criterion = criterion
        self.skip = check_names("skip", skip)
        self.max_loss = max_loss
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.layer_norm_widths = bool(layer_norm_widths)
        self.eval_fn: Optional[Callable[[], float]] = None
        self.eval_data: Optional[EvalData] = None
        self.dataset = eval_data if is_dataset else None  # the evaluation dataset (None: an eval_fn)
        if isinstance(metric, str) and metric not in METRICS:
            raise tagged("metric", ValueError(f"metric must be one of {', '.join(METRICS)} or a function "
                                              f"(logits, labels) -> (correct, count), got {metric!r}"))
        if metric is not None and not isinstance(metric, str) and not callable(metric) \
                and not isinstance(metric, paddle.metric.Metric):
            raise tagged("metric", TypeError(f"metric must be one of {', '.join(METRICS)}, a function or a "
                                             f"paddle.metric.Metric, got {type(metric).__name__}"))
        self.metric_name = metric if isinstance(metric, str) else ("top1" if metric is None else "custom")
        if is_dataset:
            chosen = (metric if callable(metric) or isinstance(metric, paddle.metric.Metric)
                      else loss_metric() if metric == "loss" else top1_metric)  # the model's loss once known
            self.eval_data = EvalData(eval_data, chosen, batch_size, num_samples, workers, engine,
                                      lower_is_better=metric == "loss", min_correct=HANDFUL)
        else:
            self.eval_fn = eval_data
        self.fallbacks: List[SensitivityFallback] = []
        self.result_path: Optional[str] = None  # the file of `result`: `path`, or the loss fallback's
        self.result: Optional[SensitivityResult] = None
        self.ran_at: Optional[int] = None
        self._ran = False  # the analysis ran at `ran_at` (its result may be None after a fallback)

    # -- fit hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs: Optional[Dict] = None) -> None:
        """Check everything that can be checked before the first batch; reset per-fit state."""
        self.result, self.ran_at, self._ran = None, None, False  # a reused callback starts afresh
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and self.at_epoch >= epochs:
            raise ValueError(
                f"SensitivityCallback(at_epoch={self.at_epoch}) never runs: fit has {epochs} "
                f"epochs (0..{epochs - 1}); lower at_epoch or fit longer")
        self.fallbacks = []
        pruner = self._pruner(later=True)  # checks input_shape and skip names before training
        if pruner.graph.train_failure is not None:  # its training forward needs targets: check
            # on them, before the first step
            watch_training_inputs(self.model, self._check, self.params or None)
        else:
            self._check(pruner)
        # the training graph is traced from what fit passes
        watch_training_inputs(self.model, fit=self.params or None)
        if self.eval_data is not None:
            self.eval_data.load()

    def _check(self, pruner: Optional[FilterPruner] = None) -> None:
        pruner = pruner or self._pruner()
        for name in self.skip:
            pruner.group_index(name)
        self._warn_if_small(pruner)
        if self.path is not None:  # a bad, foreign or unwritable file: fail now, not at the end
            check_file(pruner, self._evaluate(), self.ratios, self.path)

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        stop_watching(self.model)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        if epoch == self.at_epoch:
            self.run(epoch)

    # -- work ---------------------------------------------------------------------------------
    def run(self, epoch: Optional[int] = None) -> SensitivityResult:
        """Run (or resume, or reuse) the analysis now; called by fit, or by a pruning callback
        that needs the result in the same epoch before this callback's turn came."""
        if self._ran and self.ran_at == epoch:
            return self.result
        pruner = self._pruner()
        evaluate = self._evaluate()
        logger.info("sensitivity analysis at the end of epoch %s (%d prunable groups, ratios %s)",
                    epoch, len(pruner.prunable_groups), list(self.ratios))
        self.result_path = self.path
        try:
            self.result = pruner.sensitivity(evaluate, ratios=self.ratios, path=self.path,
                                             skip=self.skip, max_loss=self.max_loss)
        except UnresolvableMetric as e:
            self.result = self._fall_back(pruner, e)
        self.ran_at, self._ran = epoch, True
        if self.eval_data is not None:
            self.eval_data.release()  # the analysis is done: free the evaluation tensors
        if self.model is not None:
            hist = history_of(self.model)
            hist.sensitivity, hist.sensitivity_epoch = self.result, epoch
        return self.result

    def _fall_back(self, pruner: FilterPruner, error: UnresolvableMetric) -> Optional[SensitivityResult]:
        """The analysis again with the evaluation loss, or no curves when that fails too: a run
        that trained must not end here. Each fallback is warned about once and recorded."""
        failed = self.metric_name
        if self.eval_data is not None and not self.eval_data.lower_is_better:
            self._record(failed, "loss", error)
            d = self.eval_data
            loss_data = EvalData(d.dataset, self._loss_metric(), d.batch_size, d.num_samples, d.workers,
                                 "eager", lower_is_better=True)
            self.result_path = self._loss_path()
            try:
                return pruner.sensitivity(loss_data, ratios=self.ratios, path=self.result_path,
                                          skip=self.skip, max_loss=self.max_loss)
            except UnresolvableMetric as again:
                failed, error = "loss", again
            except (ValueError, TypeError, RuntimeError) as broken:  # e.g. a loss that wants other labels
                failed, error = "loss", broken
        self._record(failed, "uniform", error)
        self.result_path = None
        return None

    def _record(self, metric: str, to: str, error: Exception) -> None:
        fallback = SensitivityFallback(metric, to, str(error))
        self.fallbacks.append(fallback)
        what = "the evaluation loss" if to == "loss" else "uniform allocation (no sensitivity curves)"
        warnings.warn(f"sensitivity analysis with metric {metric!r}: {error}; falling back to {what}",
                      stacklevel=3)
        if self.model is not None:
            history_of(self.model).sensitivity_fallbacks.append(fallback)

    def _loss_path(self) -> Optional[str]:
        if self.path is None:
            return None
        root, ext = os.path.splitext(self.path)
        return f"{root}.loss{ext or '.json'}"

    def _loss_metric(self) -> Callable:
        """The model's own loss when it was prepared with one, else the softmax cross-entropy."""
        return loss_metric(getattr(self.model, "_loss", None) if self.model is not None else None)

    def _warn_if_small(self, pruner: FilterPruner) -> None:
        """Warn before training when a top-1 curve cannot be resolved by this many samples."""
        if self.eval_data is None or self.eval_data.metric is not top1_metric:
            return
        size, points = self.eval_data.size, len(self.ratios)
        if size < HANDFUL * points:
            groups = len([g for g in pruner.prunable_groups if g.name not in self.skip])
            warnings.warn(
                f"the sensitivity analysis evaluates top-1 on {size} samples for {points} ratios per group "
                f"({groups} groups): consecutive points of a curve differ by fewer than {HANDFUL} samples "
                f"on average, so the curves are mostly noise; evaluate on at least {HANDFUL * points} "
                f"samples (num_samples) or use metric='loss'", stacklevel=3)

    def _evaluate(self) -> Any:
        if self.eval_data is not None and self.eval_data.lower_is_better:
            self.eval_data.metric = self._loss_metric()  # the model's own loss, once there is a model
        return self.eval_data if self.eval_data is not None else self.eval_fn

    def _pruner(self, later: bool = False) -> FilterPruner:
        """A pruner tracing the training graph from what fit called the network with (`later`:
        before the first step, when those inputs are still to come)."""
        shape = self.input_shape or infer_input_shape(self.model, self.dataset)
        inputs = training_inputs(self.model)
        return FilterPruner(self.model.network, shape, self.criterion,
                            train_inputs=LATER if inputs is None and later else inputs,
                            layer_norm_widths=self.layer_norm_widths)
