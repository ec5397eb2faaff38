"""Evaluation data for the sensitivity analysis: a dataset batched once, scored by a metric.

Holds ready input batches and labels; never changes the network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ..utils.errors import tagged
from ..training.distributed import world_size

MetricFn = Callable[[np.ndarray, np.ndarray], Tuple[float, int]]
# a function `(logits, labels) -> (correct, count)` summed over batches, or a paddle.metric.Metric
Metric = Union[MetricFn, paddle.metric.Metric]


def top1_metric(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, int]:
    """Correct top-1 predictions and count, for a batch."""
    pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return float((pred == labels.reshape(-1)).sum()), len(pred)


def cross_entropy_metric(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, int]:
    """Summed softmax cross-entropy and count, for a batch of class scores: the mean evaluation
    loss once summed over batches (lower is better; see `loss_metric`)."""
    z = logits.reshape(logits.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = labels.reshape(-1).astype(np.int64)
    return float(-log_p[np.arange(len(y)), y].sum()), len(y)


def loss_metric(loss_fn: Optional[Callable[..., Any]] = None) -> MetricFn:
    """The evaluation loss as a sensitivity metric, `(logits, labels) -> (loss sum, count)`.

    Continuous, so it resolves relative changes however small the evaluation set; lower is
    better (give `EvalData(..., lower_is_better=True)`).

    Args:
        loss_fn: the model's own loss (``paddle.Model``'s ``_loss``, e.g. for detection or
            segmentation), called on paddle tensors and taken as the batch mean; None: the
            softmax cross-entropy (`cross_entropy_metric`).
    """
    if loss_fn is None:
        return cross_entropy_metric

    def model_loss(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, int]:
        with paddle.no_grad():
            value = loss_fn(paddle.to_tensor(logits), paddle.to_tensor(labels))
        value = value[0] if isinstance(value, (list, tuple)) else value
        return float(np.asarray(value).mean()) * len(logits), len(logits)

    return model_loss


HANDFUL = 5
"""Fewer samples than this changing between points cannot resolve a top-1 sensitivity curve."""

ENGINES = ("auto", "eager")


@dataclass
class EvalData:
    """A dataset turned into ready batches, evaluated with a metric (default: top-1 accuracy).

    The samples are read on first use of `batches` (or `load()`), not at construction, so
    building one (e.g. inside a callback's `__init__`) costs nothing.

    Args:
        dataset: a `paddle.io.Dataset` (or any indexable) of (input, label) samples.
        metric: `metric(logits, labels) -> (correct, count)` over numpy arrays, summed over
            batches (default top-1 accuracy); or a `paddle.metric.Metric` (reset, then
            `update(*compute(logits, labels))` per batch, then `accumulate()`, as paddle.Model
            does), e.g. a mean IoU for segmentation. Labels keep their per-sample shape (a
            label map), except that one-element labels are flattened to a vector.
        batch_size: evaluation batch size.
        num_samples: use only the first `num_samples` samples (all when None).
        workers: threads evaluating batches in parallel (default: CPU cores, at most 4); with
            more than one, batches are cut into balanced pieces (`work_pieces`) that give every
            sample the same outputs as its whole batch.
        engine: "auto" (default): on the CPU, with the top-1 metric, the analysis runs the
            network exported once to Paddle Inference with oneDNN (`sensitivity.compiled`),
            recomputing eagerly every sample whose top-1 could differ, so the top-1 counts are
            those of eager masked evaluation; elsewhere, and for groups or networks it cannot
            serve, it evaluates eagerly. "eager": always evaluate eagerly.
        lower_is_better: the metric is a loss (`loss_metric`): relative losses are then its
            relative increase over the baseline.
        min_correct: with the top-1 metric, the analysis raises `UnresolvableMetric` when the
            baseline has fewer correct samples than this (no point could move by more than a
            few samples); 0 (default) never does. `SensitivityCallback` sets `HANDFUL`.
    """

    dataset: Any
    metric: Metric = top1_metric
    batch_size: int = 64
    num_samples: Optional[int] = None
    workers: Optional[int] = None
    engine: str = "auto"
    lower_is_better: bool = False
    min_correct: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise tagged("engine", ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}"))
        if self.workers is None:
            self.workers = _default_workers()
        if not isinstance(self.workers, int) or self.workers < 1:
            raise tagged("workers", ValueError(f"workers must be a positive int or None, got {self.workers!r}"))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise tagged("batch_size", ValueError(f"batch_size must be a positive int, got {self.batch_size!r}"))
        if self.num_samples is not None and (not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise tagged("num_samples", ValueError(f"num_samples must be a positive int or None, got {self.num_samples!r}"))
        n = len(self.dataset)
        if n == 0:
            raise ValueError("the evaluation dataset is empty")
        self.size = min(n, self.num_samples or n)
        self._batches: Optional[List[Tuple[paddle.Tensor, np.ndarray]]] = None

    @property
    def batches(self) -> List[Tuple[paddle.Tensor, np.ndarray]]:
        """The ready (input tensor, labels) batches, read from the dataset on first use."""
        if self._batches is None:
            self.load()
        return self._batches

    def load(self) -> "EvalData":
        """Read the samples into batches now (done on first use otherwise); returns self."""
        if self._batches is not None:
            return self
        xs, ys = [], []
        for i in range(self.size):
            sample = self.dataset[i]
            xs.append(np.asarray(sample[0], dtype=np.float32))
            ys.append(np.asarray(sample[1]))
        x, y = np.stack(xs), np.stack(ys)
        if y.size == len(y):  # class indices: a vector, as the (correct, count) metrics expect
            y = y.reshape(-1)
        self._batches = [(paddle.to_tensor(x[i:i + self.batch_size]), y[i:i + self.batch_size])
                         for i in range(0, self.size, self.batch_size)]
        return self

    def release(self) -> None:
        """Drop the batches (they are read again on next use): frees their memory."""
        self._batches = None

    def describe(self) -> str:
        what = f"{type(self.dataset).__name__}: {self.size} samples"
        return what + (", metric: loss (lower is better)" if self.lower_is_better else "")

    def score(self, outputs: Sequence[np.ndarray]) -> float:
        if isinstance(self.metric, paddle.metric.Metric):
            return _accumulate(self.metric, outputs, [y for _, y in self.batches])
        correct = total = 0.0
        for out, (_, y) in zip(outputs, self.batches):
            c, t = self.metric(out, y)
            correct, total = correct + c, total + t
        return correct / total


ROW_BLOCK = 8
"""Rows a CPU kernel computes together (the AVX width for float32): a batch cut at multiples of
this from its start gives every sample the same float outputs as the whole batch (checked on
MobileNetV1/V2 and ResNet18; a cut elsewhere, e.g. 50 rows of 128, changes the last bits)."""


def work_pieces(sizes: Sequence[int], workers: int) -> List[Tuple[int, int, int]]:
    """Cut batches into pieces that keep `workers` threads equally busy: (batch, start, stop).

    Batches of uneven count or size leave threads idle (4 batches of 128, 128, 128, 16 on two
    threads take 256 rows' time instead of 200). Pieces are cut at multiples of `ROW_BLOCK` rows
    from each batch's start, so every sample is computed exactly as in its whole batch, and are
    listed largest first so a pool handing them out in order balances them greedily.

    Args:
        sizes: the batches' row counts.
        workers: threads that will evaluate the pieces.

    Returns:
        One (batch index, first row, end row) per piece; the batches whole when `workers` is 1.

    Examples:
        >>> work_pieces([16], 2)
        [(0, 0, 8), (0, 8, 16)]
    """
    if workers <= 1:
        return [(b, 0, n) for b, n in enumerate(sizes)]
    rows = -(-sum(sizes) // (4 * workers))  # about 4 pieces per thread: a greedy fill evens out
    step = max(ROW_BLOCK, -(-rows // ROW_BLOCK) * ROW_BLOCK)
    pieces = [(b, a, min(a + step, n)) for b, n in enumerate(sizes) for a in range(0, n, step)]
    return sorted(pieces, key=lambda p: (p[1] - p[2], p[0], p[1]))


def main_output(outputs: Any) -> paddle.Tensor:
    """The output a metric scores: the tensor itself, the first of a list or tuple, the first
    value of a dict (a network with auxiliary outputs returns its main one first)."""
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    while isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return outputs


def _accumulate(metric: paddle.metric.Metric, outputs: Sequence[np.ndarray],
                labels: Sequence[np.ndarray]) -> float:
    """A paddle.metric.Metric over all batches, the way paddle.Model.evaluate drives it."""
    metric.reset()
    for out, y in zip(outputs, labels):
        args = metric.compute(paddle.to_tensor(out), paddle.to_tensor(y))
        args = args if isinstance(args, (list, tuple)) else [args]
        metric.update(*[a.numpy() if isinstance(a, paddle.Tensor) else a for a in args])
    value = metric.accumulate()
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n // world_size(), 4))  # ranks on one machine share its cores
