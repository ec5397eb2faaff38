"""What the pruning callbacks did during a fit, kept on the model so other callbacks can read it.

Paddle's callbacks do not see each other; the sensitivity and pruning callbacks publish here and
PruneVisualDL (or a user) reads from here. Plain data only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from ..planning.plans import PrunePlan
from ..sensitivity import SensitivityResult

_ATTR = "_prune_history"


@dataclass(frozen=True)
class PruneEvent:
    """One pruning step: at the end of `epoch`'s training, `plan` was applied aiming to have
    removed `flops` by then: a share of the FLOPs before its callback's first step (for a second
    FilterPruneCallback in the same fit, of the network as the first one left it)."""

    epoch: int
    step: int
    flops: float
    plan: PrunePlan

    @property
    def target(self) -> float:
        """The former name of `flops`, kept for readers written against it."""
        return self.flops


@dataclass(frozen=True)
class SensitivityFallback:
    """The sensitivity analysis could not use its metric and fell back: to `to` ("loss": the
    evaluation loss; "uniform": no curves, one ratio everywhere), because of `reason`."""

    metric: str  # the metric that failed: "top1", "loss" or "custom"
    to: str
    reason: str

    def to_dict(self) -> dict:
        return {"metric": self.metric, "to": self.to, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.metric} -> {self.to}: {self.reason}"


@dataclass
class PruneHistory:
    sensitivity: Optional[SensitivityResult] = None
    sensitivity_epoch: Optional[int] = None
    # what the analysis fell back to when its metric could not resolve the losses, in order
    sensitivity_fallbacks: List[SensitivityFallback] = field(default_factory=list)
    events: List[PruneEvent] = field(default_factory=list)
    # called with the paddle.Model just before each pruning step's surgery (e.g. DistillCallback
    # keeps the unpruned network as its teacher)
    before_prune: List[Callable[[Any], None]] = field(default_factory=list)


def history_of(model: Any) -> PruneHistory:
    """The PruneHistory attached to a paddle.Model (created empty on first use)."""
    hist = getattr(model, _ATTR, None)
    if hist is None:
        hist = PruneHistory()
        setattr(model, _ATTR, hist)
    return hist
