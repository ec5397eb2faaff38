"""Callbacks that write the run's artefacts when fit ends: the pruned checkpoint, the inference model.

Built from conf/callbacks/{checkpoint,export}.yaml. They only save; the plans come from the
model's PruneHistory, which FilterPruneCallback fills.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import paddle

from ..io import export, save_pruned

PathLike = Union[str, "os.PathLike[str]"]


def _check_path(path: PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path={path!r} must be a non-empty file prefix such as 'checkpoint/pruned'")
    return os.fspath(path)


class PrunedCheckpoint(paddle.callbacks.Callback):
    """When fit ends, `save_pruned(model, path, plans)`: weights, optimizer and plan JSON.

    Args:
        path: file prefix (`<path>.pdparams`, `.pdopt`, `.prune.json`).

    Raises:
        TypeError: `path` is not a non-empty path.

    Examples:
        >>> model.fit(train_ds, epochs=3, callbacks=[pruner, PrunedCheckpoint("ckpt/pruned")])
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = _check_path(path)

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        save_pruned(self.model, self.path)  # with the plans recorded on the model


class InferenceExport(paddle.callbacks.Callback):
    """When fit ends, `export` the network for inference, with the model's input spec.

    Args:
        path: file prefix of the exported model (`<path>.json`/`.pdmodel`, `.pdiparams`).

    Raises:
        TypeError: `path` is not a non-empty path.

    Examples:
        >>> model.fit(train_ds, epochs=3, callbacks=[pruner, InferenceExport("inference/model")])
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = _check_path(path)

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        export(self.model.network, self.path, self.model._inputs)
