"""Sparse training before pruning: the regulariser's gradient by hand, its effect, its place in fit."""
from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import (FilterPruneCallback, FilterPruner, PruneVisualDL, SparsityCallback,
                             history_of)
from prune_callbacks.training.sparsity import EPS, GroupSparsity, Regulariser, grow, spread


class _Net(nn.Layer):
    """c1 -> b1 -> relu -> c2 (grouped, 2 blocks) -> mean -> fc: group c1 reaches c2 by blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2D(4)
        self.c2 = nn.Conv2D(4, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = nn.functional.relu(self.b1(self.c1(x)))
        return self.fc(nn.functional.relu(self.c2(x)).mean([2, 3]))


def _randomised(net: nn.Layer, seed: int = 0) -> nn.Layer:
    rng = np.random.RandomState(seed)
    for p in net.parameters():  # the running statistics too: they must not count
        p.set_value(rng.randn(*p.shape).astype("float32"))
    return net


def _sparsity(net: nn.Layer, kind: Regulariser) -> GroupSparsity:
    pruner = FilterPruner(net, [1, 3, 8, 8])
    groups = [gi for gi, g in enumerate(pruner.groups) if g.prunable]
    return GroupSparsity(pruner.graph, dict(net.named_parameters()), groups, kind)


def _hand_norms(w):
    """Per-channel group norms of `_Net` by hand: every parameter at channel c of group c1 (its
    filter and bias, BatchNorm scale and shift, and the inputs of c2 that read it: block c // 2
    of c2's filters, input position c % 2), and of group c2 (its filters, bias, fc's columns)."""
    c2_in = lambda c: w["c2.weight"][3 * (c // 2):3 * (c // 2 + 1), c % 2]  # noqa: E731
    n1 = np.array([np.sqrt((w["c1.weight"][c] ** 2).sum() + w["c1.bias"][c] ** 2
                           + w["b1.weight"][c] ** 2 + w["b1.bias"][c] ** 2
                           + (c2_in(c) ** 2).sum() + EPS) for c in range(4)])
    n2 = np.array([np.sqrt((w["c2.weight"][o] ** 2).sum() + w["c2.bias"][o] ** 2
                           + (w["fc.weight"][o] ** 2).sum() + EPS) for o in range(6)])
    return n1, n2


def test_group_lasso_gradient_equals_hand_computation():
    paddle.seed(0)
    net = _randomised(_Net())
    reg = _sparsity(net, Regulariser.GROUP)
    assert reg.names == ["c1", "c2"]
    rng = np.random.RandomState(1)
    lam = [rng.rand(4) + 0.5, rng.rand(6) + 0.5]
    net.clear_gradients()
    reg.penalty(lam).backward()
    w = {k: p.numpy().astype(np.float64) for k, p in net.named_parameters()}
    n1, n2 = _hand_norms(w)
    want_value = (lam[0] * n1).sum() + (lam[1] * n2).sum()
    assert float(reg.penalty(lam)) == pytest.approx(want_value, rel=1e-5)
    k1 = lam[0] / n1  # d/dw of lam * sqrt(sum w^2) is lam * w / norm
    k2 = lam[1] / n2
    want = {"c1.weight": w["c1.weight"] * k1[:, None, None, None], "c1.bias": w["c1.bias"] * k1,
            "b1.weight": w["b1.weight"] * k1, "b1.bias": w["b1.bias"] * k1,
            "c2.bias": w["c2.bias"] * k2, "fc.weight": w["fc.weight"] * k2[:, None],
            "fc.bias": np.zeros(4)}
    c2 = w["c2.weight"] * k2[:, None, None, None]  # as producer of group c2 ...
    for o in range(6):
        for j in range(2):  # ... and as consumer of group c1's channel 2 * block + j
            c2[o, j] += w["c2.weight"][o, j] * k1[2 * (o // 3) + j]
    want["c2.weight"] = c2
    for key, p in net.named_parameters():
        got = p.grad.numpy() if p.grad is not None else np.zeros(p.shape)
        want_p = want.get(key, np.zeros(p.shape))  # running mean/variance: untouched
        np.testing.assert_allclose(got, want_p, rtol=1e-4, atol=1e-6, err_msg=key)


def test_bn_scale_gradient_is_the_sign_of_gamma_only():
    net = _randomised(_Net(), seed=2)
    reg = _sparsity(net, Regulariser.BN_SCALE)
    assert reg.names == ["c1"]  # c2 has no BatchNorm after it
    lam = [np.array([0.1, 0.2, 0.3, 0.4])]
    net.clear_gradients()
    reg.penalty(lam).backward()
    gamma = net.b1.weight.numpy()
    np.testing.assert_allclose(net.b1.weight.grad.numpy(), lam[0] * np.sign(gamma), rtol=1e-6)
    assert net.b1.bias.grad is None or not net.b1.bias.grad.numpy().any()
    assert float(reg.penalty(lam)) == pytest.approx(float((lam[0] * np.abs(gamma)).sum()), rel=1e-6)


def test_proximal_step_equals_hand_computation():
    """Each channel's parameters scaled by max(0, 1 - lr * lam / norm), norms taken before the
    step, but the group's strongest channel; a parameter in two groups (c2's filters: producer
    of c2, consumer of c1) gets both."""
    net = _randomised(_Net())
    reg = _sparsity(net, Regulariser.GROUP)
    w = {k: p.numpy().astype(np.float64) for k, p in net.named_parameters()}
    n1, n2 = _hand_norms(w)
    lr = 0.1
    lam = [n1 * np.array([2.0, 15.0, 5.0, 0.0]), n2 * np.array([1, 2, 3, 4, 5, 20.0])]
    s1 = np.clip(1 - lr * lam[0] / n1, 0, 1)  # 0.8, 0 (zeroed), 0.5, 1 (untouched)
    s2 = np.clip(1 - lr * lam[1] / n2, 0, 1)
    s1[np.argmax(n1)] = s2[np.argmax(n2)] = 1  # each group's strongest channel is left alone
    assert (s1 == 0).any() and (s2 == 0).any()
    value = reg.proximal_step(lam, lr)
    assert value == pytest.approx((lam[0] * n1).sum() + (lam[1] * n2).sum(), rel=1e-5)
    want = {"c1.weight": w["c1.weight"] * s1[:, None, None, None], "c1.bias": w["c1.bias"] * s1,
            "b1.weight": w["b1.weight"] * s1, "b1.bias": w["b1.bias"] * s1,
            "b1._mean": w["b1._mean"], "b1._variance": w["b1._variance"],
            "c2.bias": w["c2.bias"] * s2, "fc.weight": w["fc.weight"] * s2[:, None],
            "fc.bias": w["fc.bias"]}
    c2 = w["c2.weight"] * s2[:, None, None, None]
    for o in range(6):
        for j in range(2):
            c2[o, j] *= s1[2 * (o // 3) + j]
    want["c2.weight"] = c2
    for key, p in net.named_parameters():
        np.testing.assert_allclose(p.numpy(), want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert not net.c1.weight.numpy()[s1 == 0].any() and not net.fc.weight.numpy()[s2 == 0].any()


def test_bn_scale_proximal_step_soft_thresholds_gamma():
    net = _randomised(_Net(), seed=2)
    reg = _sparsity(net, Regulariser.BN_SCALE)
    gamma, beta = net.b1.weight.numpy().copy(), net.b1.bias.numpy().copy()
    lam = [np.array([0.1, 0.2, 0.3, 100.0])]
    reg.proximal_step(lam, 0.5)
    want = np.sign(gamma) * np.maximum(np.abs(gamma) - 0.5 * lam[0], 0)
    strongest = np.argmax(np.abs(gamma))
    want[strongest] = gamma[strongest]  # left alone: the group never empties
    assert strongest != 3
    np.testing.assert_allclose(net.b1.weight.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(net.b1.bias.numpy(), beta)  # the shift is not penalised
    assert net.b1.weight.numpy()[3] == 0


def test_grow_pushes_the_weakest_channels_hardest_and_spread_reports_it():
    lam = grow([np.zeros(4)], [np.array([4.0, 1.0, 3.0, 2.0])], 0.3)[0]
    np.testing.assert_allclose(lam, [0.0, 0.3, 0.1, 0.2])
    cv, near_zero = spread({"a": np.array([1.0, 1.0]), "b": np.array([1.0, 0.001, 0.0, 1.0])})
    assert near_zero == pytest.approx(2 / 6)
    assert cv == pytest.approx((0.0 + np.std([1, 0.001, 0, 1]) / np.mean([1, 0.001, 0, 1])) / 2)


class _Data(paddle.io.Dataset):
    def __init__(self, n: int = 64) -> None:
        rng = np.random.RandomState(0)
        self.x = rng.randn(n, 3, 8, 8).astype("float32")
        self.y = ((self.x[:, 0].mean((1, 2)) > 0).astype("int64")
                  + 2 * (self.x[:, 1].mean((1, 2)) > 0).astype("int64"))[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _model(net: nn.Layer, optimizer: str = "momentum") -> paddle.Model:
    model = paddle.Model(net, [InputSpec([None, 3, 8, 8], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    opt = (paddle.optimizer.Momentum(0.05, parameters=net.parameters()) if optimizer == "momentum"
           else paddle.optimizer.Adam(0.01, parameters=net.parameters()))
    model.prepare(opt, nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return model


def _weak_share(net: nn.Layer) -> float:
    """Mean over groups of (mean of the weaker half of channel norms) / (group's largest)."""
    pruner = FilterPruner(net, [1, 3, 8, 8], criterion="group_l2")
    out = []
    for g in pruner.prunable_groups:
        s = np.sort(pruner.importance(g.name))
        out.append(s[: len(s) // 2].mean() / s[-1])
    return float(np.mean(out))


def test_sparsity_drives_the_ranked_channels_toward_zero():
    shares = {}
    for strength in (0.0, 1.0):
        paddle.seed(0)
        net = _Net()
        cbs = [SparsityCallback(kind="group", strength=strength, growing=1.0)] if strength else []
        _model(net).fit(_Data(), epochs=6, batch_size=16, verbose=0, callbacks=cbs)
        shares[strength] = _weak_share(net)
    assert shares[1.0] < 0.5 * shares[0.0], shares


def test_proximal_steps_shrink_weak_channels_under_adam():
    """Adam rescales a penalty's gradient like the task's, so it barely shrinks anything;
    "auto" steps proximally with Adam, and the weak channels fall much further (no group
    empties: its strongest channel is left alone)."""
    shares = {}
    for method in ("none", "gradient", "auto"):
        paddle.seed(0)
        net = _Net()
        cb = SparsityCallback(kind="group", strength=3.0, growing=3.0, method=method) \
            if method != "none" else None
        _model(net, "adam").fit(_Data(), epochs=4, batch_size=16, verbose=0,
                                callbacks=[cb] if cb else [])
        shares[method] = _weak_share(net)
        if cb is not None:
            assert cb.method == ("gradient" if method == "gradient" else "proximal")
    assert shares["auto"] < 0.5 * shares["gradient"] and shares["auto"] < 0.5 * shares["none"], shares
    assert all(np.abs(p.numpy()).max() > 0 for p in (net.c1.weight, net.c2.weight))


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_sparsity_then_pruning_in_one_fit(optimizer, tmp_path):
    paddle.seed(0)
    net = _Net()
    model = _model(net, optimizer)
    task_loss = model._loss
    seen = []

    class Penalties(paddle.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            seen.append(len(sparsity._epoch_penalty) if sparsity.active else 0)

    sparsity = SparsityCallback(kind="bn_scale", strength=1e-3, growing=1e-3)
    prune = FilterPruneCallback(flops=0.4, at_epoch=1, criterion="bn_scale", strategy="uniform")
    vdl = PruneVisualDL(str(tmp_path))
    model.fit(_Data(), epochs=3, batch_size=16, verbose=0,
              callbacks=[prune, sparsity, Penalties(), vdl])
    assert net.c1.weight.shape[0] < 4 or net.c2.weight.shape[0] < 6  # pruned
    assert seen[:8] == [1, 2, 3, 4] * 2 and seen[8:] == [0] * 4  # regularised until pruning only
    tags = [(s.tag, s.step) for s in history_of(model).scalars]
    for tag in ("sparsity/penalty", "sparsity/norm_cv", "sparsity/near_zero"):
        assert (tag, 0) in tags and (tag, 1) in tags and (tag, 2) not in tags
    assert model._loss is task_loss  # the user's loss is back
    # PruneVisualDL logged what was published
    from visualdl import LogReader
    files = [f for f in os.listdir(vdl.run_dir) if "vdlrecords" in f]
    reader = LogReader(file_path=os.path.join(vdl.run_dir, files[0]))
    penalty = [(r.id, r.value) for r in reader.get_data("scalar", "sparsity/penalty")]
    published = [(s.step, s.value) for s in history_of(model).scalars if s.tag == "sparsity/penalty"]
    assert [step for step, _ in penalty] == [0, 1]
    np.testing.assert_allclose([v for _, v in penalty], [v for _, v in published], rtol=1e-6)


def test_sparsity_arguments_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        SparsityCallback(kind="l1")
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        SparsityCallback(strength=-1)
    with pytest.raises(ValueError, match="would do nothing"):
        SparsityCallback(strength=0)
    with pytest.raises(ValueError, match="stop_epoch=1 must be after start_epoch=1"):
        SparsityCallback(start_epoch=1, stop_epoch=1)
    with pytest.raises(ValueError, match=r"method must be one of \['auto', 'gradient', 'proximal'\]"):
        SparsityCallback(method="prox")
    model = _model(_Net())
    with pytest.raises(ValueError, match="unknown group 'c3'"):
        model.fit(_Data(16), epochs=1, batch_size=16, verbose=0,
                  callbacks=[SparsityCallback(skip=["c3"])])


def test_sparsity_taylor_and_distillation_under_amp_config():
    """`prepare(amp_configs=...)` gives the model a GradScaler (inactive on CPU, `_scale` None):
    the regulariser, the Taylor hooks (which undo the loss scale) and distillation still run."""
    from prune_callbacks import DistillCallback

    paddle.seed(0)
    net = _Net()
    model = paddle.Model(net, [InputSpec([None, 3, 8, 8], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()),
                  nn.CrossEntropyLoss(), amp_configs={"level": "O1"})
    model.fit(_Data(), epochs=3, batch_size=16, verbose=0, callbacks=[
        SparsityCallback(kind="group", strength=1e-2),
        FilterPruneCallback(flops=0.4, at_epoch=1, criterion="taylor", strategy="uniform"),
        DistillCallback()])
    assert model._scaler is not None
    assert net.c1.weight.shape[0] < 4 or net.c2.weight.shape[0] < 6
    tags = {s.tag for s in history_of(model).scalars}
    assert {"sparsity/penalty", "distill/term"} <= tags


class _Concat(nn.Layer):
    """Two groups meet in one consumer: c3 reads c1's channels at inputs 0-3 and c2's at 4-7."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 4, 3, padding=1)
        self.c2 = nn.Conv2D(3, 4, 1)
        self.c3 = nn.Conv2D(8, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = paddle.concat([nn.functional.relu(self.c1(x)), nn.functional.relu(self.c2(x))], axis=1)
        return self.fc(nn.functional.relu(self.c3(x)).mean([2, 3]))


def test_group_lasso_over_a_concatenation_by_hand():
    net = _randomised(_Concat(), seed=3)
    reg = _sparsity(net, Regulariser.GROUP)
    assert reg.names == ["c1", "c2", "c3"]
    w = {k: p.numpy().astype(np.float64) for k, p in net.named_parameters()}
    want = {name: np.array([np.sqrt((w[f"{name}.weight"][c] ** 2).sum() + w[f"{name}.bias"][c] ** 2
                                    + (w["c3.weight"][:, off + c] ** 2).sum() + EPS)
                            for c in range(4)]) for name, off in (("c1", 0), ("c2", 4))}
    got = reg.magnitudes()
    for name in ("c1", "c2"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
    lam = [np.ones(4), 2 * np.ones(4), np.zeros(5)]
    net.clear_gradients()
    reg.penalty(lam).backward()
    g = net.c3.weight.grad.numpy()
    per_input = lambda n: n[None, :, None, None]  # noqa: E731
    np.testing.assert_allclose(g[:, :4], w["c3.weight"][:, :4] / per_input(want["c1"]), rtol=1e-4)
    np.testing.assert_allclose(g[:, 4:], 2 * w["c3.weight"][:, 4:] / per_input(want["c2"]),
                               rtol=1e-4)
