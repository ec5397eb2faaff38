"""The Hydra app behind `train.py`: config schema and checks, `train(cfg)`, measurements, reporting.

The top layer: it may import the callbacks and the engine; nothing in the package imports it.
"""
from .artefacts import InferenceExport, OnnxExport, ResumePoint
from .model import build_model, build_network, check_network
from .phases import Diverged, DivergenceGuard, PhaseClock, PhaseMark, TrainSpan, evaluate_net
from .report import (RESULTS_FILE, SWEEP_COLUMNS, SWEEP_CSV, MultirunResultsTable, collect_results,
                     format_results, format_sweep)
from .resume import ResumeState, find_resume_point
from .run import Run, app_rank, build_callbacks, build_prune_callbacks, train
from .schema import Config, ConfigError, DataConf, DistillConf, PruneConf, TrainerConf, validate_config

__all__ = [
    "train", "validate_config", "ConfigError", "Config", "DataConf", "DistillConf", "PruneConf",
    "TrainerConf", "Run", "app_rank", "build_model", "build_network", "check_network",
    "build_prune_callbacks", "build_callbacks", "evaluate_net", "PhaseClock", "PhaseMark", "TrainSpan",
    "Diverged", "DivergenceGuard", "InferenceExport", "OnnxExport", "ResumePoint",
    "ResumeState", "find_resume_point", "collect_results", "format_results", "format_sweep",
    "MultirunResultsTable", "RESULTS_FILE", "SWEEP_CSV", "SWEEP_COLUMNS",
]
