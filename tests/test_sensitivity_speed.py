"""The fast sensitivity path (replay cache, batches cut into balanced pieces for the worker
threads) gives exactly the losses of plainly evaluating the masked network, and falls back to
the same numbers on a network whose layers it cannot replay."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from paddle.vision import models

from prune_callbacks import EvalData, FilterPruner
from prune_callbacks.sensitivity.evaluation import ROW_BLOCK, work_pieces

from pruning_checks import masked_eval_fn

RATIOS = (0.3, 0.6, 0.9)


@pytest.mark.parametrize("sizes,workers", [
    ([128, 128, 128, 16], 2), ([16], 2), ([128], 4), ([100, 37], 3), ([5], 2), ([64, 64], 1)])
def test_work_pieces_cover_every_row_once_cut_at_row_blocks(sizes: list, workers: int) -> None:
    pieces = work_pieces(sizes, workers)
    for b, n in enumerate(sizes):
        mine = sorted((a, z) for pb, a, z in pieces if pb == b)
        assert [a for a, _ in mine] == [0] + [z for _, z in mine[:-1]] and mine[-1][1] == n
        assert all(a % ROW_BLOCK == 0 for a, _ in mine)  # same kernel row blocks as the batch
    assert [p[2] - p[1] for p in pieces] == sorted((p[2] - p[1] for p in pieces), reverse=True)
    if workers == 1:
        assert pieces == [(b, 0, n) for b, n in enumerate(sizes)]


def test_work_pieces_balance_uneven_batches() -> None:
    """Greedy filling of 2 threads: within one piece of an even share (256 rows before)."""
    load = [0, 0]
    for _, a, z in work_pieces([128, 128, 128, 16], 2):
        load[load.index(min(load))] += z - a
    assert max(load) <= 400 / 2 + 16


@pytest.mark.parametrize("name,kwargs", [
    ("mobilenet_v1", {"scale": 0.25}),
    ("mobilenet_v2", {"scale": 0.25}),
    ("resnet18", {}),
])
def test_fast_path_equals_plain_masked_evaluation(name: str, kwargs: Dict, make_labelled: Any) -> None:
    """The dataset form (2 threads, uneven batches cut into pieces, replay) against the opaque
    form evaluating the masked network on whole batches: the same float losses at every point."""
    paddle.seed(0)
    net = getattr(models, name)(num_classes=10, **kwargs)
    ds = make_labelled(net, 40, [3, 16, 16], noise=0.2)
    pruner = FilterPruner(net, [1, 3, 16, 16])
    fast = pruner.sensitivity(EvalData(ds, batch_size=16, workers=2), ratios=RATIOS)
    plain = pruner.sensitivity(masked_eval_fn(net, ds, 16), ratios=RATIOS)
    assert fast.baseline == plain.baseline
    assert fast.losses == plain.losses
    assert any(l != 0 for pts in fast.losses.values() for l in pts.values())


class Gate(nn.Layer):
    """A per-channel layer with a parameter and no registered output axis: the replay engine
    cannot mask its cached output, so it must stop replaying there and run it live."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = self.create_parameter([channels], default_initializer=nn.initializer.Constant(1.5))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * self.scale.reshape([1, -1, 1, 1])


class Gated(nn.Layer):
    """Conv-BN-ReLU, an unregistered per-channel layer, then a second conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2D(3, 12, 3, padding=1), nn.BatchNorm2D(12), nn.ReLU())
        self.gate = Gate(12)
        self.c2 = nn.Sequential(nn.Conv2D(12, 12, 3, padding=1), nn.BatchNorm2D(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.c2(self.gate(self.c1(x)))
        return self.fc(paddle.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("cache_mb", [2048.0, 0.0])
def test_unreplayable_network_falls_back_to_the_same_numbers(cache_mb: float,
                                                            make_labelled: Any) -> None:
    """An unregistered per-channel layer (replay stops before it), and (cache_mb=0) a replay
    cache too big to hold (prefix only): every loss is still the plain masked one."""
    from prune_callbacks.sensitivity import Runner
    from prune_callbacks.sensitivity import analysis
    paddle.seed(1)
    net = Gated()
    net.eval()
    ds = make_labelled(net, 36, [3, 10, 10], noise=0.2)
    pruner = FilterPruner(net, [1, 3, 10, 10])
    original = Runner.__init__

    def small_cache(self: Runner, *args: Any, **kw: Any) -> None:
        original(self, *args, **{**kw, "cache_mb": cache_mb})

    mp = pytest.MonkeyPatch()
    mp.setattr(Runner, "__init__", small_cache)
    mp.setattr(analysis, "Runner", Runner)
    try:
        fast = pruner.sensitivity(EvalData(ds, batch_size=16, workers=2), ratios=RATIOS)
    finally:
        mp.undo()
    plain = pruner.sensitivity(masked_eval_fn(net, ds, 16), ratios=RATIOS)
    assert fast.losses == plain.losses and fast.baseline == plain.baseline
    assert not any("forward" in vars(layer) for layer in net.sublayers(include_self=True))
    assert np.isfinite([l for pts in fast.losses.values() for l in pts.values()]).all()
