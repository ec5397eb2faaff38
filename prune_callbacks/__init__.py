"""Structured filter pruning for PaddlePaddle, as paddle.Model.fit callbacks and as an engine."""
from .callbacks import (DistillCallback, FilterPruneCallback, PruneEvent, PruneHistory,
                        PrunedModelCheckpoint, PruneVisualDL, SensitivityCallback, history_of)
from .layers.flops import count_flops, count_params
from .graph.channels import Group
from .planning.importance import register_criterion
from .layers.registry import LayerPruning, register_layer_type
from .deploy.io import (export, load_pruned, read_plans, reapply_plan, save_pruned, track_plans)
from .utils.modes import eval_mode
from .training.optim import rebuild_optimizer, register_optimizer
from .planning.plans import GroupPlan, PrunePlan, record_plan, recorded_plans
from .planning.allocation import PlanGroup, plan_group_ratios
from .pruner import FilterPruner
from .sensitivity import EvalData, SensitivityResult, register_output_axis
from .layers.surgery import register_layer
from .graph.tracing import register_op
from .layers.flops import register_flops
from .deploy.shapes import prune_to_state_dict
from .sensitivity.evaluation import loss_metric

__all__ = [
    "FilterPruner", "PrunePlan", "GroupPlan", "Group", "SensitivityResult", "EvalData",
    "count_flops", "count_params", "register_criterion", "register_layer", "rebuild_optimizer",
    "SensitivityCallback", "FilterPruneCallback", "DistillCallback", "PruneVisualDL",
    "PruneHistory", "PruneEvent",
    "history_of", "save_pruned", "load_pruned", "export", "record_plan", "track_plans",
    "read_plans", "recorded_plans", "reapply_plan", "register_optimizer", "register_output_axis",
    "PrunedModelCheckpoint", "PlanGroup", "plan_group_ratios", "eval_mode", "LayerPruning",
    "register_layer_type", "register_op", "register_flops",
    "prune_to_state_dict", "loss_metric",
]
