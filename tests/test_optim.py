"""Tests of prune_callbacks.training.optim: a rebuilt optimizer steps a pruned net exactly as the old one steps
the same net with the pruned channels zeroed (masked), and keeps parameters, groups and schedulers."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
import pytest

from prune_callbacks.training.optim import rebuild_optimizer, register_optimizer
from prune_callbacks.layers.surgery import slice_array

KEEP = [0, 2, 3, 5]  # of 6 hidden channels; 1 and 4 are pruned
DROP = [1, 4]
OptFactory = Callable[[paddle.nn.Layer], paddle.optimizer.Optimizer]


def _mlp() -> paddle.nn.Layer:
    return paddle.nn.Sequential(paddle.nn.Linear(4, 6), paddle.nn.ReLU(), paddle.nn.Linear(6, 3))


def _cnn() -> paddle.nn.Layer:
    # No conv bias before BN: its true gradient is 0, so adaptive optimizers would amplify round-off.
    return paddle.nn.Sequential(paddle.nn.Conv2D(2, 6, 3, padding=1, bias_attr=False),
                                paddle.nn.BatchNorm2D(6), paddle.nn.ReLU(), paddle.nn.Conv2D(6, 3, 3))


# Linear weights are [in, out]; conv weights [out, in, kh, kw]. Both slice the 6 hidden channels.
MLP_SLICES = {"0.weight": {1: KEEP}, "0.bias": {0: KEEP}, "2.weight": {0: KEEP}}
CNN_SLICES = {"0.weight": {0: KEEP}, "1.weight": {0: KEEP}, "1.bias": {0: KEEP},
              "1._mean": {0: KEEP}, "1._variance": {0: KEEP}, "3.weight": {1: KEEP}}


def _batch(net_kind: str, seed: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    rng = np.random.default_rng(seed)
    shape = (8, 4) if net_kind == "mlp" else (8, 2, 5, 5)
    x = paddle.to_tensor(rng.normal(size=shape).astype("float32"))
    y = paddle.to_tensor(rng.normal(size=(8, 3) if net_kind == "mlp" else (8, 3, 3, 3)).astype("float32"))
    return x, y


def _step(net: paddle.nn.Layer, opt: paddle.optimizer.Optimizer, batch: tuple) -> None:
    x, y = batch
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    opt.clear_grad()


def _set(net: paddle.nn.Layer, name: str, array: np.ndarray) -> None:
    dict(net.named_parameters())[name].get_tensor().set(np.ascontiguousarray(array), paddle.CPUPlace())


def _take(array: np.ndarray, axes: dict[int, list[int]]) -> np.ndarray:
    for axis, idx in axes.items():
        array = np.take(array, idx, axis=axis)
    return array


def _mask(net: paddle.nn.Layer, slices: dict) -> None:
    """Zeroes the pruned channels at every producer and consumer (the masked twin of pruning)."""
    for name, axes in slices.items():
        array = dict(net.named_parameters())[name].numpy().copy()
        for axis, keep in axes.items():
            index = [slice(None)] * array.ndim
            index[axis] = [i for i in range(array.shape[axis]) if i not in keep]
            array[tuple(index)] = 0.0
        _set(net, name, array)


def _prune(net: paddle.nn.Layer, slices: dict) -> None:
    for name, axes in slices.items():
        _set(net, name, _take(dict(net.named_parameters())[name].numpy(), axes))


def _twins(make_net: Callable[[], paddle.nn.Layer], make_opt: OptFactory, kind: str, steps: int = 3):
    """Two identical nets trained identically, so their optimizers hold non-trivial, equal state."""
    paddle.seed(0)
    net_a, net_b = make_net(), make_net()
    net_b.set_state_dict(net_a.state_dict())
    opt_a, opt_b = make_opt(net_a), make_opt(net_b)
    for s in range(steps):
        _step(net_a, opt_a, _batch(kind, s))
        _step(net_b, opt_b, _batch(kind, s))
    return net_a, opt_a, net_b, opt_b


def _momentum(net):
    return paddle.optimizer.Momentum(0.05, momentum=0.9, use_nesterov=True, parameters=net.parameters(),
                                     weight_decay=paddle.regularizer.L2Decay(0.01))


def _momentum_groups(net):
    first, second = net.parameters()[:2], net.parameters()[2:]
    return paddle.optimizer.Momentum(
        0.05, momentum=0.8, weight_decay=0.02, parameters=[
            {"params": first, "weight_decay": 0.1, "learning_rate": 0.5}, {"params": second}])


def _adam(net):
    return paddle.optimizer.Adam(0.01, beta1=0.8, beta2=0.95, epsilon=1e-6, parameters=net.parameters(),
                                 weight_decay=paddle.regularizer.L1Decay(0.001), amsgrad=True,
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5))


def _adamw(net):
    return paddle.optimizer.AdamW(0.01, parameters=net.parameters(), weight_decay=0.1,
                                  apply_decay_param_fun=lambda name: "w_" in name)


OPTIMIZERS = {
    "momentum": _momentum,
    "momentum_groups": _momentum_groups,
    "adam": _adam,
    "adamw": _adamw,
    "rmsprop": lambda net: paddle.optimizer.RMSProp(0.01, momentum=0.5, centered=True,
                                                    parameters=net.parameters()),
    "momentum_multi_tensor": lambda net: paddle.optimizer.Momentum(
        0.05, parameters=net.parameters(), use_multi_tensor=True, weight_decay=0.01),
    "adam_multi_tensor": lambda net: paddle.optimizer.Adam(0.01, parameters=net.parameters(),
                                                           use_multi_tensor=True),
    "adagrad": lambda net: paddle.optimizer.Adagrad(0.1, parameters=net.parameters()),
    "sgd": lambda net: paddle.optimizer.SGD(0.1, parameters=net.parameters(), weight_decay=0.01),
}
NETS = {"mlp": (_mlp, MLP_SLICES), "cnn": (_cnn, CNN_SLICES)}


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_pruned_step_equals_masked_step_on_kept_entries(kind: str, opt_name: str) -> None:
    make_net, slices = NETS[kind]
    net_a, opt_a, net_b, opt_b = _twins(make_net, OPTIMIZERS[opt_name], kind)
    _prune(net_b, slices)
    new = rebuild_optimizer(opt_b, net_b, slices)
    assert type(new) is type(opt_b) and new is not opt_b
    for s in range(3, 6):  # several steps: state and step counters must keep matching
        _mask(net_a, slices)  # re-zero: the old state moves masked entries away from 0 each step
        _step(net_a, opt_a, _batch(kind, s))
        _step(net_b, new, _batch(kind, s))
        params_b = dict(net_b.named_parameters())
        for name, param_a in net_a.named_parameters():
            expected = _take(param_a.numpy(), slices.get(name, {}))
            np.testing.assert_allclose(params_b[name].numpy(), expected, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{opt_name}/{kind} step {s}: {name}")


def test_rebuilt_state_is_sliced_and_old_optimizer_untouched() -> None:
    _, _, net, opt = _twins(_mlp, _adam, "mlp")
    w = net[0].weight
    old_m1 = opt._accumulators["moment1"][w.name].numpy()
    old_b1 = opt._accumulators["beta1_pow_acc"][w.name].numpy()
    _prune(net, MLP_SLICES)
    new = rebuild_optimizer(opt, net, MLP_SLICES)
    np.testing.assert_array_equal(new._accumulators["moment1"][w.name].numpy(), old_m1[:, KEEP])
    np.testing.assert_allclose(new._accumulators["beta1_pow_acc"][w.name].numpy(), old_b1)
    np.testing.assert_allclose(old_b1, [0.8 ** 4], rtol=1e-6)  # starts at beta, x beta per step: 3 steps
    assert opt._accumulators["moment1"][w.name].shape == [4, 6]
    # same accumulator names, so the new optimizer's checkpoint matches the old naming
    assert sorted(new.state_dict()) == sorted(opt.state_dict())
    max_key = next(k for k in opt._accumulators if "moment2_max" in k)  # amsgrad state
    assert new._accumulators[max_key][w.name].shape == [4, 4]


def test_hyper_parameters_and_parameter_identity_are_kept() -> None:
    net = _mlp()
    net[2].bias.stop_gradient = True  # frozen but still handed to the optimizer: must stay in it
    opt = _adamw(net)
    new = rebuild_optimizer(opt, net, {})
    assert len(new._parameter_list) == len(net.parameters())
    assert all(a is b for a, b in zip(new._parameter_list, net.parameters()))
    assert (new._beta1, new._beta2, new._epsilon, new._weight_decay) == (0.9, 0.999, 1e-8, 0.1)
    assert new._apply_decay_param_fun is opt._apply_decay_param_fun

    subset = paddle.optimizer.Momentum(0.1, parameters=net[0].parameters(), use_nesterov=True,
                                       weight_decay=paddle.regularizer.L2Decay(0.03))
    new = rebuild_optimizer(subset, net, {})
    assert [id(p) for p in new._parameter_list] == [id(p) for p in net[0].parameters()]
    assert (new._use_nesterov, new._regularization_method, new._regularization_coeff) == \
        (True, "l2_decay", 0.03)

    l1 = paddle.regularizer.L1Decay(0.2)
    new = rebuild_optimizer(paddle.optimizer.Adam(parameters=net.parameters(), weight_decay=l1), net, {})
    assert new.regularization is l1

    groups = rebuild_optimizer(_momentum_groups(net), net, {})._param_groups
    assert [g["params"][0] is p for g, p in zip(groups, (net[0].weight, net[2].weight))] == [True, True]
    assert (groups[0]["regularization_coeff"], groups[0]["learning_rate"]) == (0.1, 0.5)
    assert groups[1]["regularization_coeff"] == 0.02


def test_lr_scheduler_is_the_same_object_and_continues() -> None:
    net = _mlp()
    sched = paddle.optimizer.lr.StepDecay(0.1, step_size=2, gamma=0.5)
    opt = paddle.optimizer.SGD(sched, parameters=net.parameters())
    for s in range(3):
        _step(net, opt, _batch("mlp", s))
        sched.step()
    _prune(net, MLP_SLICES)
    new = rebuild_optimizer(opt, net, MLP_SLICES)
    assert new._learning_rate is sched and sched.last_epoch == 3
    assert new.get_lr() == pytest.approx(0.05)
    sched.step()
    assert new.get_lr() == pytest.approx(0.025)
    before = net[2].bias.numpy()
    x, y = _batch("mlp", 9)
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    grad = net[2].bias.grad.numpy()
    new.step()
    np.testing.assert_allclose(net[2].bias.numpy(), before - 0.025 * grad, rtol=1e-5)


def test_unknown_optimizer_class_raises_with_remedy() -> None:
    net = _mlp()
    with pytest.raises(TypeError, match=r"Lamb.*register_optimizer.*yourself"):
        rebuild_optimizer(paddle.optimizer.Lamb(parameters=net.parameters()), net, {})

    class MyAdam(paddle.optimizer.Adam):
        pass

    with pytest.raises(TypeError, match="MyAdam"):
        rebuild_optimizer(MyAdam(parameters=net.parameters()), net, {})
    register_optimizer(MyAdam, lambda opt: {"learning_rate": opt._learning_rate, "beta1": opt._beta1})
    assert type(rebuild_optimizer(MyAdam(beta1=0.7, parameters=net.parameters()), net, {})) is MyAdam
    with pytest.raises(TypeError, match="Optimizer subclass"):
        register_optimizer(dict, lambda opt: {})


def test_bad_slices_raise_value_errors() -> None:
    net = _mlp()
    opt = _momentum(net)
    with pytest.raises(ValueError, match=r"'fc1.weight'.*valid names.*0.weight"):
        rebuild_optimizer(opt, net, {"fc1.weight": {1: KEEP}})
    with pytest.raises(ValueError, match="slice the parameters before"):
        rebuild_optimizer(opt, net, {"0.weight": {1: KEEP}})  # not shrunk yet
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        rebuild_optimizer(opt, net, {"0.weight": {2: KEEP}})
    _step(net, opt, _batch("mlp", 0))  # now there is velocity to slice
    _prune(net, MLP_SLICES)
    with pytest.raises(ValueError, match="within the parameter's original size"):
        rebuild_optimizer(opt, net, {"0.weight": {1: [0, 2, 3, 9]}})


def test_fp32_master_weights_are_sliced_not_recast_from_low_precision() -> None:
    # SGD is the one optimizer with a bfloat16 multi_precision kernel on CPU in paddle 3.3.1 (and that
    # kernel leaves the master untouched), so this checks the carried state, not a training step.
    net = _mlp()
    net.to(dtype="bfloat16")
    opt = paddle.optimizer.SGD(0.1, parameters=net.parameters(), multi_precision=True)
    sum((p.astype("float32") ** 2).sum() for p in net.parameters()).backward()
    opt.step()
    opt.clear_grad()
    w = net[0].weight
    old_master = opt._master_weights[w.name]
    assert old_master.dtype == paddle.float32
    # fp32 values a bf16 parameter cannot hold: re-creating the master from the param would lose them
    fine = np.random.default_rng(0).normal(size=old_master.shape).astype("float32")
    old_master.set_value(fine)
    _set(net, "0.weight", w.numpy()[:, KEEP])  # bf16 arrives in numpy as uint16; set keeps the dtype
    _set(net, "0.bias", net[0].bias.numpy()[KEEP])
    _set(net, "2.weight", net[2].weight.numpy()[KEEP])
    assert w.dtype == paddle.bfloat16 and w.shape == [4, 4]
    new = rebuild_optimizer(opt, net, MLP_SLICES)
    master = new._master_weights[w.name]
    assert master.name == old_master.name and master is not old_master
    np.testing.assert_array_equal(master.numpy(), fine[:, KEEP])
    np.testing.assert_array_equal(new._master_weights[net[2].weight.name].numpy()[:, 0],
                                  opt._master_weights[net[2].weight.name].numpy()[KEEP, 0])
    np.testing.assert_array_equal(old_master.numpy(), fine)  # the old optimizer is left alone


def _grouped_cnn(groups: int) -> paddle.nn.Layer:
    # The middle conv is grouped (not depthwise): pruning its input channels gives its weight a per-block
    # slice on axis 1, one list of kept in-block indices per group.
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(2, 8, 3, padding=1, bias_attr=False), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1, groups=groups, bias_attr=False), paddle.nn.BatchNorm2D(8),
        paddle.nn.ReLU(), paddle.nn.Conv2D(8, 3, 3))


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("ratios", [{"0": 0.5}, {"0": 0.5, "3": 0.5}], ids=["in", "in+out"])
def test_grouped_conv_per_block_slices_carry_momentum_state(groups: int, ratios: dict) -> None:
    from prune_callbacks import FilterPruner
    from prune_callbacks.layers.surgery import Mask

    net_a, opt_a, net_b, opt_b = _twins(lambda: _grouped_cnn(groups), _momentum, "cnn")
    w = net_b[3].weight
    old_velocity = opt_b._accumulators["velocity"][w.name].numpy()
    assert np.abs(old_velocity).min() > 0  # real state, so a wrong slice cannot pass by accident

    plan = FilterPruner(net_b, [1, 2, 5, 5]).prune(ratios)
    blocks = plan.param_slices["3.weight"][1]
    assert len(blocks) == groups and all(len(b) == 8 // groups // 2 for b in blocks)  # half of each block
    new = rebuild_optimizer(opt_b, net_b, plan.param_slices)

    # independent expectation: each block of output rows keeps its own input columns
    rows = old_velocity.shape[0] // groups
    expected = np.concatenate([old_velocity[b * rows:(b + 1) * rows][:, list(cols)]
                               for b, cols in enumerate(blocks)])
    if 0 in plan.param_slices["3.weight"]:
        expected = expected[list(plan.param_slices["3.weight"][0])]
    velocity = new._accumulators["velocity"][w.name]
    assert velocity.shape == w.shape == list(expected.shape)
    np.testing.assert_array_equal(velocity.numpy(), expected)

    # and the pruned net keeps stepping exactly like its masked twin
    pruner_a = FilterPruner(net_a, [1, 2, 5, 5])
    _, removed = pruner_a.slices({pruner_a.group_index(g.name): np.asarray(g.kept) for g in plan.groups})
    for s in range(3, 5):
        Mask(net_a, removed)  # (re-)zero the pruned channels; never restored
        _step(net_a, opt_a, _batch("cnn", s))
        _step(net_b, new, _batch("cnn", s))
        params_b = dict(net_b.named_parameters())
        for name, param_a in net_a.named_parameters():
            np.testing.assert_allclose(params_b[name].numpy(),
                                       slice_array(param_a.numpy(), plan.param_slices.get(name, {})),
                                       rtol=1e-5, atol=1e-6, err_msg=f"groups={groups} step {s}: {name}")


def test_bad_per_block_slices_raise_value_errors() -> None:
    net = _grouped_cnn(2)
    opt = _momentum(net)
    _step(net, opt, _batch("cnn", 0))
    _set(net, "3.weight", net[3].weight.numpy()[:, [0, 2]])  # each block keeps 2 of its 4 inputs
    with pytest.raises(ValueError, match=r"3.weight: per-block kept indices on axis 1 must keep 2"):
        rebuild_optimizer(opt, net, {"3.weight": {1: [[0, 2], [1]]}})
    with pytest.raises(ValueError, match="only valid on a grouped conv's input axis"):
        rebuild_optimizer(opt, net, {"3.weight": {0: [[0, 2], [1, 3]]}})
    with pytest.raises(ValueError, match="within the parameter's original size"):
        rebuild_optimizer(opt, net, {"3.weight": {1: [[0, 2], [1, 7]]}})
    new = rebuild_optimizer(opt, net, {"3.weight": {1: [[0, 2], [1, 3]]}})
    old = opt._accumulators["velocity"][net[3].weight.name].numpy()
    np.testing.assert_array_equal(new._accumulators["velocity"][net[3].weight.name].numpy(),
                                  np.concatenate([old[:4][:, [0, 2]], old[4:][:, [1, 3]]]))
