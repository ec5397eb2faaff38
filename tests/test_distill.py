"""DistillCallback: the loss it trains on, its teacher, and its place in one fit with pruning."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import DistillCallback, FilterPruneCallback
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


def test_distill_loss_equals_hand_computation():
    rng = np.random.RandomState(0)
    s, t = rng.randn(5, 7).astype("float32"), rng.randn(5, 7).astype("float32")
    T = 3.0
    ps, pt = _softmax(s / T), _softmax(t / T)
    want = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    got = float(distill_loss(paddle.to_tensor(s), paddle.to_tensor(t), T))
    assert got == pytest.approx(want, rel=1e-5)
    # dense outputs: classes on axis 1, mean over samples and pixels
    s4, t4 = rng.randn(2, 3, 4, 4).astype("float32"), rng.randn(2, 3, 4, 4).astype("float32")
    flat = lambda a: a.transpose(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
    ps, pt = _softmax(flat(s4) / T), _softmax(flat(t4) / T)
    want = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    assert float(distill_loss(paddle.to_tensor(s4), paddle.to_tensor(t4), T)) == \
        pytest.approx(want, rel=1e-5)
    assert float(distill_loss(paddle.to_tensor(s), paddle.to_tensor(s), T)) == \
        pytest.approx(0.0, abs=1e-6)


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
