"""Tests of prune_callbacks.deploy.io: a pruned network saved with its plans loads into a fresh copy (Layer and
paddle.Model, with optimizer state, through save_pruned and PrunedModelCheckpoint), and exports for inference."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import paddle
import pytest

from prune_callbacks import FilterPruner, PrunedModelCheckpoint, count_params
from prune_callbacks import export, load_pruned, record_plan, recorded_plans, save_pruned
from prune_callbacks.deploy.io import PLANS_SUFFIX, read_plans
from prune_callbacks.training.optim import rebuild_optimizer

SHAPE = [1, 1, 8, 8]


def _net(width: int = 8) -> paddle.nn.Layer:
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(1, width, 3, padding=1), paddle.nn.BatchNorm2D(width), paddle.nn.ReLU(),
        paddle.nn.Conv2D(width, 16, 3, padding=1), paddle.nn.BatchNorm2D(16), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(16, 4))


def _x(seed: int = 0, n: int = 4) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype("float32"))


def _randomise_bn(net: paddle.nn.Layer) -> None:
    # non-trivial running statistics, so a checkpoint that lost them would give other outputs
    rng = np.random.default_rng(1)
    for layer in net.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            n = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(size=n).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 2, size=n).astype("float32"))


def _pruned_twice() -> tuple[paddle.nn.Layer, list]:
    paddle.seed(0)
    net = _net()
    _randomise_bn(net)
    pruner = FilterPruner(net, SHAPE, criterion="l2")
    plans = [pruner.prune({"0": 0.5}), pruner.prune({"3": 0.25})]
    for plan in plans:
        record_plan(net, plan)
    return net, plans


def _out(net: paddle.nn.Layer, x: paddle.Tensor) -> np.ndarray:
    net.eval()
    return net(x).numpy()


def test_layer_round_trip_rebuilds_shapes_weights_and_plans(tmp_path: Path) -> None:
    net, plans = _pruned_twice()
    record_plan(net, plans[0])  # the same plan object again: no duplicate
    written = save_pruned(net, tmp_path / "ck")
    assert sorted(os.path.basename(p) for p in written) == ["ck.pdparams", "ck" + PLANS_SUFFIX]

    header = json.loads((tmp_path / ("ck" + PLANS_SUFFIX)).read_text())
    assert (header["format"], header["producer"], header["network"]) == (1, "prune_callbacks.io", "Sequential")
    assert [[g["name"] for g in p["groups"]] for p in header["plans"]] == [["0"], ["3"]]  # in order
    assert header["param_names"]["0.weight"] == net[0].weight.name
    # the record is plain Python, not a parameter, buffer or state_dict entry
    assert not any("prune" in k for k in net.state_dict()) and len(net.parameters()) == 14

    fresh = _net()
    assert load_pruned(fresh, str(tmp_path / "ck.pdparams")) is fresh
    assert [list(p.shape) for p in fresh.parameters()] == [list(p.shape) for p in net.parameters()]
    assert (fresh[0]._out_channels, fresh[3]._in_channels, fresh[3]._out_channels) == (4, 4, 12)
    x = _x()
    np.testing.assert_allclose(_out(fresh, x), _out(net, x), atol=1e-6)
    assert [(p.ratios, p.criterion) for p in recorded_plans(fresh)] == [({"0": 0.5}, "l2"), ({"3": 0.25}, "l2")]

    # the loaded net remembers its plans: saved again, it loads again (prefix given as a Path)
    save_pruned(fresh, tmp_path / "again")
    assert [p.groups for p in read_plans(tmp_path / "again")] == [p.groups for p in plans]
    np.testing.assert_allclose(_out(load_pruned(_net(), tmp_path / "again"), x), _out(net, x), atol=1e-6)
    # loading into a net already pruned by those plans re-applies nothing and just reloads weights
    assert load_pruned(fresh, tmp_path / "again") is fresh and len(recorded_plans(fresh)) == 2


def test_plans_recorded_by_the_pruner_itself_are_not_doubled(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    apply = FilterPruner.apply

    def recording_apply(self: FilterPruner, kept: dict) -> object:
        plan = apply(self, kept)
        record_plan(self.net, plan)
        return plan

    monkeypatch.setattr(FilterPruner, "apply", recording_apply)
    net, plans = _pruned_twice()  # each plan recorded by the pruner and again by the caller
    assert recorded_plans(net) == plans
    save_pruned(net, tmp_path / "ck")
    fresh = load_pruned(_net(), tmp_path / "ck")
    assert [p.criterion for p in recorded_plans(fresh)] == ["l2", "l2"]


def test_explicit_plans_and_unpruned_checkpoints(tmp_path: Path) -> None:
    paddle.seed(1)
    net = _net()
    _randomise_bn(net)
    x = _x(2)
    save_pruned(net, tmp_path / "plain")  # nothing recorded: an unpruned checkpoint
    assert read_plans(tmp_path / "plain") == []
    fresh = _net()
    np.testing.assert_allclose(_out(load_pruned(fresh, tmp_path / "plain"), x), _out(net, x), atol=1e-6)
    assert recorded_plans(fresh) == []

    plan = FilterPruner(net, SHAPE).prune({"3": 0.5})  # FilterPruner.apply records its plans
    assert recorded_plans(net) == [plan]
    save_pruned(net, tmp_path / "explicit", plans=[plan.to_dict()])  # explicit plans (as dicts)
    loaded = load_pruned(_net(), tmp_path / "explicit.prune.json")
    np.testing.assert_allclose(_out(loaded, x), _out(net, x), atol=1e-6)


def test_bad_input_raises_clear_errors(tmp_path: Path) -> None:
    net, plans = _pruned_twice()
    save_pruned(net, tmp_path / "ck")
    with pytest.raises(TypeError, match="paddle.Model or a paddle.nn.Layer, got str"):
        load_pruned("net", tmp_path / "ck")
    with pytest.raises(TypeError, match="paddle.Model or a paddle.nn.Layer, got int"):
        save_pruned(3, tmp_path / "x")
    with pytest.raises(TypeError, match="file prefix such as 'ckpt/final', got int"):
        save_pruned(net, 7)
    with pytest.raises(ValueError, match="must be a file prefix"):
        save_pruned(net, tmp_path)  # a directory
    with pytest.raises(ValueError, match="must be a file prefix"):
        load_pruned(_net(), "")
    with pytest.raises(TypeError, match="list of PrunePlan"):
        save_pruned(net, tmp_path / "x", plans=plans[0])
    with pytest.raises(TypeError, match=r"plans\[1\] must be a PrunePlan"):
        save_pruned(net, tmp_path / "x", plans=[plans[0], "3"])
    with pytest.raises(FileNotFoundError, match="no weights at .*nowhere.pdparams"):
        load_pruned(_net(), tmp_path / "nowhere")

    paddle.save(net.state_dict(), str(tmp_path / "bare.pdparams"))  # a plain paddle checkpoint
    with pytest.raises(FileNotFoundError, match=r"not made by prune_callbacks.save_pruned.*weights' shapes"):
        read_plans(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no plan file.*cannot trace Sequential at input shape "
                                         r"\[1, 3, 224, 224\].*pass input_shape="):
        load_pruned(_net(), tmp_path / "bare")  # the default shape does not fit a 1-channel input
    bare = load_pruned(_net(), tmp_path / "bare", input_shape=SHAPE)  # read from the shapes
    np.testing.assert_allclose(_out(bare, _x()), _out(net, _x()), atol=1e-6)

    # wrong network: different layers, or the same layers with other channel counts
    other = paddle.nn.Sequential(paddle.nn.Conv2D(1, 8, 3, padding=1), paddle.nn.ReLU())
    with pytest.raises(ValueError, match=r"missing keys \[\].*unexpected keys \['1._mean'.*same architecture"):
        load_pruned(other, tmp_path / "ck")
    wide = _net(width=6)
    with pytest.raises(ValueError, match=r"plan 1 of 2 .* 8 channels in group '0'.*this network has 6"):
        load_pruned(wide, tmp_path / "ck")

    # a net already pruned by other plans
    pruned_other = _net()
    record_plan(pruned_other, FilterPruner(pruned_other, SHAPE).prune({"3": 0.5}))
    with pytest.raises(ValueError, match="already pruned by 1 plan.*freshly built"):
        load_pruned(pruned_other, tmp_path / "ck")

    # a pruning step that was never recorded: the weights do not fit, and the message says why
    unrecorded = _net()
    FilterPruner(unrecorded, SHAPE).prune({"0": 0.5})
    unrecorded.__dict__.pop("_prune_plans")  # as if sliced by hand, outside FilterPruner
    save_pruned(unrecorded, tmp_path / "lost")
    with pytest.raises(ValueError, match=r"0.weight: checkpoint \[4, 1, 3, 3\], network \[8, 1, 3, 3\].*record_plan"
                                         r".*from_shapes=True"):
        load_pruned(_net(), tmp_path / "lost")
    found = load_pruned(_net(), tmp_path / "lost", input_shape=SHAPE, from_shapes=True)  # the plan file ignored
    np.testing.assert_allclose(_out(found, _x()), _out(unrecorded, _x()), atol=1e-6)

    plan_file = tmp_path / ("ck" + PLANS_SUFFIX)
    header = json.loads(plan_file.read_text())
    plan_file.write_text(json.dumps(dict(header, format=99)))
    with pytest.raises(ValueError, match="has format 99; .* reads format 1"):
        load_pruned(_net(), tmp_path / "ck")
    plan_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_plans(tmp_path / "ck")


# -- paddle.Model: save_pruned, PrunedModelCheckpoint, resumed fit ---------------------------------------------
def _data(n: int = 48) -> paddle.io.Dataset:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 1, 8, 8)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64").reshape(-1, 1) + 2 * (x[:, 0, 0, 0] > 0).reshape(-1, 1)
    return paddle.io.TensorDataset([paddle.to_tensor(x), paddle.to_tensor(y)])


def _model(net: paddle.nn.Layer) -> paddle.Model:
    model = paddle.Model(net, paddle.static.InputSpec([None, 1, 8, 8], "float32", "x"),
                         paddle.static.InputSpec([None, 1], "int64", "label"))
    sched = paddle.optimizer.lr.StepDecay(0.05, step_size=2, gamma=0.5)
    model.prepare(paddle.optimizer.Momentum(sched, momentum=0.9, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return model


def test_model_checkpoint_resumes_a_pruned_fit(tmp_path: Path) -> None:
    paddle.seed(2)
    data = _data()
    model = _model(_net())
    model.fit(data, batch_size=16, epochs=1, verbose=0)
    plan = FilterPruner(model.network, SHAPE).prune({"0": 0.5, "3": 0.5})
    model._optimizer = rebuild_optimizer(model._optimizer, model.network, plan.param_slices)
    record_plan(model, plan)  # what the prune callback does (the pruner has recorded it already)
    ckpt = tmp_path / "ckpt"
    model.fit(data, batch_size=16, epochs=1, verbose=0,
              callbacks=[PrunedModelCheckpoint(save_dir=str(ckpt))])
    for name in ("0", "final"):
        assert {f"{name}{s}" for s in (".pdparams", ".pdopt", PLANS_SUFFIX)} <= set(os.listdir(ckpt))
        assert [p.ratios for p in read_plans(ckpt / name)] == [{"0": 0.5, "3": 0.5}]

    fresh = _model(_net())  # other unique parameter names than the saved ones
    assert fresh.network[0].weight.name != model.network[0].weight.name
    assert load_pruned(fresh, ckpt / "final") is fresh.network
    assert fresh.network[3].weight.shape == [8, 4, 3, 3]
    sched, fresh_sched = model._optimizer._learning_rate, fresh._optimizer._learning_rate
    assert (fresh_sched.last_epoch, fresh_sched()) == (sched.last_epoch, sched()) != (0, 0.05)

    # one more step from the same state gives the same parameters: velocity and LR were resumed
    x, y = data[:16]
    model.train_batch([x], [y])
    fresh.train_batch([x], [y])
    for (key, a), b in zip(model.network.named_parameters(), fresh.network.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7, err_msg=key)

    fresh.fit(data, batch_size=16, epochs=1, verbose=0)  # and training goes on with the pruned net
    assert fresh.network[0].weight.shape == [4, 1, 3, 3]
    save_pruned(fresh, tmp_path / "again")  # the loaded model keeps its plans
    assert len(read_plans(tmp_path / "again")) == 1
    again = _model(_net())
    load_pruned(again, tmp_path / "again", optimizer=False)
    assert not again._optimizer._accumulators_holder  # optimizer=False left the optimizer alone
    np.testing.assert_allclose(_out(again.network, _x()), _out(fresh.network, _x()), atol=1e-6)


def test_model_save_is_left_alone_and_errors(tmp_path: Path) -> None:
    paddle.seed(4)
    model = _model(_net())
    assert "save" not in vars(model)  # the user's Model keeps paddle's own save
    save_pruned(model, tmp_path / "before")  # before any pruning: an empty plan list
    assert read_plans(tmp_path / "before") == []

    plan = FilterPruner(model.network, SHAPE).prune({"3": 0.5})  # the pruner records its plan
    assert recorded_plans(model) == [plan]
    written = save_pruned(model, tmp_path / "m")
    assert sorted(os.path.basename(p) for p in written) == ["m.pdopt", "m.pdparams", "m" + PLANS_SUFFIX]
    assert [p.ratios for p in read_plans(tmp_path / "m")] == [{"3": 0.5}]
    model.save(str(tmp_path / "m2"))  # paddle's save: weights only, and loading says what to use
    assert not os.path.exists(tmp_path / ("m2" + PLANS_SUFFIX))
    from_shapes = _model(_net())  # no plan file: read from the shapes at the Model's input spec
    load_pruned(from_shapes, tmp_path / "m2")
    assert from_shapes.network[3].weight.shape == [8, 8, 3, 3]
    np.testing.assert_allclose(_out(from_shapes.network, _x()), _out(model.network, _x()), atol=1e-6)

    unprepared = paddle.Model(_net())  # no optimizer: only the weights are loaded
    load_pruned(unprepared, tmp_path / "m")
    assert unprepared.network[3].weight.shape == [8, 8, 3, 3]

    stepped = _model(_net())
    stepped.train_batch([_x(n=8)], [paddle.zeros([8, 1], "int64")])
    with pytest.raises(ValueError, match="already stepped on the unpruned network"):
        load_pruned(stepped, tmp_path / "m")


# -- export ----------------------------------------------------------------------------------------------
class _TrainShift(paddle.nn.Layer):
    """Python-level train/eval branch: only tracing in eval mode exports the eval behaviour."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + 1.0 if self.training else x


def test_export_matches_eager_outputs_and_restores_modes(tmp_path: Path) -> None:
    net, _ = _pruned_twice()
    assert export(net, tmp_path / "default")  # input spec from the recorded plans: [None, 1, 8, 8]
    assert paddle.jit.load(str(tmp_path / "default"))(_x(n=2)).shape == [2, 4]
    net = paddle.nn.Sequential(net, _TrainShift())
    net.train()
    net[0][1].eval()  # a mixed state must come back as it was
    written = export(net, tmp_path / "inf", [None, 1, 8, 8])
    assert {os.path.basename(p) for p in written} >= {"inf.pdiparams"} and all(map(os.path.exists, written))
    assert net.training and net[1].training and not net[0][1].training and net[0][4].training
    x = _x(5, n=3)  # a batch size other than the plans' 1
    expected = _out(net, x)
    loaded = paddle.jit.load(str(tmp_path / "inf"))
    np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-5)

    from paddle import inference
    model_file = next(p for p in written if p.endswith((".json", ".pdmodel")))
    config = inference.Config(model_file, str(tmp_path / "inf.pdiparams"))
    config.disable_gpu()
    predictor = inference.create_predictor(config)
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(x.numpy())
    predictor.run()
    out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    np.testing.assert_allclose(out, expected, atol=1e-5)

    spec = paddle.static.InputSpec([None, 1, 8, 8], "float32", "image")
    assert export(net, tmp_path / "spec", [spec]) and export(net, tmp_path / "shape", [[2, 1, 8, 8]])
    with pytest.raises(ValueError, match="input_spec is required"):
        export(_net(), tmp_path / "x")
    with pytest.raises(TypeError, match="input_spec must be a shape"):
        export(net, tmp_path / "x", "1x8x8")
    with pytest.raises(ValueError, match="is not a shape"):
        export(net, tmp_path / "x", [1, 0, 8, 8])


def test_exported_size_shrinks_with_the_parameters(tmp_path: Path) -> None:
    def wide() -> paddle.nn.Layer:
        return paddle.nn.Sequential(
            paddle.nn.Conv2D(3, 32, 3, padding=1), paddle.nn.BatchNorm2D(32), paddle.nn.ReLU(),
            paddle.nn.Conv2D(32, 64, 3, padding=1), paddle.nn.BatchNorm2D(64), paddle.nn.ReLU(),
            paddle.nn.Conv2D(64, 64, 3, padding=1), paddle.nn.BatchNorm2D(64), paddle.nn.ReLU(),
            paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(64, 10))

    full, pruned = wide(), wide()
    plan = FilterPruner(pruned, [1, 3, 8, 8]).prune({"0": 0.3, "3": 0.3, "6": 0.3})
    assert 0.4 < 1 - plan.pruned_params < 0.6  # about half the parameters are gone
    sizes = []
    for name, net in (("full", full), ("pruned", pruned)):
        export(net, tmp_path / name, [None, 3, 8, 8])
        sizes.append(os.path.getsize(tmp_path / f"{name}.pdiparams"))
    params_ratio = count_params(pruned) / count_params(full)
    assert abs(sizes[1] / sizes[0] / params_ratio - 1) < 0.2, (sizes, params_ratio)


def test_pruned_model_checkpoint_is_a_model_checkpoint_and_checks_arguments() -> None:
    ckpt = PrunedModelCheckpoint(2, Path("ck"))
    # fit adds its own ModelCheckpoint (which writes no plans) only when none is given
    assert isinstance(ckpt, paddle.callbacks.ModelCheckpoint) and (ckpt.save_freq, ckpt.save_dir) == (2, "ck")
    with pytest.raises(ValueError, match="save_freq must be an int >= 0"):
        PrunedModelCheckpoint(-1, "ck")
    with pytest.raises(TypeError, match="save_dir must be a directory path or None"):
        PrunedModelCheckpoint(1, 3)
    with pytest.raises(TypeError, match="plan must be a PrunePlan"):
        record_plan(_net(), {"groups": []})


def test_save_freq_zero_saves_only_the_final_checkpoint(tmp_path: Path) -> None:
    paddle.seed(5)
    model = _model(_net())
    model.fit(_data(), batch_size=16, epochs=2, verbose=0,
              callbacks=[PrunedModelCheckpoint(save_freq=0, save_dir=tmp_path / "ck")])
    assert sorted(os.listdir(tmp_path / "ck")) == ["final.pdopt", "final.pdparams", "final.prune.json"]
