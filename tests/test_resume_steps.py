"""A run with `prune.steps > 1` resumed between two of its steps (from its resume point) continues toward the same
final plan and ends with the same weights as the uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import paddle
import pytest

from test_image_folder import folder_cfg, image_folder  # noqa: F401  (the fixture, and its config)

from prune_callbacks.app import ConfigError, train


class StopAfter(paddle.callbacks.Callback):
    """Interrupts fit at the end of epoch `epoch` (after the callbacks listed before it saved)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"stopped after epoch {epoch}")


def _weights(run: Path) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in paddle.load(str(run / "resume" / "last.pdparams")).items()}


def test_resume_between_pruning_steps_equals_an_uninterrupted_run(image_folder: Path, tmp_path: Path) -> None:
    base = [f"data.path={image_folder}", "prune.strategy=uniform", "prune.steps=3", "trainer.epochs_before=1",
            "trainer.epochs_after=2", "trainer.batch_size=64",  # one batch per epoch: the order cannot matter
            "data.augment=false"]  # nor random crops: the resumed run draws other random numbers
    whole = train(folder_cfg([*base, "callbacks=[none,resume]"], tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):  # killed after step 2 of 3 (end of epoch 1)
        train(folder_cfg([*base, "callbacks=[none,resume]", "+callbacks.stop._target_=test_resume_steps.StopAfter",
                          "+callbacks.stop.epoch=1"], tmp_path / "cut"))
    state = json.loads((tmp_path / "cut" / "resume" / "last.state.json").read_text())
    assert state["epochs_done"] == 2 and state["prune_steps"]["steps_done"] == 2
    again = train(folder_cfg([*base, "callbacks=[none,resume]", f"trainer.resume={tmp_path / 'cut'}"],
                             tmp_path / "again"))
    assert again["resumed_at_epoch"] == 2
    assert (again["flops_before"], again["flops_after"]) == (whole["flops_before"], whole["flops_after"])
    assert again["ratios"] == whole["ratios"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "again")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)

    # a paddle ModelCheckpoint between steps holds no final plan: refused, saying what to resume from
    (tmp_path / "cut" / "resume" / "last.state.json").write_text(json.dumps({"epochs_done": 2}))
    with pytest.raises(ConfigError, match=r"between two of its 3 pruning steps \(after step 2\).*final plan"):
        train(folder_cfg([*base, f"trainer.resume={tmp_path / 'cut'}"], tmp_path / "third"))
