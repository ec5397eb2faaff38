"""Sensitivity analysis: the accuracy lost when each group loses its weakest channels.

Split by concern: `result` (the result type and its JSON file), `evaluation` (the data and
metric), `replay` (the engine that evaluates masked variants fast), `analysis` (the driver).
Pure engine code: never keeps a change to the network, never touches paddle.Model or VisualDL.
"""
from .analysis import SensitivityPruner, UnresolvableMetric, check_ratios, analyse
from .evaluation import EvalData, Metric, loss_metric, top1_metric
from .replay import Runner
from .result import DEFAULT_RATIOS, FORMAT, SensitivityResult

__all__ = ["SensitivityResult", "EvalData", "Metric", "DEFAULT_RATIOS", "FORMAT", "top1_metric",
           "analyse", "SensitivityPruner", "Runner", "check_ratios", "loss_metric", "UnresolvableMetric"]
