"""Evaluation data for the sensitivity analysis: a dataset batched once, scored by a metric.

Holds ready input batches and labels; never changes the network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import paddle

Metric = Callable[[np.ndarray, np.ndarray], Tuple[float, int]]


def top1_metric(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, int]:
    """Correct top-1 predictions and count, for a batch."""
    pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
    return float((pred == labels.reshape(-1)).sum()), len(pred)


@dataclass
class EvalData:
    """A dataset turned into ready batches, evaluated with a metric (default: top-1 accuracy).

    The samples are read on first use of `batches` (or `load()`), not at construction, so
    building one (e.g. inside a callback's `__init__`) costs nothing.

    Args:
        dataset: a `paddle.io.Dataset` (or any indexable) of (input, label) samples.
        metric: `metric(logits, labels) -> (correct, count)` over numpy arrays, summed over
            batches; default top-1 accuracy.
        batch_size: evaluation batch size.
        num_samples: use only the first `num_samples` samples (all when None).
        workers: threads evaluating batches in parallel (default: CPU cores, at most 4).
    """

    dataset: Any
    metric: Metric = top1_metric
    batch_size: int = 64
    num_samples: Optional[int] = None
    workers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = _default_workers()
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive int or None, got {self.workers!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.num_samples is not None and (not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise ValueError(f"num_samples must be a positive int or None, got {self.num_samples!r}")
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
            ys.append(np.asarray(sample[1]).reshape(-1)[:1])
        x, y = np.stack(xs), np.concatenate(ys)
        self._batches = [(paddle.to_tensor(x[i:i + self.batch_size]), y[i:i + self.batch_size])
                         for i in range(0, self.size, self.batch_size)]
        return self

    def release(self) -> None:
        """Drop the batches (they are read again on next use): frees their memory."""
        self._batches = None

    def describe(self) -> str:
        return f"{type(self.dataset).__name__}: {self.size} samples"

    def score(self, outputs: Sequence[np.ndarray]) -> float:
        correct = total = 0.0
        for out, (_, y) in zip(outputs, self.batches):
            c, t = self.metric(out, y)
            correct, total = correct + c, total + t
        return correct / total


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))
