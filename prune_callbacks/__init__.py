"""Structured filter pruning for PaddlePaddle, as paddle.Model.fit callbacks and as an engine."""
from .flops import count_flops, count_params
from .graph import Group
from .importance import register_criterion
from .plan import GroupPlan, PrunePlan
from .pruner import FilterPruner
from .sensitivity import SensitivityResult
from .surgery import register_layer

__all__ = [
    "FilterPruner", "PrunePlan", "GroupPlan", "Group", "SensitivityResult", "count_flops",
    "count_params", "register_criterion", "register_layer",
]
