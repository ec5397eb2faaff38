"""The app's unlucky moments and distillation in the app.

A diverged run stops, says so and writes valid JSON; a GPU on a CPU build, an unwritable output dir,
an unknown `prune.skip` group and `prune.steps` past the last epoch stop before the first batch with
one-line config errors; swapping only `model._target_` works.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import paddle
import pytest

import prune_callbacks
from prune_callbacks.app import ConfigError, train
from prune_callbacks.app.run import prepare
from prune_callbacks.app.schema import validate_config
from app_helpers import ROOT, SMALL, make_cfg


@pytest.fixture
def no_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of paddle.Model.fit fails the test: the error must come before training."""

    def fit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fit was called: the config error came after training had started")

    monkeypatch.setattr(paddle.Model, "fit", fit)


def _no_nan(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in results.json: not valid JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverged_run_stops_and_writes_valid_json(tmp_path: Path, caplog: Any, capsys: Any) -> None:
    with caplog.at_level(logging.ERROR):
        results = train(make_cfg([*SMALL, "optim.learning_rate=1e6", "callbacks=none"], tmp_path))
    assert results["diverged"] is not None and results["diverged"]["epoch"] in (0, 1)
    assert results["diverged"]["loss"] in ("nan", "inf", "-inf")
    assert results["top1_finetuned"] is None and results["loss_finetuned"] is None  # never fine-tuned
    assert results["time_total_s"] > 0
    saved = _no_nan((tmp_path / "results.json").read_text())
    assert saved["diverged"]["step"] == results["diverged"]["step"]
    assert any("training diverged" in r.getMessage() and "optim.learning_rate" in r.getMessage()
               for r in caplog.records)
    assert "DIVERGED: the training loss became" in capsys.readouterr().out


def test_diverged_cli_exits_3_with_the_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "optim.learning_rate=1e6", "callbacks=none",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "DIVERGED" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    _no_nan((tmp_path / "results.json").read_text())


def test_a_finite_run_is_not_flagged(tmp_path: Path) -> None:
    results = train(make_cfg([*SMALL, "prune.strategy=uniform", "callbacks=none"], tmp_path))
    assert results["diverged"] is None and results["top1_finetuned"] is not None
    _no_nan((tmp_path / "results.json").read_text())


@pytest.mark.parametrize("overrides, message", [
    (["trainer.device=gpu"], r"^trainer\.device='gpu': this Paddle build has no CUDA support .*use trainer\.device=cpu"),
    (["trainer.device=gpu:1"], r"^trainer\.device='gpu:1': this Paddle build has no CUDA"),
    (["prune.skip=[conv99]"], r"^prune\.skip=\['conv99'\]: .*conv99"),
    (["prune.steps=3"], r"^prune\.steps=3: pruning at the end of epochs 0\.\.2 runs past the last epoch 1 .*"
                        r"raise trainer\.epochs_after to at least 2"),
    (["prune.at_epoch=0", "trainer.epochs_after=2", "prune.steps=4"], r"^prune\.steps=4: .*epochs 0\.\.3"),
])
def test_errors_before_the_first_batch(no_fit: None, tmp_path: Path, overrides: List[str], message: str) -> None:
    if overrides[0].startswith("trainer.device=gpu") and paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle build has CUDA")
    with pytest.raises(ConfigError, match=message) as info:
        train(make_cfg([*SMALL, *overrides, "callbacks=none"], tmp_path))
    assert "\n" not in str(info.value)


def test_unwritable_output_dir_is_a_config_error(no_fit: None, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir='.*a_file/run' cannot be written \(.*\); choose a "
                                          r"writable directory with output_dir="):
        train(make_cfg([*SMALL, "callbacks=none"], blocker / "run"))
    if os.geteuid() == 0:
        return  # root writes into read-only directories: only the case above can be shown
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"output_dir='.*locked' cannot be written \(PermissionError"):
        train(make_cfg([*SMALL, "callbacks=none"], locked))


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "prune.skip=[conv99]", "callbacks=none",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "config error: prune.skip=['conv99']: " in out, out[-2000:]
    assert "Traceback" not in out and "Epoch 1/" not in out


def test_swapping_only_the_model_target_drops_the_old_models_arguments(tmp_path: Path, caplog: Any) -> None:
    """The README's `model._target_=paddle.vision.models.resnet34`: MobileNet's scale is not passed on."""
    with caplog.at_level(logging.INFO):
        results = train(make_cfg([*[o for o in SMALL if not o.startswith("model.")], "data.train_samples=32",
                                  "data.val_samples=16", "model._target_=paddle.vision.models.resnet34",
                                  "prune.strategy=uniform", "callbacks=none"], tmp_path))
    assert results["model"] == "resnet34" and results["flops_after"] < results["flops_before"]
    assert any("model.scale=1.0 (a default of another model config) is not an argument of "
               "paddle.vision.models.resnet34: dropped" in r.getMessage() for r in caplog.records)
    # a value the user changed is not dropped: it is an error naming it
    with pytest.raises(ConfigError, match=r"model\._target_='paddle\.vision\.models\.resnet34' could not be built "
                                          r"from model\.\{num_classes, scale, pretrained\} .*scale=0\.5.*'scale'"):
        train(make_cfg(["model._target_=paddle.vision.models.resnet34", "model.scale=0.5", "callbacks=none"],
                       tmp_path))


# ------------------------------------------------------------------ distillation


def test_distill_callback_is_added_after_the_pruner(tmp_path: Path) -> None:
    cfg = validate_config(make_cfg([*SMALL, "prune.distill.alpha=0.7", "prune.distill.temperature=2",
                                    "callbacks=none"], tmp_path))
    run = prepare(cfg)
    kinds = [type(c) for c in run.callbacks]
    distill = run.callbacks[kinds.index(prune_callbacks.DistillCallback)]
    assert kinds.index(prune_callbacks.FilterPruneCallback) < kinds.index(prune_callbacks.DistillCallback)
    assert (distill.alpha, distill.temperature) == (0.7, 2.0) and run.distill is distill
    for off in ("null", "0"):
        run = prepare(validate_config(make_cfg([*SMALL, f"prune.distill.alpha={off}", "callbacks=none"], tmp_path)))
        assert not any(isinstance(c, prune_callbacks.DistillCallback) for c in run.callbacks), off


def test_distill_arguments_are_checked_with_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^prune\.distill\.alpha=1\.5: alpha must be a number in \[0, 1\]"):
        train(make_cfg([*SMALL, "prune.distill.alpha=1.5"], tmp_path))
    with pytest.raises(ConfigError, match=r"^prune\.distill\.temperature=0\.0: temperature must be a number > 0"):
        train(make_cfg([*SMALL, "prune.distill.alpha=0.5", "prune.distill.temperature=0"], tmp_path))
    with pytest.raises(ConfigError, match=r"prune\.distill\.alpah is not a known key; allowed keys in "
                                          r"prune\.distill: alpha, temperature"):
        train(make_cfg([*SMALL, "+prune.distill.alpah=0.5"], tmp_path))


def test_a_run_with_distillation_completes(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.INFO):
        results = train(make_cfg([*SMALL, "prune.strategy=uniform", "prune.distill.alpha=0.5", "callbacks=none"],
                                 tmp_path))
    assert results["distill_alpha"] == 0.5 and results["top1_finetuned"] is not None
    assert results["flops_after"] < results["flops_before"]
    assert any("distillation on: teacher is the unpruned network (alpha 0.50, T 4.0)" in r.getMessage()
               for r in caplog.records)
