"""The callbacks inside paddle.Model.fit: sensitivity at an epoch, pruning to a FLOPs target,
optimizer rebuilt in place, training going on, VisualDL records, early argument checks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec
from paddle.vision import models
from visualdl import LogReader

from prune_callbacks import (FilterPruneCallback, PrunedModelCheckpoint, PruneVisualDL, SensitivityCallback,
                             SensitivityResult, count_flops, history_of, load_pruned)
from prune_callbacks.datasets.bundled import subset


class Spy(paddle.callbacks.Callback):
    """Records per-batch train losses, eval logs and the network's mode seen by later callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: Dict[int, List[float]] = {}
        self.evals: List[Dict[str, Any]] = []
        self.mode_at_epoch_end: List[bool] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict] = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, step: int, logs: Optional[Dict] = None) -> None:
        loss = logs["loss"]
        self.losses.setdefault(self.epoch, []).append(float(np.asarray(loss).reshape(-1)[0]))

    def on_epoch_end(self, epoch: int, logs: Optional[Dict] = None) -> None:
        self.mode_at_epoch_end.append(self.model.network.training)

    def on_eval_end(self, logs: Optional[Dict] = None) -> None:
        self.evals.append(dict(logs or {}))


def scalars(run_dir: str) -> Dict[str, List[Any]]:
    files = [f for f in os.listdir(run_dir) if f.startswith("vdlrecords")]
    reader = LogReader(file_path=os.path.join(run_dir, files[0]))
    tags = reader.get_tags()
    out = {t: [(r.id, r.value) for r in reader.get_data("scalar", t)] for t in tags.get("scalar", [])}
    out["__text__"] = tags.get("text", [])
    out["__image__"] = tags.get("image", [])
    return out


def test_end_to_end_mobilenet_on_digits(digits: Any, tmp_path: Path, make_model: Any) -> None:
    """fit for 3 epochs; sensitivity and pruning to 40% FLOPs at the end of epoch 1."""
    paddle.seed(0)
    np.random.seed(0)
    train, val = digits
    net = models.mobilenet_v1(num_classes=10)
    sched = paddle.optimizer.lr.StepDecay(0.05, step_size=10, gamma=0.5)
    model = make_model(net, lr=sched)
    flops0 = count_flops(net, [1, 3, 32, 32])
    sens = SensitivityCallback(val, at_epoch=1, ratios=(0.3, 0.6, 0.9), num_samples=32,
                               path=str(tmp_path / "sen.json"))
    prune = FilterPruneCallback(flops=0.4, at_epoch=1, sensitivity=sens)
    spy = Spy()
    log_dir = str(tmp_path / "vdl")
    model.fit(train, val, epochs=3, batch_size=32, verbose=0, shuffle=True,
              callbacks=[sens, prune, PruneVisualDL(log_dir),
                         paddle.callbacks.LRScheduler(by_step=True, by_epoch=False), spy])

    assert len(prune.plans) == 1
    plan = prune.plans[0]
    assert abs(plan.pruned_flops - 0.4) <= 0.005
    assert plan.flops_before == flops0 and plan.flops_after == count_flops(net, [1, 3, 32, 32])
    # the rebuilt optimizer drives exactly the network's (pruned) parameters
    opt = model._optimizer
    assert [id(p) for p in opt._parameter_list] == [id(p) for p in net.parameters()]
    assert isinstance(opt, paddle.optimizer.Momentum) and opt._momentum == 0.9
    # the very same scheduler object continues: 8 steps per epoch, 3 epochs
    assert opt._learning_rate is sched and sched.last_epoch == 24
    assert sched() == pytest.approx(0.05 * 0.5 ** 2)
    assert len(spy.evals) == 3  # fit's own evaluation ran every epoch, after our callbacks
    after = spy.losses[2]
    assert np.mean(after[-4:]) < np.mean(after[:4])  # train loss after the pruning epoch falls
    # the analysis left the network in train mode for the callbacks after it
    assert spy.mode_at_epoch_end == [True, True, True]
    hist = history_of(model)
    assert hist.sensitivity is sens.result and hist.sensitivity_epoch == 1
    assert [e.epoch for e in hist.events] == [1] and hist.events[0].plan is plan
    # VisualDL holds the curves, FLOPs, params and ratios
    tags = scalars(os.path.join(log_dir, "prune"))
    for g in sens.result.losses:
        assert [s for s, _ in tags[f"sensitivity/{g}"]] == [30, 60, 90]
    assert [v for _, v in tags["prune/flops"]] == [flops0, plan.flops_after]
    assert {"prune/params", "prune/pruned_flops"} <= set(tags)
    ratio_tags = [t for t in tags if t.startswith("prune/ratio/")]
    assert len(ratio_tags) == len(plan.groups)
    assert tags["__text__"] and tags["__image__"]


def test_sensitivity_file_reused_and_steps(digits: Any, tmp_path: Path, make_model: Any) -> None:
    """A complete file is reused after one baseline evaluation that checks it; steps=2 reaches
    the target over 2 epochs."""
    paddle.seed(1)
    train, val = digits
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    path = str(tmp_path / "sen.json")
    model = make_model(net)
    calls = []

    def eval_fn() -> float:  # depends on which filters are masked, not on training: same baseline
        calls.append(1)
        convs = [p.numpy() for p in net.parameters() if len(p.shape) == 4]
        zeroed = sum(int((np.abs(w).reshape(w.shape[0], -1).sum(1) == 0).sum()) for w in convs)
        return 0.6 - zeroed / sum(w.shape[0] for w in convs)

    first = SensitivityCallback(eval_fn, at_epoch=0, ratios=(0.5, 0.9), path=path)
    first.set_model(model)
    first.run(0)
    n = len(calls)
    assert n > 1
    again = SensitivityCallback(eval_fn, at_epoch=0, ratios=(0.5, 0.9), path=path)
    prune = FilterPruneCallback(flops=0.5, at_epoch=0, steps=2, sensitivity=again)
    model.fit(subset(train, 64), epochs=3, batch_size=32, verbose=0,
              callbacks=[again, prune])
    assert len(calls) == n + 1  # only the baseline, which matched the file's
    assert again.result.losses == SensitivityResult.load(path).losses
    assert len(prune.plans) == 2
    first_step = 1 - prune.plans[0].flops_after / prune.plans[0].flops_before
    total = 1 - prune.plans[1].flops_after / prune.plans[0].flops_before
    assert 0.1 < first_step < total
    assert abs(total - 0.5) <= 0.005
    assert [e.epoch for e in history_of(model).events] == [0, 1]


def test_uniform_with_paddle_callbacks_adam_eval_freq(digits: Any, tmp_path: Path, make_model: Any) -> None:
    """Uniform pruning beside PrunedModelCheckpoint (paddle's ModelCheckpoint, plans included),
    EarlyStopping and VisualDL, with Adam."""
    paddle.seed(2)
    train, val = digits
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    model = make_model(net, lr=0.01, optimizer="adam")
    prune = FilterPruneCallback(flops=0.3, at_epoch=0, strategy="uniform")
    model.fit(subset(train, 64), subset(val, 32), epochs=2, batch_size=32, verbose=0, eval_freq=2,
              callbacks=[prune, PrunedModelCheckpoint(1, str(tmp_path / "ckpt")),
                         paddle.callbacks.EarlyStopping("loss", patience=5),
                         paddle.callbacks.VisualDL(str(tmp_path / "vdl"))])
    assert abs(prune.plans[0].pruned_flops - 0.3) <= 0.005
    opt = model._optimizer
    assert isinstance(opt, paddle.optimizer.Adam)
    assert [id(p) for p in opt._parameter_list] == [id(p) for p in net.parameters()]
    # the final checkpoint holds the pruned shapes
    saved = paddle.load(str(tmp_path / "ckpt" / "final.pdparams"))
    for k, v in net.state_dict().items():
        assert list(saved[k].shape) == list(v.shape), k
    # ... and reloads into a freshly built network through the plan saved beside it
    fresh = load_pruned(models.mobilenet_v1(num_classes=10, scale=0.25),
                        str(tmp_path / "ckpt" / "final"))
    x = paddle.randn([2, 3, 32, 32])
    net.eval()
    fresh.eval()
    np.testing.assert_array_equal(fresh(x).numpy(), net(x).numpy())


def test_amp_o1(digits: Any) -> None:
    paddle.seed(3)
    train, _ = digits
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    model = paddle.Model(net, inputs=[InputSpec([None, 3, 32, 32], "float32", "image")],
                         labels=[InputSpec([None, 1], "int64", "label")])
    opt = paddle.optimizer.Momentum(0.01, parameters=net.parameters())
    model.prepare(opt, nn.CrossEntropyLoss(), paddle.metric.Accuracy(), amp_configs="O1")
    prune = FilterPruneCallback(flops=0.3, at_epoch=0, strategy="uniform")
    model.fit(subset(train, 64), epochs=2, batch_size=32, verbose=0, callbacks=[prune])
    assert abs(prune.plans[0].pruned_flops - 0.3) <= 0.005
    assert [id(p) for p in model._optimizer._parameter_list] == [id(p) for p in net.parameters()]


# ---------------------------------------------------------------------------------------------
# Argument checks: at construction, or at on_train_begin before any training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({"flops": 1.5}, ValueError, r"flops must be .* in \(0, 1\)"),
    ({"flops": 0}, ValueError, r"in \(0, 1\)"),
    ({"at_epoch": -1}, ValueError, "0-based epoch"),
    ({"steps": 0}, ValueError, "steps must be an int >= 1"),
    ({"strategy": "greedy"}, ValueError, "strategy must be one of"),
    ({"criterion": "l3"}, ValueError, "l3"),
    ({"round_to": 0}, ValueError, "round_to"),
    ({"skip": [3]}, TypeError, "group names"),
    ({"strategy": "sensitivity"}, ValueError, "needs sensitivity=.*strategy='uniform'"),
    ({"sensitivity": 3}, TypeError, "SensitivityCallback"),
])
def test_prune_callback_rejects_bad_arguments(kwargs: Dict, error: type, match: str) -> None:
    args = {"flops": 0.4, "strategy": "uniform", **kwargs}
    if kwargs.get("sensitivity") is not None:
        args["strategy"] = "sensitivity"
    with pytest.raises(error, match=match):
        FilterPruneCallback(**args)


def test_the_layer_norm_widths_switch_reaches_the_pruner_of_both_callbacks() -> None:
    from transformer_nets import TinyViT

    model = paddle.Model(TinyViT(), inputs=[InputSpec([None, 3, 8, 8], "float32", "x")])
    widths = {}
    for on in (True, False):
        sens = SensitivityCallback(lambda: 1.0, layer_norm_widths=on)
        cb = FilterPruneCallback(flops=0.3, sensitivity=sens, layer_norm_widths=on)
        for c in (sens, cb):
            c.set_model(model)
        pruners = [sens._pruner(), cb._new_pruner()]
        assert [p.layer_norm_widths for p in pruners] == [on, on]
        widths[on] = [g.prunable for g in pruners[1].groups if g.norms]
    # the embedding width (normalised by every LayerNorm) prunes only with the switch on
    assert any(widths[True]) and not any(widths[False])
    with pytest.raises(ValueError, match="layer_norm_widths=False but the SensitivityCallback analyses with "
                                         "layer_norm_widths=True"):
        FilterPruneCallback(flops=0.3, sensitivity=SensitivityCallback(lambda: 1.0), layer_norm_widths=False)


class NoTraining(paddle.callbacks.Callback):
    def on_train_batch_begin(self, step: int, logs: Optional[Dict] = None) -> None:
        raise AssertionError("training started although the arguments were bad")


def test_errors_before_any_training(digits: Any, tmp_path: Path, make_model: Any) -> None:
    train, val = digits
    net = models.mobilenet_v1(num_classes=10, scale=0.25)
    model = make_model(net)
    small = subset(train, 32)
    cases = [
        (FilterPruneCallback(flops=0.4, at_epoch=3, strategy="uniform"), "fit has 2 epochs"),
        (FilterPruneCallback(flops=0.4, at_epoch=0, steps=3, strategy="uniform"),
         "end of epoch 2, but fit has 2 epochs"),
        (FilterPruneCallback(flops=0.4, strategy="uniform", skip=["conv2_1._pointwise_con.0"]),
         "conv2_1._pointwise_conv.0"),
        (FilterPruneCallback(flops=0.4, sensitivity=str(tmp_path / "missing.json")),
         "does not exist"),
        (FilterPruneCallback(flops=0.4, at_epoch=0, sensitivity=SensitivityCallback(val, at_epoch=1)),
         "after pruning at epoch 0"),
        (SensitivityCallback(val, at_epoch=5), "never runs: fit has 2 epochs"),
        (FilterPruneCallback(flops=0.4, strategy="uniform", input_shape=[1, 3, 33]), "input"),
    ]
    for cb, match in cases:
        with pytest.raises(ValueError, match=match):
            model.fit(small, epochs=2, batch_size=32, verbose=0, callbacks=[cb, NoTraining()])
    with pytest.raises(TypeError, match="dataset .* or a callable"):
        SensitivityCallback(42)
    with pytest.raises(ValueError, match="ratios"):
        SensitivityCallback(val, ratios=(0.0, 0.5))
