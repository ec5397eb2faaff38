"""SparsityCallback: sparse training before pruning, a regulariser over the traced channel groups.

It adds a term to the model's loss while it is on, so its gradient reaches every optimizer,
AMP's scaled backward and data-parallel gradient averaging like the task loss's; or, with an
adaptive optimizer (Adam & co., whose per-element step normalisation all but cancels such a
gradient on weak channels), it takes the term's proximal step after each optimizer step. It
never prunes and turns itself off before the first pruning step (the groups change then).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import paddle

from ..pruner import FilterPruner
from ..training.sparsity import GroupSparsity, Regulariser, grow, spread
from ..utils.errors import about, check_names, tagged
from ._common import check_epoch, infer_input_shape
from .history import Scalar, history_of

logger = logging.getLogger(__name__)


METHODS = ("auto", "gradient", "proximal")
# optimizers that normalise each element's step by its gradient history: a penalty's gradient
# is then rescaled like the task's and barely shrinks weak channels, so "auto" steps proximally
ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSProp", "Adagrad", "Adadelta", "Lamb")


def _resolve_method(method: str, optimizer: Any) -> str:
    if method != "auto":
        return method
    inner = getattr(optimizer, "_inner_opt", optimizer)  # fleet's wrappers hold the real one
    names = {c.__name__ for c in type(inner).__mro__}
    return "proximal" if names & set(ADAPTIVE) else "gradient"


class _RegularisedLoss:
    """The task loss plus the sparsity term while the callback is on and the network trains."""

    def __init__(self, task_loss: Callable, callback: "SparsityCallback") -> None:
        self.task_loss = task_loss
        self.cb = callback

    def __call__(self, *outputs_and_labels: Any) -> Any:
        task = self.task_loss(*outputs_and_labels)
        cb = self.cb
        if not cb.active or cb.reg is None or not cb.model.network.training \
                or cb.method == "proximal":  # that one acts after the optimizer's step
            return task
        penalty = cb.reg.penalty(cb.strengths)
        cb._epoch_penalty.append(float(penalty))
        total = task if isinstance(task, paddle.Tensor) else paddle.add_n(list(task))
        return total + penalty


class SparsityCallback(paddle.callbacks.Callback):
    """Push the channels that pruning will remove toward zero before it removes them.

    From `start_epoch` until `stop_epoch` (default: the first pruning step of a
    FilterPruneCallback in the same fit, or the end of fit) every training step's loss gets
    `sum_g sum_c strength_gc * magnitude_gc` over the prunable groups:

    - `kind="group"` (group lasso, DepGraph's sparse learning): `magnitude_gc` is the L2 norm of
      every trainable parameter of group g at channel c (the producing filters and biases, the
      BatchNorm scale and shift, the consuming layers' input slices), so a channel driven to zero
      costs nothing to remove;
    - `kind="bn_scale"` (network slimming): `magnitude_gc` is |gamma| of the BatchNorm after the
      group's producers; pair it with `criterion="bn_scale"`, and `group` with
      `criterion="group_l2"`.

    `method` says how the term acts. "gradient": added to the loss. "proximal": after each
    optimizer step, every channel's parameters are scaled by `max(0, 1 - lr * strength /
    magnitude)` (the term's proximal operator; soft thresholding of gamma for `bn_scale`), which
    shrinks alike under every optimizer and zeroes channels exactly. "auto" (default): proximal
    with an adaptive optimizer (Adam, AdamW, Adamax, NAdam, RAdam, RMSProp, Adagrad, Adadelta,
    Lamb), the gradient otherwise; the choice is logged.

    With `growing > 0` each channel's strength rises by `growing * (max - m) / (max - min)` at
    the start of every epoch after the first (m: its group's magnitudes then), so the channels
    ranked for removal are pushed harder and harder (Torch-Pruning's GrowingReg).

    At the end of each regularised epoch it publishes to `history_of(model).scalars` (PruneVisualDL
    logs them): `sparsity/penalty` (mean term per step), `sparsity/norm_cv` (mean over groups of
    std/mean of the channel magnitudes) and `sparsity/near_zero` (share of channels below 1% of
    their group's largest).

    Args:
        kind: "group" or "bn_scale".
        strength: starting strength of every channel (the lambda of the term), > 0.
        start_epoch: first 0-based epoch regularised.
        stop_epoch: first epoch no longer regularised; None: until the first pruning step.
        growing: growth of the strength per epoch on the least important channels; 0: fixed.
        method: "auto", "gradient" or "proximal" (above).
        skip: groups left alone (layer paths, or Paddle parameter names).
        input_shape: one input's shape, batch first; default: from the model's input spec.

    Raises:
        ValueError / TypeError: bad arguments at construction; at `on_train_begin`, unknown
            group names in `skip` or no group to regularise.

    Examples:
        >>> model.fit(train_ds, val_ds, epochs=6, callbacks=[
        ...     SparsityCallback(kind="group", strength=1e-4, growing=1e-4),
        ...     FilterPruneCallback(flops=0.5, at_epoch=3, criterion="group_l2",
        ...                         strategy="uniform")])
    """

    def __init__(self, kind: str = "group", strength: float = 1e-4, start_epoch: int = 0,
                 stop_epoch: Optional[int] = None, growing: float = 0.0, skip: Sequence[str] = (),
                 input_shape: Optional[Sequence[int]] = None, method: str = "auto") -> None:
        super().__init__()
        if method not in METHODS:
            raise tagged("method", ValueError(f"method must be one of {list(METHODS)}, got {method!r}"))
        self.requested_method = method
        self.method = method
        try:
            self.kind = Regulariser(kind)
        except ValueError:
            raise tagged("kind", ValueError(f"kind must be one of {[k.value for k in Regulariser]}, "
                                            f"got {kind!r}")) from None
        for name, value in (("strength", strength), ("growing", growing)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or not np.isfinite(value):
                raise tagged(name, ValueError(f"{name} must be a finite number >= 0, got {value!r}"))
        if strength == 0 and growing == 0:
            raise tagged("strength", ValueError("strength and growing are both 0: the callback "
                                                "would do nothing; give strength > 0 (e.g. 1e-4)"))
        self.start_epoch = check_epoch("start_epoch", start_epoch)
        self.stop_epoch = None if stop_epoch is None else check_epoch("stop_epoch", stop_epoch)
        if self.stop_epoch is not None and self.stop_epoch <= self.start_epoch:
            raise tagged("stop_epoch", ValueError(
                f"stop_epoch={stop_epoch} must be after start_epoch={start_epoch} (it is the first "
                f"epoch no longer regularised)"))
        self.strength = float(strength)
        self.growing = float(growing)
        self.skip = check_names("skip", skip)
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.reg: Optional[GroupSparsity] = None
        self.strengths: List[np.ndarray] = []
        self.active = False
        self._stopped = False
        self._epoch_penalty: List[float] = []
        self._current_epoch = 0
        self._wrapper: Optional[_RegularisedLoss] = None

    # -- hooks ------------------------------------------------------------------------------
    def on_train_begin(self, logs: Optional[Dict] = None) -> None:
        if self.model._loss is None:
            raise ValueError("SparsityCallback needs a loss: call model.prepare(optimizer, loss)")
        net = self.model.network
        net = net._layers if isinstance(net, paddle.DataParallel) else net
        pruner = FilterPruner(net, self.input_shape or infer_input_shape(self.model))
        with about("skip"):
            skipped = {pruner.group_index(n) for n in self.skip}
        groups = [gi for gi, g in enumerate(pruner.groups) if g.prunable and gi not in skipped]
        self.reg = GroupSparsity(pruner.graph, dict(net.named_parameters()), groups, self.kind)
        self.strengths = [np.full(c, self.strength) for c in self.reg.channels]
        self._stopped, self.active = False, False
        self.method = _resolve_method(self.requested_method, self.model._optimizer)
        self._wrapper = _RegularisedLoss(self.model._loss, self)
        self.model._loss = self._wrapper
        history_of(self.model).before_prune.append(self._on_before_prune)
        logger.info("sparse training (%s, strength %g, growing %g, %s%s) on %d groups from epoch %d",
                    self.kind.value, self.strength, self.growing, self.method,
                    f" for {type(self.model._optimizer).__name__}"
                    if self.requested_method == "auto" else "", len(self.reg.groups),
                    self.start_epoch)

    def on_train_batch_end(self, step: int, logs: Optional[Dict] = None) -> None:
        if not self.active or self.reg is None or self.method != "proximal" \
                or not self.model.network.training:
            return
        opt = self.model._optimizer
        masters = getattr(opt, "_master_weights", None) or {}  # AMP O2: float32 copies
        net = self.model.network
        net = net._layers if isinstance(net, paddle.DataParallel) else net
        extra = {k: masters[p.name] for k, p in net.named_parameters() if p.name in masters}
        self._epoch_penalty.append(  # the term before the step, as the gradient method logs it
            self.reg.proximal_step(self.strengths, float(opt.get_lr()), extra))

    def on_epoch_begin(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        epoch = self._current_epoch = epoch or 0
        self.active = (not self._stopped and epoch >= self.start_epoch
                       and (self.stop_epoch is None or epoch < self.stop_epoch))
        if self.active and self.growing and epoch > self.start_epoch:
            mags = self.reg.magnitudes()
            self.strengths = grow(self.strengths, [mags[n] for n in self.reg.names], self.growing)
        self._epoch_penalty = []

    def on_epoch_end(self, epoch: Optional[int] = None, logs: Optional[Dict] = None) -> None:
        if self.active and self.reg is not None:  # before a pruning step in this same hook
            self._publish(epoch or 0)

    def on_train_end(self, logs: Optional[Dict] = None) -> None:
        self._stop()
        hist = history_of(self.model)
        if self._on_before_prune in hist.before_prune:
            hist.before_prune.remove(self._on_before_prune)
        if self.model._loss is self._wrapper:  # else another callback wrapped it since: the
            self.model._loss = self._wrapper.task_loss  # wrapper stays, switched off
        self._wrapper = None

    # -- work -------------------------------------------------------------------------------
    def _on_before_prune(self, model: Any) -> None:
        if self.active and self.reg is not None and self._epoch_penalty:
            self._publish(self._current_epoch)
        self._stop()

    def _stop(self) -> None:
        self.active, self._stopped = False, True

    def _publish(self, epoch: int) -> None:
        if not self._epoch_penalty:
            return
        cv, near_zero = spread(self.reg.magnitudes())
        penalty = float(np.mean(self._epoch_penalty))
        self._epoch_penalty = []
        scalars = history_of(self.model).scalars
        scalars += [Scalar("sparsity/penalty", penalty, epoch),
                    Scalar("sparsity/norm_cv", cv, epoch),
                    Scalar("sparsity/near_zero", near_zero, epoch)]
        logger.info("sparsity epoch %d: penalty %.4g, channel magnitudes cv %.3f, %.1f%% near zero",
                    epoch, penalty, cv, 100 * near_zero)
