"""Checkpoints without a plan file (paddle's ModelCheckpoint, `paddle.save(net.state_dict())`) of pruned
networks load into fresh copies: the architecture is read from the weights' shapes (prune_callbacks.deploy.shapes)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import paddle
import pytest
from paddle.static import InputSpec
from paddle.vision.models import mobilenet_v1, resnet18, shufflenet_v2_x0_25

from prune_callbacks import FilterPruneCallback, FilterPruner, recorded_plans, save_pruned
from prune_callbacks.deploy.io import PLANS_SUFFIX, load_pruned, read_plans
from prune_callbacks.deploy.shapes import SHAPES_CRITERION, prune_to_state_dict

SHAPE = [1, 3, 32, 32]
CLASSES = 4
ARCHS: dict[str, Callable[[], paddle.nn.Layer]] = {
    "mobilenet_v1": lambda: mobilenet_v1(scale=0.25, num_classes=CLASSES),
    "resnet18": lambda: resnet18(num_classes=CLASSES),  # residual groups through its downsample convs
    "shufflenet_v2": lambda: shufflenet_v2_x0_25(num_classes=CLASSES),  # routed stage groups
}


def _data(n: int = 8) -> paddle.io.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 32, 32)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n, 1)).astype("int64")
    return paddle.io.TensorDataset([paddle.to_tensor(x), paddle.to_tensor(y)])


def _model(net: paddle.nn.Layer) -> paddle.Model:
    model = paddle.Model(net, InputSpec([None, 3, 32, 32], "float32", "x"), InputSpec([None, 1], "int64", "y"))
    model.prepare(paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=net.parameters()),
                  paddle.nn.CrossEntropyLoss())
    return model


def _out(net: paddle.nn.Layer, x: paddle.Tensor) -> np.ndarray:
    net.eval()
    with paddle.no_grad():
        return net(x).numpy()


def _uneven_prune(net: paddle.nn.Layer) -> None:
    """Every prunable group loses 25%, 50% or 62.5%: kept counts differ from group to group."""
    pruner = FilterPruner(net, SHAPE)
    ratios = (0.25, 0.5, 0.625)
    pruner.prune({g.name: ratios[i % 3] for i, g in enumerate(pruner.prunable_groups)})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_model_checkpoint_and_state_dict_of_pruned_zoo_nets_reload(arch: str, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    paddle.seed(0)
    build = ARCHS[arch]
    model = _model(build())
    _uneven_prune(model.network)
    model.prepare(paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=model.network.parameters()),
                  paddle.nn.CrossEntropyLoss())
    data = _data()
    model.fit(data, batch_size=4, epochs=1, verbose=0,
              callbacks=[paddle.callbacks.ModelCheckpoint(save_dir=str(tmp_path / "ckpt"))])
    assert not os.path.exists(tmp_path / "ckpt" / ("final" + PLANS_SUFFIX))  # paddle's files only
    paddle.save(model.network.state_dict(), str(tmp_path / "sd.pdparams"))
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype("float32"))
    want = _out(model.network, x)

    fresh = _model(build())
    with caplog.at_level(logging.INFO, logger="prune_callbacks.deploy.io"):
        load_pruned(fresh, tmp_path / "ckpt" / "final")
    said = [r.getMessage() for r in caplog.records if "inferred from the weights' shapes" in r.getMessage()]
    assert len(said) == 1 and "optimizer state" in said[0]
    np.testing.assert_array_equal(_out(fresh.network, x), want)
    (plan,) = recorded_plans(fresh)
    assert plan.criterion == SHAPES_CRITERION and plan.flops_after < plan.flops_before

    # the optimizer state came along: one more step from the same state gives the same weights
    xb, yb = data[:4]
    model.network.train()
    fresh.network.train()
    model.train_batch([xb], [yb])
    fresh.train_batch([xb], [yb])
    for (key, a), b in zip(model.network.named_parameters(), fresh.network.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)

    net = prune_to_state_dict(build(), paddle.load(str(tmp_path / "sd.pdparams")), SHAPE)
    np.testing.assert_array_equal(_out(net, x), want)


def test_prune_callback_with_paddle_model_checkpoint_reloads(tmp_path: Path) -> None:
    """The issue's story: FilterPruneCallback and paddle's own ModelCheckpoint in one fit, then load_pruned."""
    paddle.seed(1)
    model = _model(ARCHS["mobilenet_v1"]())
    model.fit(_data(), batch_size=4, epochs=2, verbose=0,
              callbacks=[FilterPruneCallback(flops=0.4, at_epoch=0),
                         paddle.callbacks.ModelCheckpoint(save_dir=str(tmp_path / "ckpt"))])
    fresh = load_pruned(ARCHS["mobilenet_v1"](), tmp_path / "ckpt" / "final", input_shape=SHAPE)
    x = paddle.ones([1, 3, 32, 32])
    np.testing.assert_array_equal(_out(fresh, x), _out(model.network, x))
    save_pruned(fresh, tmp_path / "again")  # the inferred plan is recorded: saving again writes it
    assert len(read_plans(tmp_path / "again")) == 1
    again = load_pruned(ARCHS["mobilenet_v1"](), tmp_path / "again")  # through the plan file now
    np.testing.assert_array_equal(_out(again, x), _out(model.network, x))


def test_tampered_shapes_are_refused_naming_the_parameter() -> None:
    paddle.seed(2)
    net = ARCHS["mobilenet_v1"]()
    _uneven_prune(net)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    bn = "conv1.1.weight"
    kept = state[bn].shape[0]
    tampered = dict(state, **{bn: state[bn][:-1]})
    with pytest.raises(ValueError, match=rf"disagree on group 'conv1.0': parameter '{bn}' holds "
                                         rf"{kept - 1} of its channels, parameter 'conv1.0.weight' holds {kept}"):
        prune_to_state_dict(ARCHS["mobilenet_v1"](), tampered, SHAPE)
    wider = dict(state, **{"conv1.0.weight": np.zeros([99, 3, 3, 3], "float32")})
    with pytest.raises(ValueError, match=r"'conv1.0.weight' has 99 positions on axis 0.*fits no channel "
                                         r"count of group 'conv1.0' \(1 to 8 in this network\)"):
        prune_to_state_dict(ARCHS["mobilenet_v1"](), wider, SHAPE)
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\].*same architecture"):
        prune_to_state_dict(ARCHS["mobilenet_v1"](), {k: v for k, v in state.items() if k != "fc.bias"}, SHAPE)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        prune_to_state_dict(ARCHS["mobilenet_v1"](), [1, 2], SHAPE)


def test_a_linear_after_a_flatten_holds_each_channel_at_every_position() -> None:
    """The classifier's input axis holds each conv channel 8x8 times: its equation solves too."""
    def build() -> paddle.nn.Layer:
        return paddle.nn.Sequential(paddle.nn.Conv2D(1, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
                                    paddle.nn.Flatten(), paddle.nn.Linear(8 * 8 * 8, 4))

    paddle.seed(4)
    net = build()
    FilterPruner(net, [1, 1, 8, 8]).prune({"0": 0.625})
    assert net[4].weight.shape == [3 * 64, 4]
    fresh = prune_to_state_dict(build(), net.state_dict(), [1, 1, 8, 8])
    x = paddle.ones([2, 1, 8, 8])
    np.testing.assert_array_equal(_out(fresh, x), _out(net, x))
    with pytest.raises(ValueError, match=r"cannot trace Sequential at input shape \[1, 3, 224, 224\].*pass input_shape"):
        prune_to_state_dict(build(), net.state_dict())  # the default shape does not fit this network


def test_an_unpruned_state_dict_loads_unchanged() -> None:
    paddle.seed(3)
    src = ARCHS["resnet18"]()
    net = prune_to_state_dict(ARCHS["resnet18"](), src.state_dict(), SHAPE)
    assert recorded_plans(net) == []
    x = paddle.ones([1, 3, 32, 32])
    np.testing.assert_array_equal(_out(net, x), _out(src, x))


# -- the app: trainer.resume from paddle's own ModelCheckpoint (no plan files) ----------------------------------
from test_image_folder import folder_cfg, image_folder  # noqa: E402,F401  (the fixture, and its config)

from prune_callbacks.app import ConfigError, train  # noqa: E402


def test_app_resumes_a_paddle_model_checkpoint_of_a_pruned_run(image_folder: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    base = [f"data.path={image_folder}", "prune.strategy=uniform", "callbacks=[none,model_checkpoint]",
            "callbacks.model_checkpoint._target_=paddle.callbacks.ModelCheckpoint"]
    done = train(folder_cfg(base, first))
    ckpt = first / "checkpoints" / "0"  # saved at the end of epoch 0, just after pruning
    assert not os.path.exists(str(ckpt) + PLANS_SUFFIX)
    again = train(folder_cfg([*base, "trainer.epochs_after=2", f"trainer.resume={ckpt}"], tmp_path / "second"))
    assert again["resumed_at_epoch"] == 1
    assert (again["flops_before"], again["flops_after"]) == (done["flops_before"], done["flops_after"])
    with pytest.raises(ConfigError, match=r"no plan file and its weights' shapes show a pruned network after 1 "
                                          r"epoch\(s\), but this config prunes 0 time\(s\)"):
        train(folder_cfg([*base, "trainer.epochs_before=2", "trainer.epochs_after=1", f"trainer.resume={ckpt}"],
                         tmp_path / "third"))
