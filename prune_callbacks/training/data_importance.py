"""Statistics for data-driven channel importance, gathered by hooks during ordinary training steps.

`taylor`: |weight x gradient| per parameter element, summed over the training batches seen
(first-order Taylor, Molchanov et al. 2019); `activation`: mean |output| per channel of each layer
with a weight (convs, linears, norms), averaged over those batches. It never runs the network or
the data itself: the training loop's own forward and backward passes feed it.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import paddle
import paddle.nn as nn

from .distributed import world_size

logger = logging.getLogger(__name__)

TAYLOR = "taylor"
ACTIVATION = "activation"
KINDS = (TAYLOR, ACTIVATION)


def _channel_axis(layer: nn.Layer) -> int:
    if isinstance(layer, nn.Linear):
        return -1
    fmt = str(getattr(layer, "_data_format", "NCHW"))
    return -1 if fmt.endswith("C") and fmt != "NC" else 1


class ImportanceStats:
    """Accumulate importance statistics of a network from its training steps.

    Call `start()` before the batches to measure (a callback does this at the start of the pruning
    epoch), `stop()` after them, then `snapshot()` for the numbers (summed over every process).

    Args:
        net: the network (not a DataParallel wrapper: its layers are the same objects).
        kinds: which statistics: "taylor", "activation" or both.
        grad_scale: called at each gradient to undo a loss scale (AMP's GradScaler); the gradient
            is divided by what it returns. None: 1.

    Raises:
        ValueError: an unknown kind.

    Examples:
        >>> stats = ImportanceStats(net, ["taylor"]).start()
        >>> model.fit(train_ds, epochs=1)             # hooks see every training step
        >>> stats.stop()
        >>> FilterPruner(net, [1, 3, 32, 32], criterion="taylor", statistics=stats)
    """

    def __init__(self, net: nn.Layer, kinds: Iterable[str] = KINDS,
                 grad_scale: Optional[Callable[[], float]] = None) -> None:
        if isinstance(net, paddle.DataParallel):
            net = net._layers
        self.kinds = tuple(dict.fromkeys(kinds))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be some of {list(KINDS)}, got {list(kinds)!r}")
        self.net = net
        self.grad_scale = grad_scale
        self.sums: Dict[str, Dict[str, paddle.Tensor]] = {k: {} for k in self.kinds}
        self.batches: Dict[str, Dict[str, int]] = {k: {} for k in self.kinds}
        self._handles: List = []
        self._snapshot: Optional[Dict[str, Dict[str, np.ndarray]]] = None

    # -- hooks ------------------------------------------------------------------------------
    def start(self) -> "ImportanceStats":
        """Install the hooks (again after `stop`: the sums go on accumulating)."""
        self.stop()
        self._snapshot = None
        if TAYLOR in self.kinds:
            for key, p in self.net.named_parameters():
                if not p.stop_gradient:
                    self._handles.append(p.register_hook(self._taylor_hook(key, p)))
        if ACTIVATION in self.kinds:
            for path, layer in self.net.named_sublayers():
                w = getattr(layer, "weight", None)
                if isinstance(w, paddle.Tensor) and len(w.shape) >= 1:
                    key = f"{path}.weight"
                    self._handles.append(layer.register_forward_post_hook(
                        self._activation_hook(key, layer, _channel_axis(layer))))
        return self

    def stop(self) -> None:
        """Remove the hooks; the sums are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _add(self, kind: str, key: str, value: paddle.Tensor) -> None:
        sums = self.sums[kind]
        if key in sums and sums[key].shape != value.shape:  # pruned since: start over
            del sums[key]
            self.batches[kind][key] = 0
        sums[key] = value if key not in sums else sums[key] + value
        self.batches[kind][key] = self.batches[kind].get(key, 0) + 1

    def _taylor_hook(self, key: str, p: paddle.Tensor) -> Callable:
        def hook(grad: paddle.Tensor) -> None:
            if not self.net.training:
                return None
            with paddle.no_grad():
                scale = float(self.grad_scale()) if self.grad_scale is not None else 1.0
                self._add(TAYLOR, key, (p.detach().astype("float32")
                                        * grad.detach().astype("float32")).abs() / scale)
            return None
        return hook

    def _activation_hook(self, key: str, owner: nn.Layer, axis: int) -> Callable:
        def hook(layer: nn.Layer, inputs, output) -> None:
            if layer is not owner:  # a deep copy of the network (a trial prune) carries the hook
                return None
            if not layer.training or not isinstance(output, paddle.Tensor) or len(output.shape) < 2:
                return None
            with paddle.no_grad():
                ax = axis % len(output.shape)
                dims = [d for d in range(len(output.shape)) if d != ax]
                self._add(ACTIVATION, key, output.detach().astype("float32").abs().mean(axis=dims))
            return None
        return hook

    # -- results ----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Dict[str, np.ndarray]]:
        """kind -> parameter key -> statistic: Taylor sums (shape of the parameter) and mean
        activations (one per output channel), summed over processes (a collective: every rank
        calls it at the same point)."""
        if self._snapshot is not None:
            return self._snapshot
        out: Dict[str, Dict[str, np.ndarray]] = {}
        for kind in self.kinds:
            out[kind] = {}
            for key in sorted(self.sums[kind]):
                t = self.sums[kind][key]
                if kind == ACTIVATION:
                    t = t / max(self.batches[kind][key], 1)
                if world_size() > 1:
                    t = t.clone()
                    paddle.distributed.all_reduce(t)
                out[kind][key] = t.numpy().astype(np.float64)
        self._snapshot = out
        return out

    def tensor(self, kind: str, key: str) -> np.ndarray:
        """The statistic `kind` of parameter `key`.

        Raises:
            ValueError: nothing was gathered for it (no training step ran with the hooks on).
        """
        stats = self.snapshot().get(kind, {})
        if key not in stats:
            raise ValueError(
                f"no {kind!r} statistics for {key!r}: the criterion needs training steps run "
                f"with ImportanceStats hooks on (FilterPruneCallback gathers them during its "
                f"pruning epoch; by hand: stats.start(), train, stats.stop())")
        return stats[key]
