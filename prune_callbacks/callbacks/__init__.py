"""paddle.Model.fit callbacks: sensitivity at an epoch, pruning to a FLOPs target, VisualDL."""
from .distill import DistillCallback, distill_loss
from .history import PruneEvent, PruneHistory, history_of
from .prune import FilterPruneCallback
from .sensitivity import SensitivityCallback
from .visualdl import PruneVisualDL

__all__ = ["DistillCallback", "distill_loss", "SensitivityCallback", "FilterPruneCallback", "PruneVisualDL", "PruneHistory",
           "PruneEvent", "history_of"]
