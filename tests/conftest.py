"""Shared tiny networks and data for the tests: small enough to run in milliseconds on a CPU."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.static import InputSpec

from prune_callbacks.datasets.bundled import digits_dataset, subset


class TinyNet(nn.Layer):
    """Plain convs, a depthwise conv, a residual add and a classifier: every group kind."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2D(3, 12, 3, padding=1), nn.BatchNorm2D(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2D(12, 12, 3, padding=1, groups=12), nn.BatchNorm2D(12),
                                nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2D(12, 16, 3, stride=2, padding=1), nn.BatchNorm2D(16))
        self.c3 = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1), nn.BatchNorm2D(16))
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.c2(self.dw(self.c1(x)))
        y = nn.functional.relu(y + self.c3(nn.functional.relu(y)))
        return self.fc(paddle.flatten(self.pool(y), 1))


class ArrayDS(paddle.io.Dataset):
    """(input, label) samples from two numpy arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], self.y[i]


def labelled(net: nn.Layer, n: int, shape: List[int], noise: float = 0.3, seed: int = 0) -> ArrayDS:
    """Inputs labelled by the network itself, with some labels flipped: a baseline well above 0."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, *shape).astype("float32")
    net.eval()
    with paddle.no_grad():
        y = net(paddle.to_tensor(x)).numpy().argmax(1)
    flip = rng.rand(n) < noise
    y[flip] = rng.randint(0, 5, flip.sum())
    return ArrayDS(x, y.reshape(-1, 1).astype("int64"))


def conv_bn_net(width: int = 8) -> nn.Layer:
    """Two conv-BN-ReLU blocks and a classifier over 1x8x8 inputs (4 classes)."""
    return nn.Sequential(
        nn.Conv2D(1, width, 3, padding=1), nn.BatchNorm2D(width), nn.ReLU(),
        nn.Conv2D(width, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU(),
        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(16, 4))


def make_model(net: nn.Layer, size: int = 32, lr: Any = 0.05,
               optimizer: str = "momentum") -> paddle.Model:
    """A prepared paddle.Model over 3 x size x size images (Momentum with L2 decay, or Adam)."""
    model = paddle.Model(net, inputs=[InputSpec([None, 3, size, size], "float32", "image")],
                         labels=[InputSpec([None, 1], "int64", "label")])
    if optimizer == "momentum":
        opt = paddle.optimizer.Momentum(lr, momentum=0.9, parameters=net.parameters(),
                                        weight_decay=paddle.regularizer.L2Decay(1e-4))
    else:
        opt = paddle.optimizer.Adam(lr, parameters=net.parameters())
    model.prepare(opt, nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    return model


@pytest.fixture()
def tiny() -> Tuple[TinyNet, ArrayDS]:
    """A TinyNet in eval mode and 48 samples of 3x12x12 it labelled itself (30% flipped)."""
    paddle.seed(3)
    net = TinyNet()
    net.eval()
    return net, labelled(net, 48, [3, 12, 12])


@pytest.fixture()
def tiny_net() -> Callable[[], TinyNet]:
    return TinyNet


@pytest.fixture()
def array_ds() -> Callable[[np.ndarray, np.ndarray], ArrayDS]:
    return ArrayDS


@pytest.fixture()
def make_labelled() -> Callable[..., ArrayDS]:
    return labelled


@pytest.fixture()
def small_cnn() -> Callable[..., nn.Layer]:
    """Factory of `conv_bn_net(width)`."""
    return conv_bn_net


@pytest.fixture(name="make_model")
def make_model_fixture() -> Callable[..., paddle.Model]:
    return make_model


@pytest.fixture(scope="session")
def digits() -> Any:
    """256 training and 64 test samples of the real 8x8 digits, as 3x32x32 images."""
    return subset(digits_dataset("train"), 256, seed=0), subset(digits_dataset("test"), 64, seed=0)
