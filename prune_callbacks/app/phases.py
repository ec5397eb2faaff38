"""Measuring inside the single fit: an evaluator, the timestamp callbacks placed around the pruners,
and the guard that stops a diverged run.

They only read the network, the logs and the clock: they never change weights, modes or fit's logs.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, Optional

import numpy as np
import paddle

from ..training.distributed import all_gather, shard, world_size

log = logging.getLogger(__name__)


def evaluate_net(net: paddle.nn.Layer, dataset: paddle.io.Dataset, batch_size: int) -> Dict[str, float]:
    """Loss, top-1 and top-5 of `net` on `dataset`, leaving the net in the mode it was in.

    A plain loop rather than `paddle.Model.evaluate`: called from `on_epoch_end` inside `fit`,
    `evaluate` would overwrite the `logs` dict that fit passes on to later callbacks (fit's
    `_run_one_epoch` shares a mutable default), and reset `model._test_dataloader`. Under several
    ranks each evaluates its share of the samples (round robin) and the sums are gathered, so every
    rank returns the figures of the whole data set, as one process would (up to float rounding).
    DataParallel keeps the trained parameters equal across ranks but not the rest: each rank's
    BatchNorm running statistics (non-trainable parameters in Paddle) follow its own batches. So
    rank 0's non-trainable parameters and buffers are broadcast first, and every rank evaluates
    rank 0's network, the one that is saved and exported.

    Args:
        net: a classifier returning logits.
        dataset: (image, label) samples.
        batch_size: evaluation batch size.

    Returns:
        {"loss": mean cross-entropy, "top1": accuracy, "top5": accuracy}.

    Examples:
        >>> evaluate_net(net, val_ds, batch_size=256)["top1"]
    """
    was_training = net.training
    net.eval()
    loss_fn = paddle.nn.CrossEntropyLoss(reduction="sum")
    metric = paddle.metric.Accuracy(topk=(1, 5))
    sums = [0.0, 0, 0.0, 0.0]  # loss, count, top-1 hits, top-5 hits
    mine = shard(range(len(dataset)))
    if world_size() > 1:
        dataset = paddle.io.Subset(dataset, mine)
        for state in [*net.buffers(), *(p for p in net.parameters() if p.stop_gradient)]:
            paddle.distributed.broadcast(state, src=0)  # BatchNorm's running mean/variance among them
    loader = paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    try:
        with paddle.no_grad():
            for images, labels in (loader if mine else []):
                logits = net(images)
                correct = np.asarray(metric.compute(logits, labels))
                sums[0] += float(loss_fn(logits, labels))
                sums[1] += int(labels.shape[0])
                sums[2] += float(correct[:, :1].sum())
                sums[3] += float(correct[:, :5].sum())
    finally:
        if was_training:
            net.train()
    loss, count, top1, top5 = (sum(column) for column in zip(*all_gather(sums)))
    count = max(count, 1)
    return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count}


class PhaseClock:
    """Timestamps of the phases of one fit, kept by `PhaseMark` callbacks placed around the pruners."""

    def __init__(self) -> None:
        self.marks: Dict[str, float] = {}
        self.metrics: Dict[str, Dict[str, float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def span(self, start: str, end: str) -> Optional[float]:
        """Seconds from mark `start` to mark `end`, None if either is missing."""
        if start in self.marks and end in self.marks:
            return self.marks[end] - self.marks[start]
        return None


class TrainSpan(paddle.callbacks.Callback):
    """Mark "start" and "end" of fit (first in the callback list, so "end" excludes the others' work)."""

    def __init__(self, clock: PhaseClock) -> None:
        super().__init__()
        self.clock = clock

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self.clock.mark("start")

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self.clock.mark("end")


class PhaseMark(paddle.callbacks.Callback):
    """Record a timestamp (and optionally evaluate) at the end of epoch `at_epoch`.

    Callbacks run in list order, so a `PhaseMark` before and after each pruning callback brackets it.
    """

    def __init__(
        self,
        clock: PhaseClock,
        name: str,
        at_epoch: int,
        eval_data: Optional[paddle.io.Dataset] = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.clock, self.name, self.at_epoch = clock, name, at_epoch
        self.eval_data, self.batch_size = eval_data, batch_size

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if epoch != self.at_epoch:
            return
        self.clock.mark(self.name)
        if self.eval_data is not None:
            self.clock.metrics[self.name] = evaluate_net(self.model.network, self.eval_data, self.batch_size)
            log.info("%s: %s", self.name, self.clock.metrics[self.name])
            self.clock.mark(self.name + "_evaluated")


class Diverged(RuntimeError):
    """Training produced a non-finite loss; `epoch` and `step` say where (0-based)."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"the training loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class DivergenceGuard(paddle.callbacks.Callback):
    """Stop `fit` at the first non-finite training loss by raising `Diverged`.

    Once the weights hold NaN nothing downstream means anything (sensitivity, plans, fine-tuning),
    so the app stops at once and reports the divergence instead of finishing on NaN. In one
    process it checks every batch; under several ranks it checks at each epoch's end (before the
    pruning callbacks), with the ranks' flags gathered so that all of them stop together.

    Args:
        offset: epochs done before this fit (a resumed run), added to the epoch it reports.
    """

    def __init__(self, offset: int = 0) -> None:
        super().__init__()
        self.offset, self.epoch = offset, 0
        self.last: Optional[tuple] = None  # (step, loss) of the first non-finite loss this epoch

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self.epoch, self.last = epoch, None

    def on_train_batch_end(self, step: int, logs: Optional[dict] = None) -> None:
        loss = (logs or {}).get("loss")
        value = float(loss[0] if isinstance(loss, (list, tuple)) else loss) if loss is not None else 0.0
        if math.isfinite(value) or self.last is not None:
            return
        self.last = (step, value)
        if world_size() == 1:
            raise Diverged(self.offset + self.epoch, step, value)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if world_size() == 1:
            return
        found = [x for x in all_gather(self.last) if x is not None]
        if found:
            raise Diverged(self.offset + epoch, *min(found))
