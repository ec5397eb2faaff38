"""DistillCallback: after pruning, fine-tune against a frozen copy of the unpruned network.

It wraps the model's loss for the rest of `fit`; the user's loss, data and network are unchanged,
and everything it installed is removed at `on_train_end`. No pruning maths here.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..utils.errors import tagged
from .history import Scalar, history_of

logger = logging.getLogger(__name__)

OutputKey = Union[int, str]


def distill_loss(student: paddle.Tensor, teacher: paddle.Tensor, temperature: float,
                 standardize: bool = True) -> paddle.Tensor:
    """`T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`, classes on axis 1, mean over the other axes
    (samples, and pixels of a dense output).

    With `standardize` (the default) each sample's logits are first z-scored over the classes
    (`(z - mean) / std`, logit standardisation, Sun et al. 2024), so the student matches the
    teacher's ranking and relative margins, not its raw logit scale. Without it, at T >> 1 the
    term behaves like an L2 pull of the student's raw logits toward the teacher's (gradient about
    `(z_s - z_t) / classes`), whose size grows with the teacher's logit range and does not fade
    as the student becomes right: at a learning rate set for cross-entropy that step is too
    large (ResNet18 on digits, teacher logits spanning ~28, T = 4: the term rose while training
    and the student lost up to 38 points; see docs/accuracy.md).

    Examples:
        >>> distill_loss(paddle.randn([8, 10]), paddle.randn([8, 10]), 4.0)
    """
    t = float(temperature)
    s, z = student.astype("float32"), teacher.astype("float32")
    if standardize:
        s, z = _standardized(s), _standardized(z)
    s_log = F.log_softmax(s / t, axis=1)
    t_log = F.log_softmax(z / t, axis=1)
    kl = (t_log.exp() * (t_log - s_log)).sum(axis=1)
    return kl.mean() * (t * t)


def _standardized(z: paddle.Tensor) -> paddle.Tensor:
    mean = z.mean(axis=1, keepdim=True)
    std = ((z - mean) ** 2).mean(axis=1, keepdim=True).sqrt()
    return (z - mean) / (std + 1e-6)


def _top1_hits(logits: paddle.Tensor, labels: Any) -> Optional[Tuple[int, int]]:
    """(correct, count) of a classifier's [N, C] logits against [N] or [N, 1] int labels; None
    for anything else (dense outputs, soft labels)."""
    if not isinstance(labels, paddle.Tensor) or len(logits.shape) != 2 \
            or labels.dtype not in (paddle.int64, paddle.int32) \
            or int(np.prod(labels.shape)) != logits.shape[0]:
        return None
    pred = logits.argmax(axis=1).astype("int64")
    return int((pred == labels.reshape([-1]).astype("int64")).sum()), int(logits.shape[0])


def pick_output(outputs: Any, key: OutputKey) -> paddle.Tensor:
    """The output that is distilled: `outputs[key]` of a list, tuple or dict; a tensor itself."""
    if isinstance(outputs, paddle.Tensor):
        return outputs
    try:
        return outputs[key]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"DistillCallback(output={key!r}) does not name one of the network's "
                         f"outputs ({_describe(outputs)}); pass output=<index or dict key>") from None


def _describe(outputs: Any) -> str:
    if isinstance(outputs, dict):
        return f"dict keys {sorted(outputs)}"
    return f"{type(outputs).__name__} of {len(outputs)}" if hasattr(outputs, "__len__") else \
        type(outputs).__name__


class _DistilledLoss:
    """`(1 - alpha) * task_loss + alpha * distill_loss` while the student trains; the task loss
    alone in evaluation (fit's reported eval loss stays comparable)."""

    def __init__(self, task_loss: Callable, callback: "DistillCallback") -> None:
        self.task_loss = task_loss
        self.cb = callback

    def __call__(self, *outputs_and_labels: Any) -> Any:
        task = self.task_loss(*outputs_and_labels)
        cb = self.cb
        teacher = cb._teacher_out
        if teacher is None or not cb.model.network.training:
            return task
        cb._teacher_out = None
        n_out = len(outputs_and_labels) - cb._n_labels
        student_outputs = list(outputs_and_labels[:n_out])
        student = pick_output(student_outputs if n_out > 1 else student_outputs[0], cb.output)
        kd = distill_loss(student, teacher, cb.temperature, cb.standardize)
        cb.last_kd = float(kd)
        labels = outputs_and_labels[n_out] if len(outputs_and_labels) > n_out else None
        cb._count(teacher, student, labels)
        total = task if isinstance(task, paddle.Tensor) else paddle.add_n(list(task))
        return (1.0 - cb.alpha) * total + cb.alpha * kd


class DistillCallback(paddle.callbacks.Callback):
    """Distil the unpruned network into the pruned one for the rest of `fit`.

    When a FilterPruneCallback of the same fit is about to prune (its first step), this callback
    keeps a frozen copy of the network as it is then (the teacher, in eval mode, excluded from
    the optimizer), and from then on the model trains on
    `(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))`,
    on standardised logits by default (see `distill_loss`).
    The teacher runs on each training batch (no gradients); evaluation reports the task loss.
    At `on_train_end` the teacher is dropped and the model's own loss restored.

    What the teacher is worth is visible: at the end of every distilled epoch it publishes to
    `history_of(model).scalars` (PruneVisualDL logs them) `distill/term` (the mean distillation
    term), and for classifiers `distill/teacher_top1` and `distill/student_top1` on the training
    batches both saw; it warns when the teacher scored below the student there (the labels teach
    better than the teacher does: e.g. a teacher whose eval-mode BatchNorm statistics lag behind
    its weights after very short training).

    Cost: memory of one more copy of the unpruned parameters; time of one teacher forward per
    training step (about a third of a training step).

    Args:
        alpha: weight of the distillation term, in [0, 1] (0 turns it off).
        temperature: softmax temperature T > 0.
        output: which output is distilled when the network returns several (list/tuple index or
            dict key); the main output, index 0, by default.
        teacher: a network to distil from for the whole fit instead (e.g. when pruning happened
            before this fit); it is copied, frozen and put in eval mode when training begins.
        standardize: z-score each sample's logits (student and teacher) before the temperature
            (default); False: Hinton's loss on the raw logits.

    Raises:
        ValueError: alpha outside [0, 1], temperature <= 0.

    Examples:
        >>> model.fit(train_ds, val_ds, epochs=6, callbacks=[
        ...     FilterPruneCallback(flops=0.4, at_epoch=2, strategy="uniform"),
        ...     DistillCallback(alpha=0.5, temperature=4.0)])
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, output: OutputKey = 0,
                 teacher: Optional[nn.Layer] = None, standardize: bool = True) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, nn.Layer):
            raise tagged("teacher", TypeError(f"teacher must be a paddle.nn.Layer or None, got {type(teacher).__name__}"))
        self.given_teacher = teacher
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise tagged("alpha", ValueError(f"alpha must be a number in [0, 1] (the distillation weight), "
                             f"got {alpha!r}"))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise tagged("temperature", ValueError(f"temperature must be a number > 0, got {temperature!r}"))
        if not isinstance(output, (int, str)) or isinstance(output, bool):
            raise tagged("output", TypeError(f"output must be an int index or a str dict key, got {output!r}"))
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.output = output
        if not isinstance(standardize, bool):
            raise tagged("standardize", TypeError(f"standardize must be True or False, "
                                                  f"got {standardize!r}"))
        self.standardize = standardize
        self.teacher: Optional[nn.Layer] = None
        self.last_kd: Optional[float] = None
        self._teacher_out: Optional[paddle.Tensor] = None
        self._hook: Any = None
        self._task_loss: Optional[Callable] = None
        self._n_labels = 0
        self._epoch = 0
        self._reset_counts()

    def on_train_begin(self, logs: Optional[Dict] = None) -> None:
        if self.model._loss is None:
            raise ValueError("DistillCallback needs a loss: call model.prepare(optimizer, loss)")
        self._n_labels = len(self.model._labels or [])
        self.teacher, self._teacher_out, self.last_kd = None, None, None
        if self.given_teacher is not None:
            self._start(self.model, self.given_teacher)
        else:
            history_of(self.model).before_prune.append(self._on_before_prune)

    def on_epoch_begin(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        self._epoch = epoch or 0
        self._reset_counts()

    def on_epoch_end(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        self._publish()

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        self._publish()
        hist = history_of(self.model)
        if self._on_before_prune in hist.before_prune:
            hist.before_prune.remove(self._on_before_prune)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._task_loss is not None:
            self.model._loss = self._task_loss
            self._task_loss = None
        self.teacher, self._teacher_out = None, None

    # -- work ---------------------------------------------------------------------------------
    def _on_before_prune(self, model: Any) -> None:
        if self.teacher is None:  # the teacher is the network before the first pruning step
            self._start(model, model.network)

    def _start(self, model: Any, network: nn.Layer) -> None:
        if self.alpha == 0:
            return
        teacher = copy.deepcopy(network)
        teacher.eval()
        for p in teacher.parameters():
            p.stop_gradient = True
        self.teacher = teacher
        self._task_loss = model._loss
        model._loss = _DistilledLoss(self._task_loss, self)
        self._hook = model.network.register_forward_pre_hook(self._run_teacher)
        logger.info("distillation on: teacher is the unpruned network (alpha %.2f, T %.1f)",
                    self.alpha, self.temperature)

    def _run_teacher(self, layer: nn.Layer, inputs: Any) -> None:
        if not layer.training or self.teacher is None:
            return
        with paddle.no_grad():
            self._teacher_out = pick_output(self.teacher(*inputs), self.output).detach()

    # -- what the teacher is worth ------------------------------------------------------------
    def _reset_counts(self) -> None:
        self._terms: list = []
        self._hits = [0, 0, 0]  # teacher correct, student correct, samples

    def _count(self, teacher: paddle.Tensor, student: paddle.Tensor, labels: Any) -> None:
        self._terms.append(self.last_kd)
        t_hits = _top1_hits(teacher, labels)
        s_hits = _top1_hits(student.detach(), labels)
        if t_hits is not None and s_hits is not None:
            self._hits[0] += t_hits[0]
            self._hits[1] += s_hits[0]
            self._hits[2] += t_hits[1]

    def _publish(self) -> None:
        """The epoch's figures into the history (once), and a warning for a poor teacher."""
        if not self._terms or self.model is None:
            return
        epoch, scalars = self._epoch, history_of(self.model).scalars
        scalars.append(Scalar("distill/term", float(np.mean(self._terms)), epoch))
        teacher_ok, student_ok, seen = self._hits
        if seen:
            t1, s1 = teacher_ok / seen, student_ok / seen
            scalars += [Scalar("distill/teacher_top1", t1, epoch),
                        Scalar("distill/student_top1", s1, epoch)]
            logger.info("distillation epoch %d: term %.4f, teacher top-1 %.3f, student top-1 %.3f "
                        "on %d training samples", epoch, np.mean(self._terms), t1, s1, seen)
            if t1 < s1:
                warnings.warn(
                    f"DistillCallback: on the {seen} training samples of epoch {epoch} the teacher "
                    f"scored top-1 {t1:.3f}, below the student's {s1:.3f}: the labels teach better "
                    f"than the teacher. Check the teacher in eval mode (BatchNorm statistics lag "
                    f"behind the weights after very short training: train longer before pruning), "
                    f"or lower alpha", stacklevel=2)
        self._reset_counts()
