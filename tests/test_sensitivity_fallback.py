"""The evaluation loss as a sensitivity metric (lower is better), and the fallbacks that keep a run that trained
from ending at the analysis: top-1 that cannot resolve the curves -> the loss -> uniform allocation."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, List

import numpy as np
import paddle
import pytest
from paddle.static import InputSpec
from visualdl import LogReader

from conftest import ArrayDS, TinyNet, labelled
from prune_callbacks import FilterPruneCallback, FilterPruner, PruneVisualDL, SensitivityCallback, history_of
from prune_callbacks.sensitivity import EvalData, UnresolvableMetric, loss_metric
from prune_callbacks.sensitivity.evaluation import cross_entropy_metric

SHAPE = [1, 3, 8, 8]


def _ce(net: paddle.nn.Layer, ds: ArrayDS) -> float:
    """Mean softmax cross-entropy of the network as it is now, through paddle's own loss."""
    with paddle.no_grad():
        logits = net(paddle.to_tensor(ds.x))
        return float(paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(ds.y)).numpy())


def test_loss_curves_are_the_relative_rise_of_the_masked_loss_and_plan() -> None:
    paddle.seed(0)
    net = TinyNet()
    net.eval()
    ds = labelled(net, 40, SHAPE[1:])
    pruner = FilterPruner(net, SHAPE)
    data = EvalData(ds, loss_metric(), batch_size=16, lower_is_better=True)
    res = pruner.sensitivity(data, ratios=(0.25, 0.5, 0.75))
    base = _ce(net, ds)
    assert res.baseline == pytest.approx(base, rel=1e-5)
    for g in pruner.prunable_groups:
        for r in (0.25, 0.5, 0.75):
            with pruner.mask({g.name: r}):
                masked = _ce(net, ds)
            assert res.losses[g.name][r] == pytest.approx((masked - base) / base, rel=1e-4, abs=1e-6), (g.name, r)
    # removing channels raises the loss of a network that labelled the data itself
    assert all(res.losses[g][0.75] > 0 for g in res.losses)
    # planning reads the curves as "higher is worse", the same as top-1 losses
    plan = pruner.prune_to_flops(0.3, res)
    assert plan.pruned_flops >= 0.3 - 1e-9


def test_cross_entropy_metric_matches_paddle_and_the_model_loss() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32")
    labels = rng.integers(0, 5, size=6)
    total, n = cross_entropy_metric(logits, labels)
    want = float(paddle.nn.functional.cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(labels)).numpy())
    assert n == 6 and total / n == pytest.approx(want, rel=1e-5)
    total2, n2 = loss_metric(paddle.nn.CrossEntropyLoss())(logits, labels)  # a model's own loss
    assert n2 == 6 and total2 / n2 == pytest.approx(want, rel=1e-5)


def _model(net: paddle.nn.Layer, learning_rate: float = 0.01) -> paddle.Model:
    model = paddle.Model(net, InputSpec([None, 3, 8, 8], "float32", "x"), InputSpec([None, 1], "int64", "y"))
    model.prepare(paddle.optimizer.SGD(learning_rate, parameters=net.parameters()), paddle.nn.CrossEntropyLoss())
    return model


def _random_labels(n: int, seed: int = 0) -> ArrayDS:
    rng = np.random.RandomState(seed)
    return ArrayDS(rng.randn(n, 3, 8, 8).astype("float32"), rng.randint(0, 5, (n, 1)).astype("int64"))


def test_the_loss_metric_chosen_by_name_is_the_models_own_loss(tmp_path: Path) -> None:
    paddle.seed(5)
    net = TinyNet()
    model = _model(net)
    ds = _random_labels(12)
    sens = SensitivityCallback(ds, at_epoch=0, ratios=(0.5,), metric="loss", path=str(tmp_path / "sen.json"))
    model.fit(ds, batch_size=4, epochs=1, verbose=0, callbacks=[sens])
    net.eval()
    assert sens.fallbacks == [] and sens.result_path == str(tmp_path / "sen.json")
    assert sens.result.baseline == pytest.approx(_ce(net, ds), rel=1e-5)  # the CrossEntropyLoss it was prepared with
    assert "loss (lower is better)" in json.loads((tmp_path / "sen.json").read_text())["data"]


def test_a_top1_that_cannot_resolve_falls_back_to_the_loss(tmp_path: Path) -> None:
    paddle.seed(1)
    model = _model(TinyNet())
    ds = _random_labels(4)  # 4 samples: fewer than a handful can ever be correct
    sens = SensitivityCallback(ds, at_epoch=0, ratios=(0.3, 0.6), path=str(tmp_path / "sen.json"))
    vdl = PruneVisualDL(str(tmp_path / "vdl"))
    with pytest.warns(UserWarning) as caught:
        model.fit(ds, batch_size=4, epochs=1, verbose=0,
                  callbacks=[sens, FilterPruneCallback(flops=0.3, at_epoch=0, sensitivity=sens), vdl])
    said = [str(w.message) for w in caught]
    assert any("evaluates top-1 on 4 samples for 2 ratios per group" in m for m in said)  # before training
    fallback = [m for m in said if "falling back" in m]
    assert len(fallback) == 1 and "on 4 evaluation samples" in fallback[0] and "the evaluation loss" in fallback[0]
    assert [(f.metric, f.to) for f in sens.fallbacks] == [("top1", "loss")]
    assert history_of(model).sensitivity_fallbacks == sens.fallbacks
    # the loss curves of every group, measured before pruning
    assert set(sens.result.losses) == {g.name for g in FilterPruner(TinyNet(), SHAPE).prunable_groups}
    assert all(len(pts) == 2 for pts in sens.result.losses.values())
    assert os.path.exists(tmp_path / "sen.loss.json") and not os.path.exists(tmp_path / "sen.json")
    assert "loss (lower is better)" in json.loads((tmp_path / "sen.loss.json").read_text())["data"]
    assert history_of(model).events  # and it pruned
    run = os.path.join(str(tmp_path / "vdl"), "prune")
    reader = LogReader(file_path=os.path.join(run, [f for f in os.listdir(run) if "vdlrecords" in f][0]))
    (table,) = [t.text.encoded_text_string for t in reader.get_data("text", "prune/plan")]
    assert "sensitivity fallback: top1 -> loss: the baseline top-1 is" in table


def test_a_loss_that_cannot_resolve_falls_back_to_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    paddle.seed(2)
    net = TinyNet()
    reference = FilterPruner(copy.deepcopy(net), SHAPE)
    model = _model(net, learning_rate=0.0)  # the weights the plan scores stay the reference's
    ds = _random_labels(8)
    # a loss that is 0 on every sample (as a perfectly fitted network's would be): no relative change
    monkeypatch.setattr(SensitivityCallback, "_loss_metric", lambda self: (lambda logits, y: (0.0, len(y))))
    sens = SensitivityCallback(ds, at_epoch=0, ratios=(0.5,), metric="loss")
    prune = FilterPruneCallback(flops=0.3, at_epoch=0, sensitivity=sens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(ds, batch_size=8, epochs=1, verbose=0, callbacks=[sens, prune])
    assert [(f.metric, f.to) for f in sens.fallbacks] == [("loss", "uniform")]
    assert sum("falling back to uniform allocation" in str(w.message) for w in caught) == 1
    assert sens.result is None
    uniform = reference.plan(0.3, strategy="uniform")  # what uniform allocation keeps
    assert {g.name: g.kept for g in prune.plans[0].groups} == \
        {reference.groups[gi].name: tuple(int(i) for i in k) for gi, k in uniform.items()}


def test_a_loss_that_fails_after_a_top1_fallback_ends_in_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    paddle.seed(6)
    model = _model(TinyNet())
    ds = _random_labels(4)

    def broken(logits: np.ndarray, labels: np.ndarray) -> Any:
        raise ValueError("this loss wants labels of another shape")

    monkeypatch.setattr(SensitivityCallback, "_loss_metric", lambda self: broken)
    sens = SensitivityCallback(ds, at_epoch=0, ratios=(0.5,))
    prune = FilterPruneCallback(flops=0.3, at_epoch=0, sensitivity=sens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, batch_size=4, epochs=1, verbose=0, callbacks=[sens, prune])
    assert [(f.metric, f.to) for f in sens.fallbacks] == [("top1", "loss"), ("loss", "uniform")]
    assert "labels of another shape" in sens.fallbacks[1].reason and len(prune.plans) == 1


def test_metric_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="metric must be one of top1, loss or a function"):
        SensitivityCallback(_random_labels(4), metric="top5")
    with pytest.raises(TypeError, match="metric must be one of top1, loss, a function"):
        SensitivityCallback(_random_labels(4), metric=3)


def test_a_zero_baseline_is_an_unresolvable_metric_for_the_engine() -> None:
    paddle.seed(3)
    net = TinyNet()
    pruner = FilterPruner(net, SHAPE)
    with pytest.raises(UnresolvableMetric, match="baseline metric is 0"):
        pruner.sensitivity(lambda: 0.0, ratios=(0.5,))


# -- the app: a one-epoch smoke run on a tiny image folder finishes, the fallback recorded ------------------------
from test_image_folder import folder_cfg, image_folder  # noqa: E402,F401  (the fixture, and its config)

from prune_callbacks.app import train  # noqa: E402


def test_one_epoch_app_run_on_a_tiny_folder_records_the_fallback(image_folder: Path, tmp_path: Path,
                                                                 capsys: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = train(folder_cfg([f"data.path={image_folder}", "trainer.epochs_after=0",
                                    "prune.sensitivity_samples=4", "trainer.measure_latency=true"], tmp_path))
    assert results["flops_after"] < results["flops_before"]  # it finished: pruned, reported
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["sensitivity_metric"] == "top1"
    assert [(f["metric"], f["to"]) for f in saved["sensitivity_fallback"]] == [("top1", "loss")]
    assert "correct" in saved["sensitivity_fallback"][0]["reason"]
    assert saved["paths"]["sensitivity"] == str(tmp_path / "sensitivity.loss.json")  # the file it fell back to
    assert os.path.exists(saved["paths"]["sensitivity"])
    table = capsys.readouterr().out
    assert "sensitivity fallback: top1 -> loss" in table
    # the exported model's latency, timed before/after on the run's backend, next to FLOPs and params
    measured = saved["latency_measured"]
    assert measured["backend"] == "paddle_inference" and measured["batch"] == 1
    assert saved["latency_before_ms"] > 0 and saved["latency_after_ms"] > 0
    assert saved["latency_reduction"] == pytest.approx(1 - saved["latency_after_ms"] / saved["latency_before_ms"])
    assert "latency (paddle_inference, batch 1)" in table


def test_the_latency_timing_switches_off(image_folder: Path, tmp_path: Path, capsys: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = train(folder_cfg([f"data.path={image_folder}", "trainer.epochs_after=0", "prune.strategy=uniform",
                                    "trainer.measure_latency=false"], tmp_path))  # FOLDER_RUN's, said here too
    assert results["latency_measured"] is None and results["latency_before_ms"] is None
    assert "latency (" not in capsys.readouterr().out


def test_an_unknown_sensitivity_metric_names_its_config_key(image_folder: Path, tmp_path: Path) -> None:
    from prune_callbacks.app import ConfigError

    with pytest.raises(ConfigError, match=r"prune\.sensitivity_metric='top5': metric must be one of top1, loss"):
        train(folder_cfg([f"data.path={image_folder}", "prune.sensitivity_metric=top5"], tmp_path))
