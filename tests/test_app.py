"""Tests of the Hydra app: the real conf/ composed and checked, train(cfg) end to end, the CLI.

Runs are shrunk to a few dozen digits, MobileNetV1 at scale 0.25 and one epoch per phase.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import paddle
import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import prune_callbacks
from prune_callbacks.planning.plans import recorded_plans
from prune_callbacks.app import (SWEEP_COLUMNS, ConfigError, InferenceExport,
                                 ResumePoint, build_callbacks, evaluate_net, format_sweep, train, validate_config)
from prune_callbacks.planning.importance import get_criterion

from app_helpers import ROOT, SMALL, make_cfg


def _chain(exc: BaseException) -> str:
    """The message of an exception and of its causes (Hydra wraps OmegaConf's errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ------------------------------------------------------------------ config: composition


def test_default_config_composes_and_validates() -> None:
    cfg = validate_config(make_cfg())
    assert cfg.model._target_ == "paddle.vision.models.mobilenet_v1"
    assert cfg.model.num_classes == cfg.data.num_classes == 10
    assert cfg.data.name == "digits" and cfg.optim._partial_ is True
    assert cfg.prune.flops == 0.4 and cfg.prune.criterion == "l1"
    assert cfg.prune.strategy == "sensitivity" and cfg.prune.at_epoch is None
    assert list(cfg.prune.ratios) == pytest.approx([0.1 * i for i in range(1, 10)])
    assert cfg.trainer.device == "cpu" and cfg.trainer.num_workers == 0


@pytest.mark.parametrize("model", ["mobilenet_v1", "mobilenet_v2", "resnet18", "resnet50", "vgg16"])
def test_every_model_option_validates(model: str) -> None:
    cfg = validate_config(make_cfg([f"model={model}"]))
    assert cfg.model._target_ == f"paddle.vision.models.{model}"


def test_data_and_optim_options_validate() -> None:
    cfg = validate_config(make_cfg(["data=cifar10"]))
    assert cfg.data.name == "cifar10" and cfg.data.train._target_.endswith("cifar10_dataset")
    cfg = validate_config(make_cfg(["data=synthetic"]))
    assert cfg.data.name == "synthetic" and cfg.data.val.num_samples == 64
    cfg = validate_config(make_cfg(["optim=adam"]))
    assert cfg.optim._target_ == "paddle.optimizer.Adam" and cfg.optim._partial_
    cfg = validate_config(make_cfg(["callbacks=none"]))
    assert dict(cfg.callbacks) == {}
    cfg = validate_config(make_cfg(["prune.strategy=uniform", "prune.criterion=fpgm"]))
    assert (cfg.prune.strategy, cfg.prune.criterion) == ("uniform", "fpgm")


def test_optimizer_is_partial_and_builds_over_parameters() -> None:
    from hydra.utils import instantiate

    net = paddle.nn.Linear(2, 2)
    for name, cls in (("momentum", paddle.optimizer.Momentum), ("adam", paddle.optimizer.Adam)):
        cfg = validate_config(make_cfg([f"optim={name}"]))
        assert isinstance(instantiate(cfg.optim)(parameters=net.parameters()), cls)


def test_datasets_instantiate_from_config() -> None:
    from hydra.utils import instantiate

    cfg = validate_config(make_cfg(["data=synthetic", "data.image_size=16"]))
    image, label = instantiate(cfg.data.val)[0]
    assert image.shape == (3, 16, 16) and label.shape == (1,)


# ------------------------------------------------------------------ config: callbacks, one config each


def _built(overrides: Sequence[str], tmp_path: Path) -> List[paddle.callbacks.Callback]:
    cfg = validate_config(make_cfg(overrides, tmp_path))
    return build_callbacks(cfg)


def test_default_callbacks_are_built_from_their_configs(tmp_path: Path) -> None:
    built = _built([], tmp_path)
    assert [type(c) for c in built] == [prune_callbacks.PruneVisualDL, paddle.callbacks.VisualDL,
                                        prune_callbacks.PrunedModelCheckpoint, InferenceExport, ResumePoint]
    assert built[0].log_dir == str(tmp_path / "vdl_log")
    assert built[2].save_dir == str(tmp_path / "checkpoint") and built[2].save_freq == 0
    assert built[3].path == str(tmp_path / "inference" / "model")
    assert built[4].path == str(tmp_path / "resume" / "last")


def test_callbacks_turn_off_one_by_one_or_all(tmp_path: Path) -> None:
    for off in ("callbacks.visualdl=false", "callbacks.visualdl=null", "~callbacks.visualdl"):
        types = [type(c) for c in _built([off], tmp_path)]
        assert types == [paddle.callbacks.VisualDL, prune_callbacks.PrunedModelCheckpoint, InferenceExport,
                         ResumePoint], off
    assert _built(["callbacks=none"], tmp_path) == []


def test_paddle_callbacks_are_added_from_the_command_line(tmp_path: Path) -> None:
    built = _built(["callbacks=[default,early_stopping,model_checkpoint]",
                    "callbacks.early_stopping.patience=5"], tmp_path)
    assert len(built) == 7
    stop, ckpt = built[5], built[6]
    assert isinstance(stop, paddle.callbacks.EarlyStopping) and stop.patience == 5 and stop.monitor == "loss"
    assert isinstance(ckpt, paddle.callbacks.ModelCheckpoint) and ckpt.save_dir == str(tmp_path / "checkpoints")
    only = _built(["callbacks=[none,early_stopping]"], tmp_path)
    assert [type(c) for c in only] == [paddle.callbacks.EarlyStopping]


def test_a_callback_that_cannot_be_built_names_its_key(tmp_path: Path) -> None:
    cfg = validate_config(make_cfg(["callbacks=[none,early_stopping]", "+callbacks.early_stopping.bogus=1"],
                                   tmp_path))
    with pytest.raises(ConfigError, match=r"(?s)callbacks\.early_stopping \(paddle\.callbacks\.EarlyStopping\) "
                                          r"could not be built: .*bogus"):
        build_callbacks(cfg)
    cfg = validate_config(make_cfg(["callbacks.visualdl._target_=builtins.dict"], tmp_path))
    with pytest.raises(ConfigError, match=r"callbacks\.visualdl\._target_='builtins\.dict' returned dict, "
                                          r"not a paddle\.callbacks\.Callback"):
        build_callbacks(cfg)


def test_cli_adds_paddle_early_stopping(tmp_path: Path) -> None:
    """`'callbacks=[...,early_stopping]'` on the command line: paddle's EarlyStopping stops the fit.

    min_delta=10 makes every evaluation after the first "no improvement", so with patience 1 fit
    stops after the second of three epochs (pruning was at the end of the first).
    """
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "trainer.epochs_after=2", "trainer.verbose=2",
         "prune.strategy=uniform", "callbacks=[none,early_stopping]", "callbacks.early_stopping.patience=1",
         "callbacks.early_stopping.min_delta=10", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 2: Early stopping." in proc.stdout
    assert "Epoch 2/3" in proc.stdout and "Epoch 3/3" not in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["flops_after"] < results["flops_before"]


# ------------------------------------------------------------------ config: errors, one by one


def test_wrong_type_is_rejected_at_composition() -> None:
    with pytest.raises(ConfigCompositionException, match=r"trainer\.epochs_before=abc") as info:
        make_cfg(["trainer.epochs_before=abc"])
    assert "'abc' of type 'str' could not be converted to Integer" in _chain(info.value)
    assert "full_key: trainer.epochs_before" in _chain(info.value)


def test_wrong_type_is_rejected_by_train_for_a_hand_made_config(tmp_path: Path) -> None:
    raw = OmegaConf.to_container(make_cfg(), enum_to_str=True)
    raw["trainer"]["batch_size"] = "big"
    with pytest.raises(ValidationError, match=r"(?s)'big'.*could not be converted to Integer.*trainer\.batch_size"):
        train(OmegaConf.create(raw))


def test_unknown_key_is_rejected_at_composition() -> None:
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'prune\.flop'") as info:
        make_cfg(["prune.flop=0.5"])
    assert "Key 'flop' not in 'PruneConf'" in _chain(info.value)


def test_unknown_key_added_with_plus_is_rejected_by_train() -> None:
    with pytest.raises(ConfigError, match=r"prune\.flop is not a known key; allowed keys in prune: flops,"):
        train(make_cfg(["+prune.flop=0.5"]))
    with pytest.raises(ConfigError, match=r"trainer\.lr is not a known key"):
        train(make_cfg(["+trainer.lr=0.1"]))


@pytest.mark.parametrize("flops", ["1.5", "0", "-0.2", "1.0"])
def test_flops_out_of_range(flops: str) -> None:
    with pytest.raises(ConfigError, match=rf"^prune\.flops={float(flops)}: flops must be .*in \(0, 1\)"):
        train(make_cfg([f"prune.flops={flops}"]))


def test_unknown_model_lists_the_options() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'model/alexnet'.*mobilenet_v1.*vgg16"):
        make_cfg(["model=alexnet"])
    with pytest.raises(
        ConfigError,
        match=r"model\._target_='paddle\.vision\.models\.nope' cannot be imported.*mobilenet_v1, mobilenet_v2",
    ):
        train(make_cfg(["model._target_=paddle.vision.models.nope"]))


def test_bad_model_argument_names_the_model_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?s)could not be built from model\.\{.*foo\}.*unexpected keyword"):
        train(make_cfg(["+model.foo=1", *SMALL], tmp_path))


@pytest.mark.parametrize("strategy", ["sensitivity", "uniform"])
def test_unknown_criterion_lists_the_criteria(strategy: str) -> None:
    with pytest.raises(ConfigError, match=r"prune\.criterion='l3': unknown criterion 'l3'") as info:
        train(make_cfg(["prune.criterion=l3", f"prune.strategy={strategy}"]))
    assert "['activation', 'bn_scale', 'fpgm', 'group_l2', 'l1', 'l2', 'random', 'taylor']" in str(info.value)


def test_unknown_strategy_lists_the_strategies() -> None:
    with pytest.raises(ConfigError, match=r"prune\.strategy='greedy': ") as info:
        train(make_cfg(["prune.strategy=greedy"]))
    assert "('sensitivity', 'uniform')" in str(info.value)


def test_a_registered_criterion_is_a_config_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The choices are the registry's, not a list of the app's: a new criterion needs no app change."""
    from prune_callbacks.planning import importance

    monkeypatch.setattr(importance, "_CRITERIA", dict(importance._CRITERIA))  # registered for this test only
    prune_callbacks.register_criterion("l1_copy", importance.l1)
    results = train(make_cfg([*SMALL, "prune.criterion=l1_copy", "prune.strategy=uniform", "callbacks=none"],
                             tmp_path))
    assert results["criterion"] == "l1_copy" and results["flops_after"] < results["flops_before"]
    assert get_criterion("l1_copy").name == "l1_copy"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prune.ratios=[0.5,1.2]"], r"prune\.ratios=\[0\.5, 1\.2\]: ratios must be .*\(0, 1\)"),
        (["prune.ratios=[]"], r"prune\.ratios=\[\]: ratios must be"),
        (["prune.steps=0"], r"prune\.steps=0: steps must be .*>= 1"),
        (["prune.round_to=0"], r"prune\.round_to=0: round_to must be .*>= 1"),
        (["prune.round_to=sixteen"], r"prune\.round_to='sixteen': round_to must be 'auto' .* or an int >= 1"),
        (["prune.runtime=tvm"], r"prune\.runtime='tvm': unknown runtime 'tvm'; choose one of \('paddle_inference'"),
        (["prune.at_epoch=-1"], r"prune\.at_epoch=-1: at_epoch must be .*>= 0"),
        (["prune.at_epoch=3"], r"prune\.at_epoch=3 must be in \[0, 2\]"),
        (["prune.max_loss=0"], r"prune\.max_loss=0\.0 must be > 0 or null"),
        (["trainer.epochs_before=0"], r"trainer\.epochs_before=0 must be >= 1"),
        (["trainer.batch_size=0"], r"trainer\.batch_size=0 must be >= 1"),
        (["trainer.device=tpu"], r"trainer\.device='tpu' is not one of cpu, gpu, gpu:N"),
        (["data=cifar10", "data.image_size=64"], r"data\.image_size=64: CIFAR-10 images are 32x32"),
        (["data.val_samples=0"], r"data\.val_samples=0 must be >= 1 or null"),
        (["optim=adam", "+optim.momentum=0.9"], r"optim\.momentum is not an argument of paddle\.optimizer\.Adam; allowed: learning_rate, beta1"),
        (["optim.learning_rate=-1"], r"optim\.learning_rate=-1 must be a positive number"),
        (["optim._partial_=false"], r"optim\._partial_ must be true"),
        (["prune.sensitivity_samples=0"], r"prune\.sensitivity_samples=0: num_samples must be a positive int"),
        (["prune.sensitivity_engine=fast"], r"prune\.sensitivity_engine='fast': engine must be one of auto, eager"),
        (["callbacks.visualdl=true"], r"callbacks\.visualdl=True is neither .*'callbacks=\[default,visualdl\]'"),
        (["callbacks.visualdl._target_=nope.Nope"], r"callbacks\.visualdl\._target_='nope\.Nope' cannot be imported"),
    ],
)
def test_range_and_name_checks(overrides: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(overrides))


def test_cli_config_error_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "prune.flops=1.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "config error: prune.flops=1.5: flops must be" in out and "(0, 1)" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------ the app, with stand-ins


class _Recorder:
    """Shared log of which hook ran when, for the stand-ins below."""

    events: List[str] = []


class _FakeSensitivity(paddle.callbacks.Callback):
    def __init__(self, eval_data: Any, at_epoch: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.at_epoch, self.kwargs, self.result = at_epoch, kwargs, None

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if epoch == self.at_epoch:
            _Recorder.events.append(f"sensitivity@{epoch}")
            self.result = {"fake": {0.3: 0.1}}


class _FakePrune(paddle.callbacks.Callback):
    """Zeroes the classifier instead of pruning, so accuracy right after 'pruning' collapses."""

    def __init__(self, flops: float = 0.4, at_epoch: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.flops, self.at_epoch, self.kwargs, self.plans = flops, at_epoch, kwargs, []

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if epoch != self.at_epoch:
            return
        from prune_callbacks.planning.plans import PrunePlan

        _Recorder.events.append(f"prune@{epoch}:{self.model.network.training}")
        for p in self.model.network.parameters():
            p.set_value(paddle.zeros_like(p))
        self.plans.append(PrunePlan(groups=(), flops_before=1000, flops_after=int(1000 * (1 - self.flops)),
                                    params_before=500, params_after=300, input_shape=(1, 3, 32, 32)))


class _FakeVisualDL(paddle.callbacks.Callback):
    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log_dir = log_dir


class _LogsSpy(paddle.callbacks.Callback):
    """Records the epoch-end logs fit hands to callbacks after ours, to prove we do not alter them."""

    seen: List[Dict[str, Any]] = []

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        _LogsSpy.seen.append({"epoch": epoch, "step": logs.get("step"), "loss": logs.get("loss")})


def _fake_save(model_or_net: Any, path_prefix: str, plans: Any = None) -> List[str]:
    plans = recorded_plans(model_or_net) if plans is None else plans  # as save_pruned does
    os.makedirs(os.path.dirname(path_prefix), exist_ok=True)
    Path(path_prefix + ".json").write_text(json.dumps(len(plans)))
    return [path_prefix + ".json"]  # like save_pruned: the files written


def _fake_export(net: Any, path_prefix: str, input_spec: Any) -> None:
    os.makedirs(os.path.dirname(path_prefix), exist_ok=True)
    Path(path_prefix + ".pdmodel").write_text("x")


def test_train_plumbing_with_stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """The app's own logic (ordering, probes, timings, table, JSON) against stand-in callbacks."""
    from prune_callbacks.app import artefacts
    from prune_callbacks.app import run

    monkeypatch.setattr(run, "SensitivityCallback", _FakeSensitivity)
    monkeypatch.setattr(run, "FilterPruneCallback", _FakePrune)
    monkeypatch.setattr(prune_callbacks, "PruneVisualDL", _FakeVisualDL)  # conf/callbacks/visualdl.yaml's _target_
    monkeypatch.setattr(artefacts, "export", _fake_export)
    monkeypatch.setattr(artefacts, "save_pruned", _fake_save)
    _Recorder.events.clear()
    _LogsSpy.seen.clear()
    real_fit = paddle.Model.fit

    def fit_with_spy(self: paddle.Model, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        return real_fit(self, *args, callbacks=[*callbacks, _LogsSpy()], **kwargs)

    monkeypatch.setattr(paddle.Model, "fit", fit_with_spy)
    cfg = make_cfg([*SMALL, "trainer.epochs_before=2", "callbacks.training_curves=false"], tmp_path)
    results = train(cfg)

    assert _Recorder.events == ["sensitivity@1", "prune@1:True"]
    assert results["at_epoch"] == 1 and results["flops_target"] == 0.4
    assert results["flops_reduction"] == pytest.approx(0.4) and results["params_reduction"] == pytest.approx(0.4)
    # the network stays in train mode for fit after our evaluations; zeroed weights -> uniform logits
    assert results["top1_pruned"] is not None and results["loss_pruned"] == pytest.approx(np.log(10), rel=1e-3)
    assert results["loss_before"] != pytest.approx(results["loss_pruned"])
    for key in ("time_train_before_s", "time_sensitivity_s", "time_prune_s", "time_finetune_s", "time_total_s"):
        assert results[key] is not None and results[key] >= 0.0
    # our evaluations do not leak into the logs fit gives later callbacks (paddle's evaluate would)
    assert [s["step"] for s in _LogsSpy.seen] == [2, 2, 2]  # 96 samples / 32 -> last train step 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["top1_finetuned"] == pytest.approx(results["top1_finetuned"])
    assert (tmp_path / "checkpoint" / "final.prune.json").exists()
    assert (tmp_path / "inference" / "model.pdmodel").exists()
    assert (tmp_path / "resume" / "last.json").exists() and not list((tmp_path / "resume").glob(".tmp-*"))
    state = json.loads((tmp_path / "resume" / "last.state.json").read_text())
    assert state["epochs_done"] == 3 and state["metrics"]["pruned"]["loss"] == pytest.approx(np.log(10), rel=1e-3)
    printed = capsys.readouterr().out
    for text in ("Results: mobilenet_v1 on digits", "FLOPs", "40.00% (target 40.00%)", "top-1", "top-5",
                 "before pruning", "pruned, no fine-tune", "fine-tuned", "sensitivity", "fine-tune",
                 "VisualDL logs:", str(tmp_path / "vdl_log"), "pruned checkpoint:", "inference model:"):
        assert text in printed, text


def test_evaluate_net_restores_mode_and_counts_all_samples() -> None:
    net = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(3 * 8 * 8, 10))
    ds = prune_callbacks.datasets.bundled.synthetic_dataset(num_samples=37, image_shape=(3, 8, 8))
    net.train()
    metrics = evaluate_net(net, ds, batch_size=16)
    assert net.training
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    net.eval()
    evaluate_net(net, ds, batch_size=16)
    assert not net.training


def test_sweep_table_shows_only_the_swept_overrides(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for job, flops in ((1, 0.5), (0, 0.3)):
            writer.writerow({"job": job, "override": f"prune.flops={flops} trainer.epochs_after=1",
                             "flops_reduction": flops, "top1_finetuned": 0.9, "time_total_s": 12.3})
    lines = format_sweep(str(path)).splitlines()
    assert lines[2].split()[:4] == ["0", "prune.flops=0.3", "30.0%", "-"]
    assert lines[3].split()[:3] == ["1", "prune.flops=0.5", "50.0%"]
    assert "epochs_after" not in "\n".join(lines)


# ------------------------------------------------------------------ the app, for real


def test_train_small_end_to_end(tmp_path: Path) -> None:
    results = train(make_cfg(SMALL, tmp_path))
    assert 0 < results["flops_after"] < results["flops_before"]
    assert results["params_after"] < results["params_before"]
    assert abs(results["flops_reduction"] - 0.4) <= 0.005
    for key in ("top1_before", "top1_pruned", "top1_finetuned", "top5_before", "top5_pruned", "top5_finetuned"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["time_sensitivity_s"] > 0 and results["time_prune_s"] > 0
    paths = results["paths"]
    assert os.path.isdir(paths["vdl_log"]) and os.listdir(paths["vdl_log"])
    assert os.path.exists(paths["sensitivity"])
    assert any(f.startswith("final") for f in os.listdir(os.path.dirname(paths["checkpoint"])))
    assert any(f.startswith("model") for f in os.listdir(os.path.dirname(paths["inference_model"])))
    assert json.loads((tmp_path / "results.json").read_text())["flops_after"] == results["flops_after"]
    _check_visualdl_server(paths["vdl_log"], results)


def _check_visualdl_server(log_dir: str, results: Dict[str, Any]) -> None:
    """The real `visualdl` server, over the finished run's logs, shows curves and FLOPs."""
    import socket
    import urllib.parse
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def get(path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{port}/app/api/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == 0, body
        return body["data"]

    exe = os.path.join(os.path.dirname(sys.executable), "visualdl")
    proc = subprocess.Popen([exe, "--logdir", log_dir, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"visualdl exited with {proc.returncode}"
            try:
                runs = get("runs")
                break
            except OSError:
                assert time.monotonic() < deadline, "visualdl did not answer within 30 s"
                time.sleep(0.2)
        prune_run = os.path.join(log_dir, "prune")
        assert prune_run in runs
        tags = get("tags")
        curves = [t for t in tags if t.startswith(prune_run + "/sensitivity%") and tags[t] == "scalar"]
        assert curves, tags
        flops = get("scalar/list", run=prune_run, tag="prune/flops")
        assert [v for _, _, v in flops] == [results["flops_before"], results["flops_after"]]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_uniform_strategy_skips_sensitivity(tmp_path: Path) -> None:
    results = train(make_cfg([*SMALL, "prune.strategy=uniform", "callbacks=none"], tmp_path))
    assert results["paths"]["sensitivity"] is None and results["flops_after"] < results["flops_before"]


def test_cli_run_prints_table_and_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "callbacks.training_curves=false",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("Results: mobilenet_v1 on digits", "FLOPs", "params", "top-1", "top-5", "wall time",
                 "VisualDL logs:", "pruned checkpoint:", "inference model:"):
        assert text in proc.stdout, text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["paths"]["output_dir"] == str(tmp_path)
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_cli_multirun_writes_a_comparison_csv(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "prune.flops=0.3,0.5", *SMALL, "callbacks=none",
         f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["flops_target"]) for r in rows] == [0.3, 0.5]
    assert float(rows[0]["flops_reduction"]) < float(rows[1]["flops_reduction"])
    assert "Sweep results" in proc.stdout and "prune.flops=0.5" in proc.stdout
    assert (tmp_path / "0" / "results.json").exists() and (tmp_path / "1" / "results.json").exists()


def test_results_table_names_a_latency_target() -> None:
    """A latency run's table says which target chose the FLOPs cut, not a FLOPs target it had not."""
    from collections import defaultdict

    from prune_callbacks.app import format_results
    base = {"flops_before": 1000, "flops_after": 550, "flops_reduction": 0.45, "model": "m",
            "data": "d", "criterion": "l1", "strategy": "uniform", "at_epoch": 0, "paths": {}}
    latency = format_results(defaultdict(lambda: None, base, flops_target=None,
                                         latency_target=0.7))
    assert "45.00% (latency target 70.00% of the original)" in latency
    flops = format_results(defaultdict(lambda: None, base, flops_target=0.4, latency_target=None))
    assert "45.00% (target 40.00%)" in flops
