"""paddle.Model.fit callbacks: sensitivity at an epoch, pruning to a FLOPs target, VisualDL,
distillation after pruning, checkpoints with their plans."""
from .checkpoint import PrunedModelCheckpoint
from .distill import DistillCallback, distill_loss
from .history import PruneEvent, PruneHistory, history_of
from .prune import FilterPruneCallback
from .sensitivity import SensitivityCallback
from .sparsity import SparsityCallback
from .visualdl import PruneVisualDL

__all__ = ["SensitivityCallback", "FilterPruneCallback", "PruneVisualDL", "DistillCallback",
           "distill_loss", "PruneHistory", "PruneEvent", "history_of", "PrunedModelCheckpoint",
           "SparsityCallback"]
