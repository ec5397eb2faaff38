"""Structured filter pruning for PaddlePaddle, as paddle.Model.fit callbacks and as an engine."""
from .callbacks import (DistillCallback, FilterPruneCallback, PruneEvent, PruneHistory, PruneVisualDL,
                        SensitivityCallback, history_of)
from .flops import count_flops, count_params
from .graph import Group
from .importance import register_criterion
from .io import export, load_pruned, read_plans, record_plan, save_pruned, track_plans
from .optim import rebuild_optimizer
from .plan import GroupPlan, PrunePlan
from .pruner import FilterPruner
from .sensitivity import EvalData, SensitivityResult
from .surgery import register_layer

__all__ = [
    "FilterPruner", "PrunePlan", "GroupPlan", "Group", "SensitivityResult", "EvalData",
    "count_flops", "count_params", "register_criterion", "register_layer", "rebuild_optimizer",
    "SensitivityCallback", "FilterPruneCallback", "DistillCallback", "PruneVisualDL", "PruneHistory", "PruneEvent",
    "history_of", "save_pruned", "load_pruned", "export", "record_plan", "track_plans",
    "read_plans",
]
