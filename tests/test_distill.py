"""DistillCallback: the loss it trains on, its teacher, and its place in one fit with pruning."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import DistillCallback, FilterPruneCallback, history_of
from prune_callbacks.callbacks.distill import distill_loss


class _Net(nn.Layer):
    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2D(16)
        self.c2 = nn.Conv2D(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.aux = nn.Linear(16, 4) if aux else None

    def forward(self, x):
        x = nn.functional.relu(self.b1(self.c1(x)))
        y = nn.functional.relu(self.c2(x)).mean([2, 3])
        if self.aux is not None and self.training:
            return self.fc(y), self.aux(x.mean([2, 3]))
        return self.fc(y)


class _Data(paddle.io.Dataset):
    def __init__(self, n: int = 64) -> None:
        rng = np.random.RandomState(0)
        self.x = rng.randn(n, 3, 8, 8).astype("float32")
        self.y = (self.x[:, 0].mean((1, 2)) > 0).astype("int64")[:, None] + \
            2 * (self.x[:, 1].mean((1, 2)) > 0).astype("int64")[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _zscore(z):
    return (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)


@pytest.mark.parametrize("standardize", [False, True])
def test_distill_loss_equals_hand_computation(standardize):
    rng = np.random.RandomState(0)
    s, t = 3 * rng.randn(5, 7).astype("float32"), 5 * rng.randn(5, 7).astype("float32")
    T = 3.0
    prep = _zscore if standardize else (lambda z: z)
    ps, pt = _softmax(prep(s) / T), _softmax(prep(t) / T)
    want = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    got = float(distill_loss(paddle.to_tensor(s), paddle.to_tensor(t), T, standardize))
    assert got == pytest.approx(want, rel=1e-5)
    # dense outputs: classes on axis 1, mean over samples and pixels
    s4, t4 = rng.randn(2, 3, 4, 4).astype("float32"), rng.randn(2, 3, 4, 4).astype("float32")
    flat = lambda a: a.transpose(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
    ps, pt = _softmax(prep(flat(s4)) / T), _softmax(prep(flat(t4)) / T)
    want = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    assert float(distill_loss(paddle.to_tensor(s4), paddle.to_tensor(t4), T, standardize)) == \
        pytest.approx(want, rel=1e-5)
    assert float(distill_loss(paddle.to_tensor(s), paddle.to_tensor(s), T, standardize)) == \
        pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("standardize", [False, True])
def test_distill_loss_gradient_equals_hand_computation(standardize):
    rng = np.random.RandomState(1)
    s, t = 3 * rng.randn(6, 5), 6 * rng.randn(6, 5)
    T, n = 4.0, 6
    student = paddle.to_tensor(s.astype("float32"), stop_gradient=False)
    distill_loss(student, paddle.to_tensor(t.astype("float32")), T, standardize).backward()
    zs, zt = (_zscore(s), _zscore(t)) if standardize else (s, t)
    # d/dz_s of T^2 * KL(p_t || p_s), p = softmax(z / T): T * (p_s - p_t), averaged over samples
    g = T * (_softmax(zs / T) - _softmax(zt / T)) / n
    if standardize:  # back through (z - mean) / std (population std): the layer-norm backward
        g = (g - g.mean(1, keepdims=True) - zs * (g * zs).mean(1, keepdims=True)) \
            / s.std(1, keepdims=True)
    np.testing.assert_allclose(student.grad.numpy(), g, rtol=1e-4, atol=1e-7)
    # without standardisation the pull grows with the teacher's logit scale; with it, it does not
    grads = []
    for scale in (1.0, 10.0):
        st = paddle.to_tensor(s.astype("float32"), stop_gradient=False)
        distill_loss(st, paddle.to_tensor((scale * t).astype("float32")), T, standardize).backward()
        grads.append(float(np.abs(st.grad.numpy()).sum()))
    if standardize:
        assert grads[1] == pytest.approx(grads[0], rel=1e-4)
    else:
        assert grads[1] > 1.3 * grads[0]


def _model(net):
    model = paddle.Model(net, [InputSpec([None, 3, 8, 8], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()),
                  nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return model


class _Watch(paddle.callbacks.Callback):
    """Records the distillation term per batch and the teacher's weights after each epoch."""

    def __init__(self, distill: DistillCallback) -> None:
        self.distill = distill
        self.kd, self.teacher_weights = [], []

    def on_train_batch_end(self, step, logs=None):
        if self.distill.last_kd is not None:
            self.kd.append(self.distill.last_kd)

    def on_epoch_end(self, epoch, logs=None):
        if self.distill.teacher is not None:
            self.teacher_weights.append(self.distill.teacher.c1.weight.numpy().copy())


def test_distill_with_pruning_in_one_fit():
    paddle.seed(0)
    net = _Net()
    model = _model(net)
    original_loss = model._loss
    distill = DistillCallback(alpha=0.9, temperature=2.0)
    watch = _Watch(distill)
    before = {}

    class Snapshot(paddle.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                before["c1"] = net.c1.weight.numpy().copy()

    model.fit(_Data(), epochs=4, batch_size=16, verbose=0, callbacks=[
        Snapshot(), FilterPruneCallback(flops=0.5, at_epoch=0, strategy="uniform"), distill, watch])
    assert net.c1.weight.shape[0] < 16  # the student was pruned
    # the teacher: the network as it was just before pruning, unpruned and frozen
    assert len(watch.teacher_weights) == 4
    np.testing.assert_array_equal(watch.teacher_weights[0], before["c1"])
    for w in watch.teacher_weights[1:]:
        np.testing.assert_array_equal(w, before["c1"])
    # training with it lowers the distillation term (12 steps after pruning)
    assert len(watch.kd) == 12
    assert np.mean(watch.kd[-4:]) < np.mean(watch.kd[:4])
    # dropped at the end of fit, the user's loss is back
    assert distill.teacher is None and model._loss is original_loss
    # the teacher's worth per distilled epoch (1..3), for PruneVisualDL
    scalars = {(p.tag, p.step): p.value for p in history_of(model).scalars}
    for epoch in (1, 2, 3):
        assert scalars[("distill/term", epoch)] == pytest.approx(np.mean(watch.kd[4 * (epoch - 1):
                                                                                  4 * epoch]))
        assert 0 <= scalars[("distill/teacher_top1", epoch)] <= 1
    assert ("distill/term", 0) not in scalars


def test_a_teacher_worse_than_the_labels_is_reported():
    paddle.seed(0)
    net = _Net()
    model = _model(net)
    model.fit(_Data(), epochs=4, batch_size=16, verbose=0)  # the student learns the labels
    teacher = _Net()
    teacher.fc.bias.set_value(np.array([50.0, 0, 0, 0], dtype="float32"))  # always class 0
    labels = _Data().y.ravel()
    distill = DistillCallback(alpha=0.5, teacher=teacher)
    with pytest.warns(UserWarning, match=r"the teacher scored top-1 0\.3.*below the student"):
        model.fit(_Data(), epochs=1, batch_size=16, verbose=0, callbacks=[distill])
    scalars = {p.tag: p.value for p in history_of(model).scalars}
    assert scalars["distill/teacher_top1"] == pytest.approx(np.mean(labels == 0))
    assert scalars["distill/student_top1"] > scalars["distill/teacher_top1"]


def test_distill_multi_output_net_distils_the_main_output():
    paddle.seed(0)
    net = _Net(aux=True)
    model = _model(net)

    def loss(main, aux, label):
        ce = nn.functional.cross_entropy
        return ce(main, label) + 0.4 * ce(aux, label)

    model._loss = loss
    distill = DistillCallback(alpha=0.5)
    watch = _Watch(distill)
    model.fit(_Data(), epochs=2, batch_size=16, verbose=0, callbacks=[
        FilterPruneCallback(flops=0.3, at_epoch=0, strategy="uniform"), distill, watch])
    assert len(watch.kd) == 4 and all(np.isfinite(watch.kd))


def test_distill_arguments_checked():
    with pytest.raises(ValueError, match="alpha must be a number in"):
        DistillCallback(alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        DistillCallback(temperature=0)
    with pytest.raises(TypeError, match="output must be an int index or a str"):
        DistillCallback(output=1.0)


def test_given_teacher_is_distilled_from_the_first_step():
    paddle.seed(0)
    teacher = _Net()
    net = _Net()
    model = _model(net)
    distill = DistillCallback(alpha=1.0, temperature=1.0, teacher=teacher)
    watch = _Watch(distill)
    model.fit(_Data(), epochs=3, batch_size=16, verbose=0, callbacks=[distill, watch])
    assert len(watch.kd) == 12  # every step, no pruning needed
    assert np.mean(watch.kd[-4:]) < np.mean(watch.kd[:4])  # alpha=1: the student imitates
    with pytest.raises(TypeError, match="teacher must be a paddle.nn.Layer"):
        DistillCallback(teacher="resnet")
