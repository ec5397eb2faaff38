"""Callbacks that write the run's artefacts: the inference model when fit ends, a resume point after
every epoch (the pruned checkpoint is `prune_callbacks.PrunedModelCheckpoint`).

Built from conf/callbacks/{export,export_onnx,resume}.yaml. They only save; the plans come from
the plans recorded on the network.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import paddle

from ..training.distributed import is_main
from ..deploy.io import export, save_pruned
from ..utils.files import write_json_atomic

PathLike = Union[str, "os.PathLike[str]"]


def _check_path(path: PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path={path!r} must be a non-empty file prefix such as 'inference/model'")
    return os.fspath(path)


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
        if is_main():
            export(self.model.network, self.path, self.model._inputs)


STATE_SUFFIX = ".state.json"


class ResumePoint(paddle.callbacks.Callback):
    """After every epoch, save what `trainer.resume` needs to continue the run: weights, optimizer,
    plans (`save_pruned`) and `<path>.state.json` (epochs done, the phase figures so far).

    `save_pruned` replaces each file atomically (the plans after the weights) and the state file
    comes last, so a kill leaves every file whole. Only rank 0 writes.

    Args:
        path: file prefix, e.g. `<output_dir>/resume/last`.

    Raises:
        TypeError: `path` is not a non-empty path.

    Examples:
        >>> model.fit(train_ds, epochs=3, callbacks=[pruner, ResumePoint("run/resume/last")])
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = _check_path(path)
        self.offset = 0  # epochs done before this fit (a resumed run)
        self.extra: Callable[[], Dict[str, Any]] = dict  # more state, e.g. the phase figures

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if not is_main():
            return
        save_pruned(self.model, self.path)  # with the plans recorded on the model
        state = {"producer": "prune_callbacks.app", "epochs_done": self.offset + epoch + 1, **self.extra()}
        write_json_atomic(self.path + STATE_SUFFIX, state)


class OnnxExport(InferenceExport):
    """When fit ends, export the network to ONNX (`<path>.onnx`; needs `pip install -e ".[onnx]"`).

    Examples:
        >>> model.fit(train_ds, epochs=3, callbacks=[pruner, OnnxExport("inference/model")])
    """

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if is_main():
            export(self.model.network, self.path, self.model._inputs, format="onnx")
