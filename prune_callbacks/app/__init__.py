"""The Hydra app behind `train.py`: config schema and checks, `train(cfg)`, measurements, reporting.

The top layer: it may import the callbacks and the engine; nothing in the package imports it.
"""
from .artefacts import InferenceExport, PrunedCheckpoint
from .phases import PhaseClock, PhaseMark, TrainSpan, evaluate_net
from .report import (RESULTS_FILE, SWEEP_COLUMNS, SWEEP_CSV, MultirunResultsTable, collect_results,
                     format_results, format_sweep)
from .run import Run, build_callbacks, build_model, build_prune_callbacks, train
from .schema import Config, ConfigError, DataConf, PruneConf, TrainerConf, validate_config

__all__ = [
    "train", "validate_config", "ConfigError", "Config", "DataConf", "PruneConf", "TrainerConf",
    "Run", "build_model", "build_prune_callbacks", "build_callbacks", "evaluate_net", "PhaseClock",
    "PhaseMark", "TrainSpan", "PrunedCheckpoint", "InferenceExport", "collect_results",
    "format_results", "format_sweep", "MultirunResultsTable", "RESULTS_FILE", "SWEEP_CSV",
    "SWEEP_COLUMNS",
]
