"""Structured filter pruning for PaddlePaddle, as paddle.Model.fit callbacks and as an engine.

The names here are the public API (see docs/reference.md); everything else is importable from its
package (`prune_callbacks.graph`, `.layers`, `.planning`, ...) but may change between 0.x releases.
"""
# callbacks for paddle.Model.fit
from .callbacks import (DistillCallback, FilterPruneCallback, PrunedModelCheckpoint, PruneVisualDL,
                        SensitivityCallback, history_of)
# the engine
from .pruner import FilterPruner
from .layers.flops import count_flops, count_params
from .planning.plans import PrunePlan, record_plan, recorded_plans
from .sensitivity import EvalData, SensitivityResult
from .training.optim import rebuild_optimizer
from .deploy.io import export, load_pruned, reapply_plan, save_pruned
from .deploy.latency import LatencyOptions
# extension points: one registration function each
from .layers.registry import LayerPruning, register_layer_type
from .graph.tracing import register_op
from .planning.importance import register_criterion
from .training.optim import register_optimizer
from .deploy.shapes import prune_to_state_dict
from .sensitivity.evaluation import loss_metric

__all__ = [
    "SensitivityCallback", "FilterPruneCallback", "DistillCallback", "PruneVisualDL",
    "PrunedModelCheckpoint", "history_of",
    "FilterPruner", "count_flops", "count_params", "PrunePlan", "record_plan", "recorded_plans",
    "EvalData", "SensitivityResult", "rebuild_optimizer",
    "save_pruned", "load_pruned", "reapply_plan", "export", "LatencyOptions",
    "LayerPruning", "register_layer_type", "register_op", "register_criterion", "register_optimizer",
    "prune_to_state_dict", "loss_metric",
]
