"""Data-driven importance: Taylor and mean-activation statistics from training steps, checked by
hand (numeric gradients), and gathered by FilterPruneCallback during its pruning epoch."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks import FilterPruneCallback, FilterPruner, ImportanceStats


class _Net(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2D(4)
        self.c2 = nn.Conv2D(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = nn.functional.relu(self.b1(self.c1(x)))
        return self.fc(nn.functional.relu(self.c2(x)).mean([2, 3]))


@pytest.fixture
def float64():
    old = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype(old)


def _batches(n: int = 2):
    rng = np.random.RandomState(0)
    return [(rng.randn(4, 3, 5, 5), rng.randint(0, 2, (4,))) for _ in range(n)]


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(paddle.to_tensor(x)), paddle.to_tensor(y))


def test_taylor_scores_against_numeric_gradients(float64):
    paddle.seed(0)
    net = _Net()
    net.train()  # BatchNorm normalises by the batch: the loss is a function of the weights alone
    stats = ImportanceStats(net, ["taylor"]).start()
    for x, y in _batches():
        _loss(net, x, y).backward()
        net.clear_gradients()
    stats.stop()
    pruner = FilterPruner(net, [1, 3, 5, 5], criterion="taylor", statistics=stats)
    params = dict(net.named_parameters())

    def numeric_w_times_grad(key):  # sum over the batches of |w * dL/dw|, central differences
        p = params[key]
        w0 = p.numpy().copy()
        out = np.zeros_like(w0)
        for x, y in _batches():
            for i in np.ndindex(w0.shape):
                vals = []
                for h in (1e-5, -1e-5):
                    w = w0.copy()
                    w[i] += h
                    p.set_value(w)
                    with paddle.no_grad():
                        vals.append(float(_loss(net, x, y)))
                out[i] += abs(w0[i] * (vals[0] - vals[1]) / 2e-5)
        p.set_value(w0)
        return out

    # group c2: c2's filters and bias, and fc's rows reading it (Linear weight is [in, out])
    cw, cb, fw = (numeric_w_times_grad(k) for k in ("c2.weight", "c2.bias", "fc.weight"))
    want = cw.reshape(3, -1).sum(1) + cb + fw.sum(1)
    np.testing.assert_allclose(pruner.importance("c2"), want, rtol=1e-5)
    # group c1: its filters, bias, BatchNorm scale and shift, and c2's inputs
    parts = [numeric_w_times_grad(k) for k in ("c1.weight", "c1.bias", "b1.weight", "b1.bias")]
    want = parts[0].reshape(4, -1).sum(1) + parts[1] + parts[2] + parts[3] \
        + numeric_w_times_grad("c2.weight").sum((0, 2, 3))
    np.testing.assert_allclose(pruner.importance("c1"), want, rtol=1e-5)


def test_mean_activation_is_the_mean_absolute_output_per_channel():
    paddle.seed(0)
    net = _Net()
    net.train()
    stats = ImportanceStats(net, ["activation"])
    want_b1, want_c2 = np.zeros(4), np.zeros(3)
    for x, _ in _batches():
        xt = paddle.to_tensor(x.astype("float32"))
        stats.start()
        net(xt)
        stats.stop()
        with paddle.no_grad():  # the same batch again, by hand (train-mode BatchNorm)
            h = net.b1(net.c1(xt))
            want_b1 += np.abs(h.numpy()).mean((0, 2, 3)) / 2
            want_c2 += np.abs(net.c2(nn.functional.relu(h)).numpy()).mean((0, 2, 3)) / 2
    stats.stop()
    pruner = FilterPruner(net, [1, 3, 5, 5], criterion="activation", statistics=stats)
    # c1 is scored at its BatchNorm's output, c2 (no norm after it) at its own output
    np.testing.assert_allclose(pruner.importance("c1"), want_b1, rtol=1e-5)
    np.testing.assert_allclose(pruner.importance("c2"), want_c2, rtol=1e-5)


def test_data_driven_criterion_without_statistics_says_how_to_get_them():
    pruner = FilterPruner(_Net(), [1, 3, 5, 5], criterion="taylor")
    with pytest.raises(ValueError, match="FilterPruneCallback.*pruning epoch"):
        pruner.importance("c1")
    with pytest.raises(ValueError, match="kinds must be some of"):
        ImportanceStats(_Net(), ["hessian"])
    with pytest.raises(ValueError, match="criterion 'taylor' scores statistics .*strategy='uniform'"):
        FilterPruneCallback(criterion="taylor", strategy="sensitivity", sensitivity="sens.json")
    stats = ImportanceStats(_Net(), ["taylor"])
    with pytest.raises(ValueError, match="no 'taylor' statistics for 'c1.weight'"):
        stats.tensor("taylor", "c1.weight")


class _Data(paddle.io.Dataset):
    def __init__(self, n: int = 48) -> None:
        rng = np.random.RandomState(0)
        self.x = rng.randn(n, 3, 5, 5).astype("float32")
        self.y = (self.x[:, 0].mean((1, 2)) > 0).astype("int64")[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("criterion", ["taylor", "activation"])
def test_pruning_epoch_statistics_choose_the_channels_without_a_second_pass(criterion):
    paddle.seed(0)
    net = _Net()
    model = paddle.Model(net, [InputSpec([None, 3, 5, 5], "float32", "x")],
                         [InputSpec([None, 1], "int64", "y")])
    model.prepare(paddle.optimizer.Momentum(0.05, parameters=net.parameters()),
                  nn.CrossEntropyLoss())
    forwards, mine = [], {}

    class Witness(paddle.callbacks.Callback):
        """Its own statistics over exactly the pruning epoch (epoch 1), and a forward count."""

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                mine["stats"] = ImportanceStats(net, [criterion]).start()

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                mine["stats"].stop()
                mine["scores"] = {g: FilterPruner(net, [1, 3, 5, 5], criterion,
                                               statistics=mine["stats"])
                                  .importance(g) for g in ("c1", "c2")}

    net.register_forward_pre_hook(  # eager training forwards (tracing runs forward statically)
        lambda layer, inputs: forwards.append(1) if paddle.in_dynamic_mode() else None)
    prune = FilterPruneCallback(flops=0.3, at_epoch=1, criterion=criterion, strategy="uniform")
    model.fit(_Data(), epochs=3, batch_size=16, verbose=0, callbacks=[Witness(), prune])
    assert len(forwards) == 3 * 3  # the training steps only: no pass of its own over the data
    for g in prune.plans[0].groups:
        scores = mine["scores"][g.name]
        dropped = sorted(set(range(len(scores))) - set(g.kept))
        assert dropped and scores[dropped].max() <= scores[list(g.kept)].min()


def test_trial_copies_do_not_feed_the_statistics():
    """Tracing a network whose statistics are being gathered deep-copies it for trial prunes
    (here DropBlock's training-only mask): the copies carry the hooks, pruned by one channel;
    they must not add to (or, with their other width, wipe) the sums."""
    import warnings
    from test_detection import DropBlockNet, _batch
    paddle.seed(0)
    net = DropBlockNet()
    stats = ImportanceStats(net, ["activation"]).start()
    net.train()
    for _ in range(5):
        net(*_batch())
    before = {k: (list(v.shape), stats.batches["activation"][k])
              for k, v in stats.sums["activation"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FilterPruner(net, [1, 3, 8, 8], train_inputs=_batch())
    after = {k: (list(v.shape), stats.batches["activation"][k])
             for k, v in stats.sums["activation"].items()}
    assert after == before and before["c1.weight"] == ([8], 5)
